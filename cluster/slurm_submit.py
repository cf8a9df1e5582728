"""Submit a pipeline's pending stages to Slurm through submitit, each job waiting for its parents.

Every stage becomes one job (``nodes`` x ``tasks_per_node`` ranks) that starts only when its parents'
jobs succeeded (``afterok``); a job whose parent failed can never start, and Slurm removes it
(``--kill-on-invalid-dep=yes``) instead of leaving it queued forever. A stage that splits its work into
parts (see :mod:`cluster.stage_part`) first runs as an array job. The job ids go into the stage state files,
so ``kope status`` and ``kope cancel`` find them and a second submission does not duplicate running jobs.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError

from cluster.profile import ClusterProfile, SlurmResources
from cluster.slurm_job import StageJob
from cluster.slurm_runs import SLURM_KEY, recorded_jobs
from cluster.slurm_state import query_jobs
from cluster.stage_part import splits_into_parts
from pipeline.config.schema import PipelineConfig, StageSpec
from pipeline.errors import KopeError
from pipeline.logs import get_logger
from pipeline.run_state import RunState, now_iso

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


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def _submit_stage(config: PipelineConfig, spec: StageSpec, res: SlurmResources, after: list[str]) -> dict:
    run_dir = config.run_dir.resolve()
    folder = run_dir / SUBMIT_FOLDER
    name = f"{config.settings.name}.{spec.name}"
    grace = max(res.signal_delay_s - 15, 5)
    record: dict[str, Any] = {"submitted_at": now_iso(), "nodes": res.nodes, "tasks_per_node": res.tasks_per_node}
    if res.array and splits_into_parts(spec.module):
        parts = [StageJob(str(run_dir), spec.name, part, res.array, grace) for part in range(res.array)]
        one_process = dataclasses.replace(res, nodes=1, tasks_per_node=1)  # a part is one process
        array_jobs = _executor(folder, one_process, f"{name}.parts", after).submit_array(parts)
        array_id = array_jobs[0].job_id.split("_")[0]
        record.update(array_job_id=array_id, array_tasks=res.array,
                      array_log=_relative(array_jobs[0].paths.stderr, run_dir))
        after = [array_id]
    job = _executor(folder, res, name, after).submit(StageJob(str(run_dir), spec.name, stop_grace_s=grace))
    record.update(job_id=job.job_id, log=_relative(job.paths.stderr, run_dir))
    return record


def submit_stages(config: PipelineConfig, run_state: RunState, to_run: list[str], profile: ClusterProfile) -> dict:
    """Submit ``to_run`` (in dependency order); returns stage -> job id. Stages whose earlier job is still
    queued or running keep it."""
    if shutil.which("sbatch") is None:
        raise KopeError(f"sbatch not found: the cluster profile '{profile.name}' needs the Slurm client commands")
    previous = recorded_jobs(run_state, to_run)
    states = query_jobs(record["job_id"] for record in previous.values())
    job_of: dict[str, str] = {}
    for name in to_run:
        spec = config.stages[name]
        state = run_state.read(name)
        earlier = previous.get(name)
        if earlier and states[earlier["job_id"]].active:
            job_of[name] = earlier["job_id"]
            log.info("stage %s: job %s is still %s; keeping it", name, earlier["job_id"],
                     states[earlier["job_id"]].state)
            continue
        after = [job_of[dep] for dep in spec.needs if dep in job_of]
        try:
            record = _submit_stage(config, spec, profile.slurm_resources(name, spec.kind), after)
        except FailedJobError as exc:
            reason = (str(exc).strip().splitlines() or ["?"])[-1]
            earlier = f" (submitted before it: {', '.join(job_of)})" if job_of else ""
            raise KopeError(f"sbatch refused stage {name}: {reason}{earlier}") from None
        record["profile"] = profile.name
        state.status, state.error, state.traceback = "pending", None, None
        state.extra[SLURM_KEY] = record
        run_state.write(state)
        job_of[name] = record["job_id"]
        waits = f" after {', '.join(after)}" if after else ""
        log.info("stage %s: submitted job %s%s (log %s)", name, record["job_id"], waits, record["log"])
    return job_of
