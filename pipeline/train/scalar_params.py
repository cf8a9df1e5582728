"""0-dim parameters held as 1-element vectors while DeepSpeed trains them.

DeepSpeed 0.19's initial parameter broadcast views every parameter as bytes, which fails for 0-dim tensors
("self.dim() cannot be 0 to view Float as Byte") — KoPE's learnable Kuramoto step ρ and open_clip's logit
scale are such parameters. A task reshapes them to ``(1,)`` before the engine sees the module (broadcasting
keeps every use working) and gives exported tensors their original shape back, so timm and open_clip load
the export unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


def vectorize_scalar_parameters_(module: nn.Module) -> set[str]:
    """Reshape ``module``'s 0-dim parameters to ``(1,)`` in place; returns their names."""
    names = set()
    for name, param in module.named_parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)
            names.add(name)
    return names


def restore_scalars(named: Iterable[tuple[str, torch.Tensor]], names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors with those in ``names`` back to 0-dim."""
    for name, tensor in named:
        yield name, tensor.reshape(()) if name in names else tensor
