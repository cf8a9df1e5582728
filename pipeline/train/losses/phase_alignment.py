"""KoPE's optional phase-alignment loss: the student's final patch phases should match the teacher's.

``−mean cos(θ_student − θ_teacher)`` over images, heads, patches and oscillators: −1 when every phase agrees,
and only phase differences count. The teacher sees the unmasked crop; no gradient reaches it.
"""

from __future__ import annotations

import torch


def phase_alignment_loss(student_phases: torch.Tensor, teacher_phases: torch.Tensor) -> torch.Tensor:
    """Angles of the same crops, (B, H, P, R) each (any equal shapes), in fp32."""
    if student_phases.shape != teacher_phases.shape:
        raise ValueError(f"phase alignment: student phases {tuple(student_phases.shape)} and teacher phases "
                         f"{tuple(teacher_phases.shape)} differ in shape")
    return -torch.cos(student_phases.float() - teacher_phases.detach().float()).mean()
