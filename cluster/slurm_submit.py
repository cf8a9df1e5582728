"""Submit a pipeline's pending stages to Slurm through submitit, each job waiting for its parents.

Every stage becomes one job (``nodes`` x ``tasks_per_node`` ranks) that starts only when its parents'
jobs succeeded (``afterok``); a job whose parent failed can never start, and Slurm removes it
(``--kill-on-invalid-dep=yes``) instead of leaving it queued forever. A stage that splits its work into
parts (``run_part``, see :mod:`pipeline.core.stage`) first runs as an array job of ``array`` tasks. Every job
runs the same entry point on the config snapshot written for this submission, so a later ``kope run`` never
changes what a queued job runs. The job ids go into the stage state files,
so ``kope status`` and ``kope cancel`` find them and a second submission does not duplicate running jobs.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError

from cluster.slurm_job import StageJob
from cluster.slurm_runs import recorded_jobs
from cluster.slurm_state import query_jobs
from pipeline.core.cluster_profile import ClusterProfile, SlurmResources
from pipeline.core.config.schema import PipelineConfig, StageSpec
from pipeline.core.errors import KopeError
from pipeline.core.launch import StageLaunch
from pipeline.core.logs import get_logger
from pipeline.core.run_dir import RunDir
from pipeline.core.run_state import JobRecord, now_iso

log = get_logger("slurm")
SUBMIT_FOLDER = "slurm"
SRUN_ARGS = ["--kill-on-bad-exit=1"]  # one rank dying ends the step instead of leaving the others hanging


def _executor(folder: Path, res: SlurmResources, name: str, after: list[str]) -> Any:
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=res.max_requeues)
    except RuntimeError as exc:
        raise KopeError(f"cannot submit to Slurm: {exc}") from None
    sbatch = dict(res.extra_sbatch)
    if after:
        sbatch.update({"dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"})
    params: dict[str, Any] = {
        "name": name, "nodes": res.nodes, "tasks_per_node": res.tasks_per_node, "cpus_per_task": res.cpus_per_task,
        "timeout_min": res.time_min, "gpus_per_node": res.gpus_per_node or None, "mem_gb": res.mem_gb,
        "slurm_partition": res.partition, "slurm_account": res.account, "slurm_qos": res.qos,
        "slurm_constraint": res.constraint, "slurm_signal_delay_s": res.signal_delay_s,
        "slurm_array_parallelism": res.array_parallelism, "slurm_srun_args": SRUN_ARGS,
        "slurm_setup": list(res.setup) or None, "slurm_additional_parameters": sbatch,
    }
    executor.update_parameters(**{key: value for key, value in params.items() if value is not None})
    return executor


def _submit_stage(run: RunDir, config: PipelineConfig, spec: StageSpec, res: SlurmResources, after: list[str],
                  snapshot: str) -> JobRecord:
    run_dir = run.root.resolve()
    folder = run_dir / SUBMIT_FOLDER
    name = f"{config.settings.name}.{spec.name}"
    grace = max(res.signal_delay_s - 15, 5)
    launch = StageLaunch(run_dir, spec.name, snapshot, res.nodes * res.tasks_per_node)
    record = JobRecord(job_id="", log="", config=snapshot, submitted_at=now_iso(), nodes=res.nodes,
                       tasks_per_node=res.tasks_per_node)
    if res.array and spec.kind.parts:
        parts = [StageJob(launch, part, res.array, grace) for part in range(res.array)]
        one_process = dataclasses.replace(res, nodes=1, tasks_per_node=1)  # a part is one process
        array_jobs = _executor(folder, one_process, f"{name}.parts", after).submit_array(parts)
        record.array_job_id = array_jobs[0].job_id.split("_")[0]
        record.array_tasks, record.array_log = res.array, run.relative(Path(array_jobs[0].paths.stderr))
        after = [record.array_job_id]
    job = _executor(folder, res, name, after).submit(StageJob(launch, stop_grace_s=grace))
    record.job_id, record.log = job.job_id, run.relative(Path(job.paths.stderr))
    return record


def submit_stages(config: PipelineConfig, run: RunDir, to_run: list[str], profile: ClusterProfile,
                  snapshot: str) -> dict[str, str]:
    """Submit ``to_run`` (in dependency order); returns stage -> job id. Stages whose earlier job is still
    queued or running keep it."""
    if shutil.which("sbatch") is None:
        raise KopeError(f"sbatch not found: the cluster profile '{profile.name}' needs the Slurm client commands")
    previous = recorded_jobs(run, to_run)
    states = query_jobs(record.job_id for record in previous.values())
    job_of: dict[str, str] = {}
    for name in to_run:
        spec = config.stages[name]
        state = run.read(name)
        earlier = previous.get(name)
        if earlier and states[earlier.job_id].active:
            job_of[name] = earlier.job_id
            log.info("stage %s: job %s is still %s; keeping it", name, earlier.job_id, states[earlier.job_id].state)
            continue
        after = [job_of[dep] for dep in spec.needs if dep in job_of]
        try:
            record = _submit_stage(run, config, spec, profile.slurm_resources(name, spec.kind.name), after, snapshot)
        except FailedJobError as exc:
            reason = (str(exc).strip().splitlines() or ["?"])[-1]
            earlier_jobs = f" (submitted before it: {', '.join(job_of)})" if job_of else ""
            raise KopeError(f"sbatch refused stage {name}: {reason}{earlier_jobs}") from None
        record.profile = profile.name
        state.status, state.error, state.traceback, state.job = "pending", None, None, record
        run.write(state)
        job_of[name] = record.job_id
        waits = f" after {', '.join(after)}" if after else ""
        log.info("stage %s: submitted job %s%s (log %s)", name, record.job_id, waits, record.log)
    return job_of
