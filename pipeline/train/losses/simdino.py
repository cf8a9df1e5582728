"""SimDINO: DINO's objective with the prototype layer, centring and sharpening replaced by a coding rate.

Loss = −w·(compression) − (expansion) on L2-normalised head features (Wu et al. 2025, "Simplifying DINO via
Coding Rate Regularization"):

* compression: the mean cosine similarity between the teacher's global views and the student's other views
  (the DINO pairs);
* expansion: the coding rate ``R(Z) = ½·logdet(I + p/(n·ε)·ZᵀZ)`` of the global views' features (the mean of
  student and teacher, as SimDINOv2's recipe does), which is large when the n features spread over all p
  directions and small when they collapse, so it stands in for DINO's anti-collapse machinery. It is scaled
  by SimDINO's balancing factor ``(p + n)/(p·n)``.

ε is used as in SimDINO's code (the scale is ``p/(n·ε)``, ε = 0.05 in the paper's recipe). Unlike SimDINO's
default, ``ZᵀZ`` is summed over ranks, so the coding rate is that of the global batch (n = all ranks' rows):
the loss, and the gradient after the engine's averaging, do not depend on how the batch is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.losses.collectives import all_reduce_sum, world_size


def coding_rate(features: torch.Tensor, eps: float, across_ranks: bool = False) -> torch.Tensor:
    """``½·logdet(I + p/(n·ε)·ZᵀZ)`` per leading index of ``features`` (…, n, p), in fp32 (Cholesky: stable).

    ``across_ranks``: Z is every rank's rows together (n = world size × local n); the result is the same
    on every rank and gradients flow back to each rank's own rows.
    """
    z = features.float()
    rows, dim = z.shape[-2], z.shape[-1]
    covariance = z.transpose(-2, -1) @ z
    if across_ranks:
        covariance = all_reduce_sum(covariance)
        rows *= world_size()
    identity = torch.eye(dim, device=z.device, dtype=z.dtype)
    factor, info = torch.linalg.cholesky_ex(identity + (dim / (rows * eps)) * covariance)
    half_logdet = factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    # A failed factorisation (non-finite features) gives NaN, which the engine counts and skips.
    return torch.where(info == 0, half_logdet, torch.nan)


class SimDinoLoss(nn.Module):
    """SimDINO's CLS objective: no state, no temperatures."""

    def __init__(self, eps: float = 0.05, compression_weight: float = 1.0):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"coding-rate eps must be > 0, got {eps}")
        self.eps = eps
        self.compression_weight = compression_weight

    def forward(
        self, student: list[torch.Tensor], teacher: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``student``: one (B, p) feature batch per view, the teacher's global views first; ``teacher``: one
        per global view. Returns the loss and its two terms (detached)."""
        pairs = [(i, v) for i in range(len(teacher)) for v in range(len(student)) if v != i]
        if not pairs:
            raise ValueError("SimDINO loss needs at least two views (a teacher view and another student view)")
        compression = sum(F.cosine_similarity(teacher[i].float(), student[v].float(), dim=-1).mean()
                          for i, v in pairs) / len(pairs)
        smoothed = torch.stack([(s.float() + t.float()) / 2 for s, t in zip(student, teacher)])
        rows, dim = smoothed.shape[-2] * world_size(), smoothed.shape[-1]
        expansion = coding_rate(smoothed, self.eps, across_ranks=True).mean() * (dim + rows) / (dim * rows)
        loss = -self.compression_weight * compression - expansion
        return loss, {"compression": compression.detach(), "expansion": expansion.detach()}
