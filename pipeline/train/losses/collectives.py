"""Sums over the ranks of the default process group, so a loss sees global-batch statistics.

Every function is the identity on one process (no process group), so losses run unchanged in tests,
notebooks and single-GPU runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, keeping the autograd graph: the backward sums the incoming gradients over ranks too.

    Every rank then holds the global value and, after the engine averages gradients over ranks, each
    parameter gets the gradient of that global value (the factor world size of the backward cancels the
    engine's 1/world size).
    """
    if world_size() == 1:
        return tensor
    return dist_nn.all_reduce(tensor)


@torch.no_grad()
def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a statistic no gradient flows through (a centre, a count)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
