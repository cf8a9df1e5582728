"""The random generators a training step draws from: seeding, capture and restore for exact resume.

Drop-path, Mixup/CutMix and masking draw from the global torch, numpy and Python generators. Their state
after optimizer step s is saved with checkpoint s (per rank) and restored before step s + 1. The data
loader also touches the global torch generator (a DataLoader draws a base seed per epoch), at moments that
differ between an uninterrupted and a resumed run, so fetching batches runs inside :func:`isolated`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> dict[str, Any]:
    """The state of every global generator of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def isolated() -> Iterator[None]:
    """Run a block whose random draws leave the training generators where they were."""
    saved = capture()
    try:
        yield
    finally:
        restore(saved)
