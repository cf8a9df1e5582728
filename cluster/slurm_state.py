"""What became of Slurm jobs, and cancelling them.

The controller (squeue) is asked first: it is current, and knows every task of an array job. The
accounting database (sacct) lags it by seconds: shortly after an array job starts or ends it may hold the
array's own record alone, which would pass for the whole job (one task done, or finished while other tasks
still run). So sacct answers only for jobs the controller has forgotten (older than ``MinJobAge``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.core.errors import KopeError

FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                      "DEADLINE", "PREEMPTED", "REVOKED"})
ACTIVE_ORDER = ("RUNNING", "COMPLETING", "REQUEUED", "PENDING")
QUERY_TIMEOUT_S = 60


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str  # a Slurm job state (RUNNING, COMPLETED, CANCELLED, ...) or UNKNOWN when nobody knows the job
    reason: str = ""  # why it waits or ended (Dependency, DependencyNeverSatisfied, "3/8 tasks done")
    exit_code: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def active(self) -> bool:
        return not self.finished and self.state != "UNKNOWN"

    def describe(self) -> str:
        """``PENDING (Dependency)``, ``FAILED (exit 1:0)``, ``RUNNING (3/8 tasks done)``."""
        if self.active or "tasks done" in self.reason:
            detail = "" if self.reason == "None" else self.reason
        else:
            detail = f"exit {self.exit_code}" if self.exit_code not in ("", "0:0") else ""
        return f"{self.state} ({detail})" if detail else self.state


Row = tuple[str, str, str, str]  # job id as printed, state, reason, exit code


def _run(cmd: list[str]) -> str | None:
    """stdout of a Slurm client command, or None when it is missing or fails (e.g. no accounting)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    return done.stdout if done.returncode == 0 else None


def _parse(text: str | None, fields: int) -> list[Row]:
    rows = []
    for line in (text or "").splitlines():
        parts = line.strip().split("|")
        if len(parts) >= fields and parts[0]:
            job, state, reason = parts[0], (parts[1].split() or ["UNKNOWN"])[0], parts[2]
            rows.append((job, state, reason, parts[3] if fields > 3 else ""))
    return rows


def _sacct(ids: list[str]) -> list[Row]:
    return _parse(_run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Reason,ExitCode", "-j", ",".join(ids)]), 4)


def _squeue(ids: list[str]) -> list[Row]:
    fields = "JobArrayID:|,State:|,Reason:|,exit_code:|"
    rows = _parse(_run(["squeue", "-h", "--states=all", "-O", fields, "-j", ",".join(ids)]), 4)
    return [(job, state, reason, _exit_code(status)) for job, state, reason, status in rows]


def _exit_code(wait_status: str) -> str:
    """squeue prints the raw wait status (768, 9); sacct's ``code:signal`` (3:0, 0:9) is what users know."""
    if not wait_status.isdigit():
        return wait_status
    status = int(wait_status)
    return f"{status >> 8}:{status & 0x7F}"


def _base_id(printed: str) -> str:
    return printed.split("_")[0].split("+")[0].split(".")[0]


def _task_count(printed: str) -> int:
    """``12_3`` is one array task; ``12_[4-7%2]`` stands for four pending ones."""
    match = re.search(r"\[([^\]%]+)", printed)
    if not match:
        return 1
    count = 0
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        count += int(high) - int(low) + 1 if high else 1
    return count


def _summarize(job_id: str, rows: list[Row]) -> JobInfo:
    """One job, or all tasks of an array job, as one state."""
    if len(rows) == 1 and "_" not in rows[0][0]:
        _, state, reason, exit_code = rows[0]
        return JobInfo(job_id, state, reason, exit_code)
    total = sum(_task_count(row[0]) for row in rows)
    done = sum(_task_count(row[0]) for row in rows if row[1] == "COMPLETED")
    states = {row[1] for row in rows}
    bad = [row for row in rows if row[1] in FINISHED and row[1] != "COMPLETED"]
    active = [state for state in ACTIVE_ORDER if state in states] or sorted(states - FINISHED)
    if active:
        state = active[0]
    else:
        state = bad[0][1] if bad else "COMPLETED"
    reason = f"{done}/{total} tasks done"
    if bad:
        reason += f"; {bad[0][1].lower()}: {', '.join(row[0] for row in bad[:3])}"
    return JobInfo(job_id, state, reason, bad[0][3] if bad else "")


def _group(rows: Iterable[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        grouped.setdefault(_base_id(row[0]), []).append(row)
    return grouped


def query_jobs(job_ids: Iterable[str]) -> dict[str, JobInfo]:
    """State of each job id (plain or array job id); UNKNOWN for ids no source knows."""
    ids = sorted({str(job_id) for job_id in job_ids if job_id})
    if not ids:
        return {}
    from_controller = _group(_squeue(ids))
    infos = {job_id: _summarize(job_id, from_controller[job_id]) for job_id in ids if job_id in from_controller}
    forgotten = [job_id for job_id in ids if job_id not in infos]
    if forgotten:
        from_accounting = _group(_sacct(forgotten))
        infos.update({job_id: _summarize(job_id, from_accounting[job_id])
                      for job_id in forgotten if job_id in from_accounting})
    return {job_id: infos.get(job_id, JobInfo(job_id, "UNKNOWN")) for job_id in ids}


def cancel_jobs(job_ids: Iterable[str]) -> None:
    ids = sorted({str(job_id) for job_id in job_ids if job_id})
    if not ids:
        return
    if shutil.which("scancel") is None:
        raise KopeError("scancel not found: cancelling needs the Slurm client commands on PATH")
    done = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["?"])[0]
        raise KopeError(f"scancel {' '.join(ids)} failed: {first}")
