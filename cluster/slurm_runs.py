"""A run directory's Slurm jobs: which stage has which job, what became of them, and cancelling them.

The job ids live in each stage's state file (its :class:`pipeline.core.run_state.JobRecord`). A job can end
without the stage saying so (killed at the time limit, out of memory, a node lost, an import error before the
stage started): :func:`stage_problem` turns the Slurm state and the log's last line into the stage's error, and
:func:`reconcile` writes it, so such a stage reads ``failed`` instead of ``running`` forever.
:class:`SlurmScheduler` is what the core finds by name (``pipeline.core.launch.SCHEDULERS``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from cluster.slurm_state import JobInfo, cancel_jobs, query_jobs
from pipeline.core.cluster_profile import ClusterProfile
from pipeline.core.config.schema import PipelineConfig, StageSpec
from pipeline.core.errors import KopeError
from pipeline.core.launch import JobView
from pipeline.core.run_dir import RunDir
from pipeline.core.run_state import JobRecord, StageState, now_iso

CANCEL_WAIT_S = 120.0
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def recorded_jobs(run: RunDir, stages: list[str] | None = None) -> dict[str, JobRecord]:
    """stage -> its job record, for the stages that were submitted."""
    records = {}
    for name in run.stage_names() if stages is None else stages:
        state = run.read(name)
        if state is not None and state.job is not None and state.job.job_id:
            records[name] = state.job
    return records


def last_error_line(path: Path) -> str:
    """The last exception line of a job log (else its last line): what went wrong, in one line."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    errors = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (errors or lines or [""])[-1]


def stage_problem(run_dir: Path, state: StageState, record: JobRecord, infos: dict[str, JobInfo]) -> str | None:
    """Why a stage whose jobs ended is not done, when the stage itself did not record it (or recorded only
    that it was interrupted, and the job then ended instead of being requeued)."""
    if state.status in ("done", "failed"):
        return None
    main = infos.get(record.job_id)
    parts = infos.get(record.array_job_id or "")
    if parts is not None and parts.finished and parts.state != "COMPLETED":
        log = Path(run_dir) / (record.array_log or "")
        return f"array job {parts.job_id} {parts.describe()}: {last_error_line(log)}".rstrip(": ")
    if main is None or not main.finished:
        return None
    if main.state == "COMPLETED":
        if state.status == "interrupted":
            return f"Slurm job {main.job_id} ended after the stage was interrupted, without a requeue: {state.error}"
        return f"Slurm job {main.job_id} completed but the stage recorded no result"
    if main.state == "CANCELLED" and state.status == "pending":
        return None  # never started (cancelled, or a parent failed): still pending
    line = last_error_line(Path(run_dir) / record.log)
    return f"Slurm job {main.job_id} {main.describe()}" + (f": {line}" if line else "")


def job_views(run: RunDir) -> dict[str, JobView]:
    records = recorded_jobs(run)
    infos = query_jobs(job for record in records.values() for job in record.job_ids())
    views = {}
    for name, record in records.items():
        state = run.read(name)
        main, parts = infos[record.job_id], infos.get(record.array_job_id or "")
        shown = f"parts {parts.describe()}" if parts is not None and parts.active else main.describe()
        job = record.job_id + (f" (parts {parts.job_id})" if parts is not None else "")
        views[name] = JobView(job, shown, record.log, main.active or bool(parts and parts.active),
                              stage_problem(run.root, state, record, infos) if state else None,
                              main.active and main.state not in ("RUNNING", "COMPLETING") and bool(
                                  state and state.status in ("running", "failed", "interrupted")))
    return views


def reconcile(run: RunDir) -> list[str]:
    """Mark stages whose jobs ended without a result as failed, with Slurm's reason; returns their names."""
    changed = []
    for name, view in job_views(run).items():
        state = run.read(name)
        if view.problem and state is not None and state.status != "done" and state.error != view.problem:
            state.status, state.error, state.ended_at = "failed", view.problem, now_iso()
            run.write(state)
            changed.append(name)
    return changed


def active_jobs(run: RunDir, stages: list[str] | None = None) -> dict[str, list[str]]:
    """stage -> its queued or running job ids."""
    records = recorded_jobs(run, stages)
    if not records:
        return {}
    infos = query_jobs(job for record in records.values() for job in record.job_ids())
    active = {name: [job for job in record.job_ids() if infos[job].active] for name, record in records.items()}
    return {name: jobs for name, jobs in active.items() if jobs}


def refuse_if_active(run: RunDir, stages: list[str]) -> None:
    """Running a stage here while its Slurm job may still run would mix two runs' outputs."""
    active = active_jobs(run, stages)
    if active:
        listing = ", ".join(f"{name} (job {' '.join(jobs)})" for name, jobs in active.items())
        raise KopeError(f"{run.root}: stages still queued or running on Slurm: {listing}; "
                        f"wait for them or run `kope cancel {run.root}`")


def cancel_run(run: RunDir, wait_s: float = CANCEL_WAIT_S) -> dict[str, list[str]]:
    """Cancel every queued or running job of the run and wait until Slurm has ended them."""
    active = active_jobs(run)
    cancel_jobs(job for jobs in active.values() for job in jobs)
    deadline = time.monotonic() + wait_s
    while active_jobs(run, list(active)) and time.monotonic() < deadline:
        time.sleep(1.0)
    reconcile(run)
    return active


class SlurmScheduler:
    """The Slurm side of a run, as the core asks for it: submit, world size, job views, reconcile, cancel."""

    def submit(self, config: PipelineConfig, run: RunDir, to_run: list[str], profile: ClusterProfile,
               snapshot: str) -> dict[str, str]:
        from cluster.slurm_submit import submit_stages

        return submit_stages(config, run, to_run, profile, snapshot)

    def world_size(self, profile: ClusterProfile, spec: StageSpec) -> int:
        resources = profile.slurm_resources(spec.name, spec.kind.name)
        return resources.nodes * resources.tasks_per_node

    def follow(self, run: RunDir, stages: list[str], interval_s: float) -> None:
        from cluster.slurm_watch import follow_run

        follow_run(run, stages, interval_s=interval_s)

    views = staticmethod(job_views)
    reconcile = staticmethod(reconcile)
    active_jobs = staticmethod(active_jobs)
    refuse_if_active = staticmethod(refuse_if_active)
    cancel = staticmethod(cancel_run)
