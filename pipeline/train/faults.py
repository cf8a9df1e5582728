"""Faults during training: non-finite losses, and signals asking the job to stop.

* A non-finite loss on any rank skips the whole optimizer step on every rank: the loss is multiplied by NaN
  before backward, the reduced gradients are then non-finite everywhere, and DeepSpeed's optimizers (or
  :class:`pipeline.train.optim.NonFiniteGuard` on the plain fp32 path) skip the update. Skipped steps are
  counted; ``max_nonfinite_in_a_row`` of them in a row stop the stage with :class:`NonFiniteLossError`
  before another checkpoint is written, so the last checkpoint holds the last good weights.
* A stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1: see :mod:`pipeline.core.signals`) sets a flag; at the next
  step boundary every rank agrees to stop, a checkpoint is saved, and the stage raises :class:`Preempted`, which
  the stage process turns into exit status 75 (``EX_TEMPFAIL``: run it again to resume).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from pipeline.core.errors import Interrupted, KopeError
from pipeline.core.signals import HARD_STOP_WINDOW_S, STOP_SIGNALS


class Preempted(Interrupted):
    """The stage saved a checkpoint because it was asked to stop; running it again resumes from there."""


class NonFiniteLossError(KopeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def poison_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` unchanged when finite, else ``loss · NaN`` so every gradient it reaches is NaN. No host sync:
    the check stays on the device."""
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, torch.ones_like(loss), torch.full_like(loss, float("nan")))


class NonFiniteCounter:
    """Skipped steps in a row and in total; raises once the streak reaches the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient; "
                "the latest checkpoint holds the last good weights: lower the learning rate or check the data"
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


class StopRequest:
    """Remembers whether a stop signal arrived while :meth:`installed` is active. A second one within
    ``HARD_STOP_WINDOW_S`` stops at once, without a checkpoint (the previous one stays ``latest``)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._last: float | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last <= HARD_STOP_WINDOW_S:
            raise Interrupted(f"{signal.Signals(signum).name} again: stopped at once, without a checkpoint; run the "
                              "stage again to resume from the latest one")
        self.signal_name = self.signal_name or signal.Signals(signum).name
        self._last = now

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous: dict[int, Any] = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agreed(self, device: torch.device) -> str | None:
        """The name of the stop signal any rank received (None: carry on), the same on every rank (a
        collective: call on all ranks)."""
        number = signal.Signals[self.signal_name].value if self.signal_name else 0
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signal_name  # one rank: nothing to agree on, no device round trip
        flag = torch.tensor([number], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        received = int(flag.item())
        return signal.Signals(received).name if received else None
