"""Fused KoPE attention: Triton FlashAttention kernels that rotate q, k, v and the output inside the kernel.

The plain PyTorch path (``pipeline.models.phase`` + SDPA) stays the reference and the CPU default; ``available``
says where this one runs. On the CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this package is imported), which is how its tests check it.
"""

from pipeline.models.fused.attention import HEAD_DIMS, available, kope_attention

__all__ = ["HEAD_DIMS", "available", "kope_attention"]
