"""A run directory's Slurm jobs: which stage has which job, what became of them, and cancelling them.

The job ids live in each stage's state file (``extra["slurm"]``). A job can end without the stage
saying so (killed at the time limit, out of memory, a node lost, an import error before the stage
started): :func:`stage_problem` turns the Slurm state and the log's last line into the stage's error,
and :func:`reconcile` writes it, so such a stage reads ``failed`` instead of ``running`` forever.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.slurm_state import JobInfo, cancel_jobs, query_jobs
from pipeline.errors import KopeError
from pipeline.run_state import RunState, StageState, now_iso

SLURM_KEY = "slurm"
CANCEL_WAIT_S = 120.0
PREEMPTED = "Preempted"  # the error a stage records when it stopped on a signal (pipeline.train.faults)
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def recorded_jobs(run_state: RunState, stages: list[str] | None = None) -> dict[str, dict]:
    """stage -> its Slurm record, for the stages that were submitted."""
    records = {}
    for name in run_state.stage_names() if stages is None else stages:
        state = run_state.read(name)
        record = state.extra.get(SLURM_KEY) if state else None
        if record and record.get("job_id"):
            records[name] = record
    return records


def record_job_ids(record: dict) -> list[str]:
    return [job for job in (record.get("array_job_id"), record["job_id"]) if job]


@dataclass(frozen=True)
class SlurmView:
    """What ``kope status`` shows of a stage's jobs."""

    job: str
    state: str  # shown: "PENDING (Dependency)", "parts RUNNING (3/8 tasks done)"
    log: str
    active: bool
    problem: str | None
    waiting_again: bool  # the job was requeued and waits to run the stage again


def last_error_line(path: Path) -> str:
    """The last exception line of a job log (else its last line): what went wrong, in one line."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    errors = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (errors or lines or [""])[-1]


def stage_problem(run_dir: Path, state: StageState, record: dict, infos: dict[str, JobInfo]) -> str | None:
    """Why a stage whose jobs ended is not done, when the stage itself did not record it (or recorded only
    that it was preempted, and the job then ended instead of being requeued)."""
    if state.status == "done" or (state.status == "failed" and not (state.error or "").startswith(PREEMPTED)):
        return None
    main = infos.get(record["job_id"])
    parts = infos.get(record.get("array_job_id") or "")
    if parts is not None and parts.finished and parts.state != "COMPLETED":
        log = Path(run_dir) / record.get("array_log", "")
        return f"array job {parts.job_id} {parts.describe()}: {last_error_line(log)}".rstrip(": ")
    if main is None or not main.finished:
        return None
    if main.state == "COMPLETED":
        return f"Slurm job {main.job_id} completed but the stage recorded no result"
    if main.state == "CANCELLED" and state.status == "pending":
        return None  # never started (cancelled, or a parent failed): still pending
    line = last_error_line(Path(run_dir) / record.get("log", ""))
    return f"Slurm job {main.job_id} {main.describe()}" + (f": {line}" if line else "")


def slurm_views(run_state: RunState) -> dict[str, SlurmView]:
    records = recorded_jobs(run_state)
    infos = query_jobs(job for record in records.values() for job in record_job_ids(record))
    views = {}
    for name, record in records.items():
        state = run_state.read(name)
        main, parts = infos[record["job_id"]], infos.get(record.get("array_job_id") or "")
        shown = f"parts {parts.describe()}" if parts is not None and parts.active else main.describe()
        job = f"{record['job_id']}" + (f" (parts {parts.job_id})" if parts is not None else "")
        views[name] = SlurmView(job, shown, record.get("log", "-"), main.active or bool(parts and parts.active),
                                stage_problem(run_state.run_dir, state, record, infos) if state else None,
                                main.active and main.state not in ("RUNNING", "COMPLETING") and bool(
                                    state and state.status in ("running", "failed")))
    return views


def reconcile(run_state: RunState) -> list[str]:
    """Mark stages whose jobs ended without a result as failed, with Slurm's reason; returns their names."""
    changed = []
    for name, view in slurm_views(run_state).items():
        state = run_state.read(name)
        if view.problem and state is not None and state.status != "done" and state.error != view.problem:
            state.status, state.error, state.ended_at = "failed", view.problem, now_iso()
            run_state.write(state)
            changed.append(name)
    return changed


def active_jobs(run_state: RunState, stages: list[str] | None = None) -> dict[str, list[str]]:
    """stage -> its queued or running job ids."""
    records = recorded_jobs(run_state, stages)
    if not records:
        return {}
    infos = query_jobs(job for record in records.values() for job in record_job_ids(record))
    active = {name: [job for job in record_job_ids(record) if infos[job].active] for name, record in records.items()}
    return {name: jobs for name, jobs in active.items() if jobs}


def refuse_if_active(run_state: RunState, stages: list[str]) -> None:
    """Running a stage here while its Slurm job may still run would mix two runs' outputs."""
    active = active_jobs(run_state, stages)
    if active:
        listing = ", ".join(f"{name} (job {' '.join(jobs)})" for name, jobs in active.items())
        raise KopeError(f"{run_state.run_dir}: stages still queued or running on Slurm: {listing}; "
                        f"wait for them or run `kope cancel {run_state.run_dir}`")


def cancel_run(run_dir: Path, wait_s: float = CANCEL_WAIT_S) -> dict[str, list[str]]:
    """Cancel every queued or running job of the run and wait until Slurm has ended them."""
    run_state = RunState(run_dir)
    if not run_state.state_dir.is_dir():
        raise KopeError(f"{run_dir}: not a run directory (no state/ folder)")
    active = active_jobs(run_state)
    cancel_jobs(job for jobs in active.values() for job in jobs)
    deadline = time.monotonic() + wait_s
    while active_jobs(run_state, list(active)) and time.monotonic() < deadline:
        time.sleep(1.0)
    reconcile(run_state)
    return active
