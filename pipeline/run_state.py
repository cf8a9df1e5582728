"""Per-stage state files in ``<run_dir>/state/``: the single source of truth for what is done.

Each file is replaced atomically, and ``done`` is written only after the stage's outputs are complete,
so a process killed at any moment leaves either the old state or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline.fsutil import atomic_write_json

Status = Literal["pending", "running", "done", "failed"]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StageState:
    stage: str
    kind: str
    status: Status = "pending"
    config_hash: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    attempt: int = 0
    host: str | None = None
    pid: int | None = None
    error: str | None = None
    traceback: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def mark_running(self) -> None:
        self.status, self.attempt = "running", self.attempt + 1
        self.started_at, self.ended_at, self.duration_s = now_iso(), None, None
        self.host, self.pid, self.error, self.traceback = socket.gethostname(), os.getpid(), None, None
        self._t0 = time.monotonic()

    def mark_finished(self, status: Status) -> None:
        self.status, self.ended_at = status, now_iso()
        start = getattr(self, "_t0", None)
        self.duration_s = round(time.monotonic() - start, 3) if start is not None else None


class RunState:
    """Reads and writes the state files of one run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.state_dir = self.run_dir / "state"
        self.log_dir = self.run_dir / "logs"

    def path(self, stage: str) -> Path:
        return self.state_dir / f"{stage}.json"

    def read(self, stage: str) -> StageState | None:
        path = self.path(stage)
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(StageState)}
        return StageState(**{key: value for key, value in data.items() if key in known})

    def write(self, state: StageState) -> None:
        atomic_write_json(self.path(state.stage), dataclasses.asdict(state))

    def stage_names(self) -> list[str]:
        return sorted(path.stem for path in self.state_dir.glob("*.json"))
