"""Optimizers: AdamW (torch) and LAMB (timm's pure-PyTorch version), never DeepSpeed's compiled ones.

DeepSpeed's FusedAdam/CPUAdam compile C++/CUDA code at first use; torch's AdamW (fused on CUDA) is as fast
for our sizes and starts at once. LAMB's trust ratio is a per-tensor norm, which ZeRO stages 1–3 break by
flattening tensors into partitions, so LAMB is refused there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import Lamb

from pipeline.train.settings import OptimSettings


@dataclass
class NonFiniteGuard:
    """What DeepSpeed's ZeRO and bf16 optimizers do, for the plain fp32 path that lacks it: measure the global
    gradient norm, clip, and skip the update (``overflow``) when the gradients are not finite."""

    max_norm: float
    overflow: bool = False
    _global_grad_norm: float | None = field(default=None, repr=False)

    def check(self, optimizer: torch.optim.Optimizer) -> bool:
        """True when the step may proceed; clips in place."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.max_norm > 0 and not self.overflow and norm > self.max_norm:
            torch._foreach_mul_(grads, self.max_norm / (norm + 1e-6))
        return not self.overflow


def _guarded(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` whose ``step`` is skipped on non-finite gradients, exposing ``overflow`` and ``_global_grad_norm``
    the way DeepSpeed reads them from its own optimizers."""

    class Guarded(cls):  # type: ignore[valid-type, misc]
        guard: NonFiniteGuard

        @property
        def overflow(self) -> bool:
            return self.guard.overflow

        @property
        def _global_grad_norm(self) -> float | None:
            return self.guard._global_grad_norm

        def step(self, closure: Any = None) -> Any:
            if not self.guard.check(self):
                return None
            return super().step(closure)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{cls.__name__}"
    return Guarded


def build_optimizer(groups: list[dict[str, Any]], settings: OptimSettings, zero_stage: int, device: torch.device,
                    guard_clip: float | None = None) -> torch.optim.Optimizer:
    """The torch optimizer over ``groups`` (their ``names`` are dropped). ``guard_clip`` not None wraps it in
    :class:`NonFiniteGuard` clipping to that norm (0: no clipping)."""
    if settings.name == "lamb" and zero_stage > 0:
        raise ValueError(f"optim.name lamb needs zero_stage 0: ZeRO stage {zero_stage} flattens parameters into "
                         "partitions, which breaks LAMB's per-tensor trust ratios; use adamw for ZeRO")
    params = [{key: value for key, value in group.items() if key != "names"} for group in groups]
    common = {"lr": settings.lr, "weight_decay": settings.weight_decay, "betas": tuple(settings.betas),
              "eps": settings.eps}
    if settings.name == "lamb":
        cls, kwargs = Lamb, {**common, "max_grad_norm": None}
    else:
        cls, kwargs = torch.optim.AdamW, {**common, "fused": True} if device.type == "cuda" else common
    if guard_clip is None:
        return cls(params, **kwargs)
    optimizer = _guarded(cls)(params, **kwargs)
    optimizer.guard = NonFiniteGuard(guard_clip)
    return optimizer
