"""iBOT's masked-patch objective: the student, seeing a mask token, predicts the teacher's view of the patch.

Both forms weight every masked patch by 1/(masked patches of its image) and divide by the number of images,
masked or not, as DINOv2 does: each masked image counts once whatever its mask size, and the recipes' loss
weights keep their meaning.

* ``IbotLoss`` (with DINO): cross-entropy to centred, sharpened teacher prototype scores, with its own centre;
* ``masked_patch_cosine_loss`` (with SimDINO): minus the cosine similarity of normalised patch features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.losses.dino import Centering


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """``1 / (masked patches in its image)`` for every masked patch, in ``masks[masks]`` order (row-major)."""
    counts = masks.sum(-1, keepdim=True).clamp_min(1).float()
    return (1.0 / counts).expand(masks.shape)[masks]


def _weighted_mean(per_patch: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return (per_patch * masked_patch_weights(masks)).sum() / masks.shape[0]


def masked_patch_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``student``/``teacher``: (M, p) features of the M masked patches (``masks[masks]`` order); ``masks``:
    (images, patches) bool."""
    return -_weighted_mean(F.cosine_similarity(student.float(), teacher.float(), dim=-1), masks)


class IbotLoss(nn.Module):
    """iBOT's patch cross-entropy; its state is the patch centre (saved with the task for exact resume)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.centering = Centering(out_dim, center_momentum)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, masks: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """(M, K) scores of the masked patches; the centre then moves toward the teacher's masked-patch mean."""
        targets = self.centering.targets(teacher_logits, teacher_temp)
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        loss = _weighted_mean(-(targets * log_probs).sum(-1), masks)
        self.centering.update(teacher_logits)
        return loss
