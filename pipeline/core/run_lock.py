"""One ``kope run`` per run directory at a time, and never while processes of an earlier one still run.

The lock is an ``flock`` on ``<run_dir>/.lock``: the kernel drops it when its holder dies, so a lock left by a
killed process is noticed instead of blocking the next run forever. The file records who holds it and the PIDs
of the stage processes it started (with their start times, so a reused PID is not mistaken for them). A lock left
by a dead ``kope run`` is taken over only when none of those processes is alive on this host; otherwise the new
run refuses and names them.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from pipeline.core.errors import LockedError
from pipeline.core.run_state import now_iso


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat); None when no such process runs (a zombie
    waiting to be reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None
        self.stale_holder: dict | None = None
        self._record: dict = {}

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder else "?"
            raise LockedError(f"{self.path.parent}: another kope run holds this run directory ({who}); "
                              "wait for it or use another --run-dir") from None
        holder = _read_holder(fd) or None
        alive = _alive_stage_processes(holder)
        if alive:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise LockedError(f"{self.path.parent}: the kope run that held this run directory (pid "
                              f"{holder.get('pid')}) is gone, but its stage processes {' '.join(map(str, alive))} "
                              "still run; wait for them to end or kill them") from None
        self.stale_holder = holder
        self._fd = fd
        self._record = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(), "stage_processes": []}
        self._write()
        return self

    def record_processes(self, pids: list[int]) -> None:
        """Note the stage processes now running (an executor's ``StageProcesses`` calls this)."""
        if self._fd is None:
            return
        self._record["stage_processes"] = [{"pid": pid, "start": process_start_time(pid)} for pid in pids]
        self._write()

    def _write(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(self._record).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}


def _alive_stage_processes(holder: dict | None) -> list[int]:
    """PIDs recorded by a dead holder on this host that still belong to the same processes."""
    if not holder or holder.get("host") != socket.gethostname():
        return []
    return [entry["pid"] for entry in holder.get("stage_processes", [])
            if entry.get("start") is not None and process_start_time(entry["pid"]) == entry["start"]]
