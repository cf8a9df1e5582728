"""Exponential moving average of a model's weights (DeiT-III evaluates its EMA weights).

The average lives outside the DeepSpeed engine, in fp32 on the weights' device, and is updated after every
applied optimizer step. It needs the full weights on every rank, which ZeRO stages 0–2 keep; under ZeRO-3
each rank holds only a shard, so EMA is refused there.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class ModelEma:
    """``ema ← decay·ema + (1 − decay)·weights`` for every floating parameter and buffer of ``module``."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: tensor.detach().float().clone() for name, tensor in module.state_dict().items()
                       if tensor.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step; the average moves to the weights' device the first time (the module is built on the
        CPU and moved to its GPU by DeepSpeed)."""
        current = module.state_dict()
        names = list(self.shadow)
        device = current[names[0]].device
        if self.shadow[names[0]].device != device:
            self.shadow = {name: tensor.to(device) for name, tensor in self.shadow.items()}
        targets = [self.shadow[name] for name in names]
        sources = [current[name].detach().float() for name in names]
        torch._foreach_lerp_(targets, sources, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)

    def weights_for(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state dict with the averaged tensors in place of the trained ones."""
        return {name: self.shadow[name].to(tensor.dtype) if name in self.shadow else tensor.detach()
                for name, tensor in module.state_dict().items()}
