"""Top-k accuracy, the one number every classification protocol reports."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """How many rows of ``scores`` (N×C) have their label among the k highest scores, for each k.

    k larger than the number of classes counts every row as correct, as timm's ``accuracy`` does.
    """
    ks = list(ks)
    k_max = min(max(ks), scores.shape[-1])
    top = scores.topk(k_max, dim=-1).indices
    hits = top.eq(labels.view(-1, 1))
    return {k: int(hits[:, : min(k, k_max)].any(dim=-1).sum()) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` as fractions in [0, 1]."""
    counts = topk_correct(scores, labels, ks)
    total = max(int(labels.numel()), 1)
    return {f"top{k}": count / total for k, count in counts.items()}
