"""What a run directory records about each stage: its status, identity, inputs, outputs, errors and jobs.

A stage is ``done`` only when its state file says so, and that file is written last, atomically (see
:class:`pipeline.core.run_dir.RunDir`), so a process killed at any moment leaves the old state or the new one.
``interrupted`` means a stop signal ended the stage after it saved what it had (a checkpoint): running the same
command again continues it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Status = Literal["pending", "running", "done", "failed", "interrupted"]
STATUSES: tuple[str, ...] = ("pending", "running", "done", "failed", "interrupted")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class JobRecord:
    """A stage's submission to a batch scheduler (Slurm): what ``kope status`` and ``kope cancel`` follow."""

    job_id: str
    log: str  # the job's stderr log, relative to the run directory
    config: str  # the config snapshot the job's processes read, relative to the run directory
    submitted_at: str = ""
    profile: str = ""
    nodes: int = 1
    tasks_per_node: int = 1
    array_job_id: str | None = None  # the parts' array job, for kinds that split into parts
    array_tasks: int = 0
    array_log: str | None = None
    scheduler: str = "slurm"

    def job_ids(self) -> list[str]:
        return [job for job in (self.array_job_id, self.job_id) if job]


@dataclass
class StageState:
    stage: str
    kind: str
    status: Status = "pending"
    identity: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    config: str | None = None  # the config snapshot of the latest attempt, relative to the run directory
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    attempt: int = 0
    host: str | None = None
    pid: int | None = None
    error: str | None = None
    traceback: str | None = None
    job: JobRecord | None = None

    def mark_running(self) -> None:
        self.status, self.attempt = "running", self.attempt + 1
        self.started_at, self.ended_at, self.duration_s = now_iso(), None, None
        self.host, self.pid, self.error, self.traceback = socket.gethostname(), os.getpid(), None, None
        self._t0 = time.monotonic()

    def mark_finished(self, status: Status) -> None:
        self.status, self.ended_at = status, now_iso()
        start = getattr(self, "_t0", None)
        self.duration_s = round(time.monotonic() - start, 3) if start is not None else None

    def fail(self, error: str, traceback_file: str | None = None, status: Status = "failed") -> None:
        """Record why the stage did not finish (one line) and where its traceback is."""
        self.error, self.traceback = error, traceback_file
        self.mark_finished(status)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageState:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if isinstance(values.get("job"), dict):
            job_fields = {f.name for f in dataclasses.fields(JobRecord)}
            values["job"] = JobRecord(**{k: v for k, v in values["job"].items() if k in job_fields})
        if values.get("status") not in STATUSES:
            values["status"] = "failed"
        return cls(**values)


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message`` — how every failure is recorded and printed."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
