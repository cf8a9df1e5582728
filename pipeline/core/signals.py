"""Stop signals: the one list of signals that ask a run to stop, and how each kind of process treats them.

* ``kope run`` forwards the first one to every process of the running stage and starts no further stage; a
  second one within :data:`HARD_STOP_WINDOW_S` kills the stage's processes (see :mod:`pipeline.core.runner`).
* A stage process turns the first stop signal into :class:`Interrupted` (a training stage installs its own
  handler instead, so it can finish the step and save a checkpoint first).
* Worker processes (data-loader workers, shard-writer pools) ignore them: the process that owns them decides,
  and a stop never turns into a worker failure.
* A stage process dies with the process that started it (:func:`die_with_parent`), so no rank outlives a killed
  ``kope run``.
"""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from pipeline.core.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
HARD_STOP_WINDOW_S = 5.0
"""A second stop signal this soon after the first stops hard (no checkpoint); a later one starts a new window, so
a lone signal never interrupts a checkpoint that is being saved."""
PR_SET_PDEATHSIG = 1


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


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # the C library this interpreter already links
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # resolved here, in the parent: a preexec_fn must not load libraries between fork and exec


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere nothing happens). Used as a
    ``preexec_fn`` of stage processes, and safe to call again in the process itself."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
