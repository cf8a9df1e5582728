"""iBOT's masked-patch objective: the student, seeing a mask token, predicts the teacher's view of the patch.

Both forms weight every masked patch by 1/(masked patches of its image) and divide by the number of images,
masked or not, as DINOv2 does: each masked image counts once whatever its mask size, and the recipes' loss
weights keep their meaning. The masked patches arrive as index lists with their weights, built by the loader, so
nothing here depends on a device value's size.

* ``IbotLoss`` (with DINO): cross-entropy to centred, sharpened teacher prototype scores, with its own centre;
* ``masked_patch_cosine_loss`` (with SimDINO): minus the cosine similarity of normalised patch features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.losses.dino import Centering


def _weighted_mean(per_patch: torch.Tensor, weights: torch.Tensor, images: int) -> torch.Tensor:
    return (per_patch * weights).sum() / images


def masked_patch_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor,
                             images: int) -> torch.Tensor:
    """``student``/``teacher``: (M, p) features of the M masked patches; ``weights`` (M,): 1 / (masked patches of
    its image), as the loader builds them (:func:`pipeline.data.loaders_samples.masked_patch_index`); ``images``:
    how many images the patches come from, masked or not."""
    return -_weighted_mean(F.cosine_similarity(student.float(), teacher.float(), dim=-1), weights, images)


class IbotLoss(nn.Module):
    """iBOT's patch cross-entropy; its state is the patch centre (saved with the task for exact resume)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.centering = Centering(out_dim, center_momentum)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor, images: int,
        teacher_temp: float,
    ) -> torch.Tensor:
        """(M, K) scores of the masked patches, weighted as in :func:`masked_patch_cosine_loss`; the centre then
        moves toward the teacher's masked-patch mean."""
        targets = self.centering.targets(teacher_logits, teacher_temp)
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        loss = _weighted_mean(-(targets * log_probs).sum(-1), weights, images)
        self.centering.update(teacher_logits)
        return loss
