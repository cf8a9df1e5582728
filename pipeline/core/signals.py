"""Stop signals: the one list of signals that ask a run to stop, and how each kind of process treats them.

* A stage process turns the first stop signal into :class:`Interrupted` (a training stage installs its own
  handler instead, so it can finish the step and save a checkpoint first).
* Worker processes (data-loader workers, shard-writer pools) ignore them: the process that owns them decides,
  and a stop never turns into a worker failure.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from pipeline.core.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def ignore_stop_signals() -> None:
    """For worker processes: leave stopping to the process that started them."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"{signal.Signals(signum).name} received: stopped; run the same command again to resume")


@contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """Inside the block the first stop signal raises :class:`Interrupted` in the main thread."""
    previous: dict[int, Any] = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
