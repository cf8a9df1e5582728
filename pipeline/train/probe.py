"""Logging-only forwards (γ and phase synchrony on a few training images) outside the DeepSpeed engine.

Under ZeRO-3 every submodule forward, inside the engine or not, enters DeepSpeed's parameter-fetch trace: a forward
outside the training step records modules into the next step's trace, and that step's backward then fails
("tracing error at step ..."), for instance on the first logged step after a resume. So under ZeRO-3 the probe
runs on a plain copy of the module, made before DeepSpeed partitions it and refreshed from the gathered weights at
each use; under stages 0–2 it runs on the trained module itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pipeline.train.engine import gathered_parameters


class ProbeModule:
    """Where a task's logging-only forward runs; build it in ``build_module``, before ``deepspeed.initialize``."""

    def __init__(self, module: nn.Module, zero_stage: int):
        self.copy = copy.deepcopy(module).requires_grad_(False).eval() if zero_stage == 3 else None

    @contextmanager
    def __call__(self, engine: Any, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` (a part of ``engine.module``) itself, or its refreshed copy under ZeRO-3."""
        if self.copy is None:
            yield module
            return
        with gathered_parameters(engine), torch.no_grad():
            self.copy.to(engine.device).load_state_dict(module.state_dict())
        yield self.copy
