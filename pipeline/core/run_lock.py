"""One ``kope run`` per run directory at a time.

The lock is an ``flock`` on ``<run_dir>/.lock``: the kernel drops it when its holder dies, so a lock left
by a killed process is noticed (and reported) instead of blocking the next run forever. The file also
records who holds it, for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from pipeline.core.errors import LockedError
from pipeline.core.run_state import now_iso


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None
        self.stale_holder: dict | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder else "?"
            raise LockedError(f"{self.path.parent}: another kope run holds this run directory ({who}); "
                              "wait for it or use another --run-dir") from None
        self.stale_holder = _read_holder(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

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
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
