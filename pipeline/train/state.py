"""The parts of a training run's state that are not the engine's, each with ``state_dict`` / ``load_state_dict``
so the checkpoint (:mod:`pipeline.checkpoint.store`) saves and restores them by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.train import rng
from pipeline.train.metrics import MeanWindow


@dataclass
class Progress:
    """Completed optimizer steps and the samples they consumed (over all ranks)."""

    step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])


class RunMeters:
    """The first and last logged loss and the averaging window of the next log line: saved, so the first line
    after a resume averages the same micro-batches as an uninterrupted run's."""

    def __init__(self, window: MeanWindow, rank: int):
        self.window, self.rank = window, rank
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def logged(self, loss: float) -> None:
        self.last_loss = loss
        self.first_loss = loss if self.first_loss is None else self.first_loss

    def state_dict(self) -> dict[str, Any]:
        """A collective under several ranks (the window sums over all of them)."""
        return {"first_loss": self.first_loss, "last_loss": self.last_loss, "window": self.window.totals()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.first_loss, self.last_loss = state.get("first_loss"), state.get("last_loss")
        self.window.load_totals(dict(state.get("window", {})), keep=self.rank == 0)


class RngState:
    """This rank's random generators: captured at a save, restored right before the next step runs (what
    happens in between, building the model and loader, draws numbers of its own)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng.capture()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = dict(state)

    def apply(self) -> bool:
        """Restore the loaded generators; False when there was nothing to restore."""
        if self.pending is None:
            return False
        rng.restore(self.pending)
        self.pending = None
        return True
