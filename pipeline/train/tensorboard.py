"""TensorBoard scalars, written by rank 0 only.

Every run reopens the folder with ``purge_step`` = the step it starts after + 1: events a killed run wrote
after its last checkpoint (or before its first) are hidden by TensorBoard, so every curve shows each step once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class ScalarLog:
    """Groups of scalars per step (``train/loss``, ``opt/lr``, ...); a no-op on ranks other than 0."""

    def __init__(self, log_dir: Path, enabled: bool, resume_step: int = 0):
        self._writer = None
        if enabled:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1)

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(f"{prefix}{name}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
