"""KoPE analysis metrics of the class token's attention, per block and head.

* Gini concentration of the CLS attention ``p`` over all N keys: 0 for uniform, (n−1)/n for one-hot.
* Attention-weighted phase synchrony ``R = mean_c |Σ_j p_j·e^{iψ[j, c]}|`` over the R oscillators of a
  head, with ψ the rotation phases the block used: 1 when the attended tokens share their phases.
* Attention entropy ``−Σ p·log(p + 1e-6)``.

The inputs come from ``KopeVisionTransformer.forward_cls_attention`` (a separate pass, so training forwards
carry no probes); models without phases get Gini and entropy only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["gini", "attention_entropy", "phase_synchrony", "attention_metrics", "metrics_to_json", "analyse"]

GINI_EPS = 1e-6
ENTROPY_EPS = 1e-6


def gini(p: torch.Tensor) -> torch.Tensor:
    """Gini concentration over the last dim: ``Σ_k (2k − n − 1)·p_(k) / (n·Σp + 1e-6)``, p sorted ascending."""
    n = p.shape[-1]
    ordered = p.sort(dim=-1).values
    rank = torch.arange(1, n + 1, device=p.device, dtype=p.dtype)
    return ((2 * rank - n - 1) * ordered).sum(-1) / (n * ordered.sum(-1) + GINI_EPS)


def attention_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of attention rows over the last dim (nats)."""
    return -(p * torch.log(p + ENTROPY_EPS)).sum(-1)


def phase_synchrony(p: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``mean_c |Σ_j p_j e^{iψ[j, c]}|`` for weights ``p`` (..., N) and phases ``psi`` (..., N, R)."""
    weights = p.unsqueeze(-1)
    re = (weights * psi.cos()).sum(-2)
    im = (weights * psi.sin()).sum(-2)
    return torch.sqrt(re.square() + im.square()).mean(-1)


def attention_metrics(probes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metrics of shape (L, B, H) from ``forward_cls_attention``'s ``cls_attention`` (L×B×H×N) and, when
    present, ``rotation_phases`` (L×B×H×N×R)."""
    p = probes["cls_attention"].float()
    metrics = {"gini": gini(p), "entropy": attention_entropy(p)}
    if "rotation_phases" in probes:
        metrics["synchrony"] = phase_synchrony(p, probes["rotation_phases"].float())
    return metrics


def metrics_to_json(metrics: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Batch means as plain lists: per metric ``per_block_head`` (L×H), ``per_block`` (L) and ``mean``."""
    out: dict[str, Any] = {}
    for name, values in metrics.items():
        per_block_head = values.float().mean(dim=1)
        out[name] = {
            "per_block_head": per_block_head.tolist(),
            "per_block": per_block_head.mean(dim=-1).tolist(),
            "mean": float(per_block_head.mean()),
        }
    return out


@torch.no_grad()
def analyse(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """JSON-ready metrics of a KoPE/ViT/SSA model (in eval mode) on a batch of normalised images."""
    was_training = model.training
    model.eval()
    try:
        return metrics_to_json(attention_metrics(model.forward_cls_attention(images)))
    finally:
        model.train(was_training)
