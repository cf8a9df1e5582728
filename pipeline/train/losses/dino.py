"""Classic DINO self-distillation: cross-entropy from a centred, sharpened teacher to the student.

The teacher's prototype scores are centred (an EMA of their mean over the global batch is subtracted) and
sharpened (a low temperature); centring alone would flatten the targets to uniform, sharpening alone would
let one prototype win every image; together they avoid both collapses (DINO, Caron et al. 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.losses.collectives import all_reduce_sum_


class Centering(nn.Module):
    """The teacher-output centre: an EMA of the mean teacher score vector over all ranks' rows."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"center momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """``softmax((t − c) / τ_teacher)`` in fp32."""
        return F.softmax((teacher_logits.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """``c ← m·c + (1 − m)·mean(t)``, the mean over every rank's rows; no rows anywhere: unchanged. Decided on
        the device (no host read of the row count)."""
        rows = teacher_logits.detach().float().reshape(-1, self.center.numel())
        count = torch.full((1,), float(rows.shape[0]), device=rows.device)
        stats = all_reduce_sum_(torch.cat([rows.sum(0), count]))
        count = stats[-1]
        moved = self.momentum * self.center + (1.0 - self.momentum) * (stats[:-1] / count.clamp_min(1.0))
        self.center.copy_(torch.where(count > 0, moved, self.center))


def cross_view_cross_entropy(
    student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """Mean over pairs (teacher view i, student view v ≠ i) of the batch-mean ``H(t_i, softmax(s_v / τ))``.

    Student view i (i < number of teacher views) is the crop teacher view i saw, so those pairs are skipped.
    """
    pairs = [(i, v) for i in range(len(teacher_probs)) for v in range(len(student_logits)) if v != i]
    if not pairs:
        raise ValueError("DINO loss needs at least two views (a teacher view and another student view)")
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total = sum(-(teacher_probs[i] * log_probs[v]).sum(-1).mean() for i, v in pairs)
    return total / len(pairs)


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warm-up from ``start`` to ``end`` over ``warmup_steps`` steps, then ``end``: a teacher too sharp
    at the start of training makes the first targets arbitrary."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


class DinoLoss(nn.Module):
    """DINO's CLS objective; its state is the centre (saved with the task for exact resume)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.centering = Centering(out_dim, center_momentum)

    def forward(
        self, student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor], teacher_temp: float
    ) -> torch.Tensor:
        """Loss against targets from the current centre; then the centre moves toward this batch."""
        targets = [self.centering.targets(t, teacher_temp) for t in teacher_logits]
        loss = cross_view_cross_entropy(student_logits, targets, self.student_temp)
        self.centering.update(torch.cat(teacher_logits))
        return loss
