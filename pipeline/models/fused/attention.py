"""Fused KoPE attention as a torch custom op with autograd: ``kope_attention(q, k, v, phasor)``.

It computes what ``KopeAttention`` computes between its qkv projection and its output projection — rotate q, k, v
by the block's phasor, softmax attention with scale ``1/sqrt(D)``, multiply the output by the conjugate phasor —
in the Triton kernels of ``kernels``, with the exact gradients of q, k, v and the phasor (the phasor's feed the
phase mix). The ops are opaque to ``torch.compile`` (``custom_op`` with fake implementations), so a compiled
model keeps one graph around them; ``triton_op`` would let the compiler trace into the kernels instead, which
under the CPU interpreter would run them on fake tensors.
"""

from __future__ import annotations

import math

import torch
import triton
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from pipeline.models.fused import kernels

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 128)

_LOG2_E = math.log2(math.e)


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``: CUDA (compute capability 8.0 or newer) with compiled
    Triton kernels, or the CPU when the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1``
    set before ``pipeline.models.fused`` was first imported)."""
    device = torch.device(device)
    if kernels.interpreted():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def kope_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phasor: torch.Tensor, rotate_vo: bool = True
) -> torch.Tensor:
    """Phase-rotated softmax self-attention, fused.

    ``q``, ``k``, ``v``: ``(B, H, N, D)`` with any strides (views of a ``(B, N, 3, H, D)`` projection need no copy),
    channels as interleaved pairs. ``phasor``: ``(B|1, H|1, N, D)`` laid out ``[cos (D/2) | sin (D/2)]`` — the
    block's rotation ``(…, N, 2, R)`` flattened over its last two dims, not necessarily unit. ``rotate_vo``: rotate v
    too and multiply the output by the conjugate phasor (False: only q and k are rotated).

    Returns ``(B, H, N, D)`` in q's dtype, stored token-major, so ``out.transpose(1, 2).reshape(B, N, H·D)`` — what
    the output projection takes — is a view.
    """
    _check_inputs(q, k, v, phasor)
    return _forward_op(q, k, v, phasor, rotate_vo)[0]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phasor: torch.Tensor) -> None:
    """One-line errors for inputs the kernels cannot take, before any launch."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one dtype of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"fused KoPE attention supports head dims {HEAD_DIMS}, got {d}")
    if phasor.dim() != 4 or phasor.shape[0] not in (1, b) or phasor.shape[1] not in (1, h) \
            or phasor.shape[2:] != (n, d):
        raise ValueError(f"phasor must be (B|1, H|1, N, D) = ({b}|1, {h}|1, {n}, {d}), got {tuple(phasor.shape)}")
    if not phasor.is_floating_point():
        raise ValueError(f"phasor must be a floating-point tensor, got {phasor.dtype}")
    if not q.device == k.device == v.device == phasor.device:
        raise ValueError(f"q, k, v and phasor must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{phasor.device}")
    if not torch.compiler.is_compiling() and not available(q.device):  # eager: graphs need no device query
        raise RuntimeError(f"fused KoPE attention cannot run on {q.device} (CUDA with Triton, or the CPU with "
                           "TRITON_INTERPRET=1 set before import)")


def _tiles(head_dim: int) -> tuple[int, int, int, int]:
    """(forward query tile, forward key tile, backward query tile, backward key tile), not tuned.

    The interpreter gets the smallest tiles ``tl.dot`` takes, so small test inputs already span several tiles.
    """
    if kernels.interpreted():
        return 16, 16, 16, 16
    if head_dim <= 64:
        return 128, 64, 64, 64
    return 64, 64, 32, 32


def _token_major(like: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, H, N, D)`` tensor laid out ``(B, N, H, D)`` in memory, as the projections want it."""
    b, h, n, d = like.shape
    return like.new_empty((b, n, h, d)).transpose(1, 2)


def _as_token_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when already token-major (the usual case: a gradient through the output projection)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _shared_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phasor: torch.Tensor,
                 token_major: torch.Tensor) -> list:
    """Strides of q, k, v, the phasor (0 where it broadcasts) and the token-major tensors, then H, N and the
    score scale in base-2 units: the arguments every kernel takes after its pointers."""
    b, h, n, d = q.shape
    strides = [*q.stride(), *k.stride(), *v.stride(), *phasor.expand(b, h, n, d).stride(), *token_major.stride()[:3]]
    return [*strides, h, n, d**-0.5 * _LOG2_E]


@torch.library.custom_op("kope::fused_attention_forward", mutates_args=(), device_types=("cuda", "cpu"))
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phasor: torch.Tensor, rotate_vo: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and its base-2 log-sum-exp rows ``(B, H, N)`` fp32 (saved for the backward)."""
    b, h, n, d = q.shape
    out, lse = _token_major(q), q.new_empty((b, h, n), dtype=torch.float32)
    block_m, block_n, _, _ = _tiles(d)
    kernels.attention_forward_kernel[(triton.cdiv(n, block_m), b * h)](
        q, k, v, phasor, out, lse, *_shared_args(q, k, v, phasor, out),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, ROTATE_VO=rotate_vo,
        WIDEN_DOTS=kernels.interpreted(), num_warps=4 if d <= 64 else 8,
    )
    return out, lse


@_forward_op.register_fake
def _forward_fake(q, k, v, phasor, rotate_vo):
    b, h, n, _ = q.shape
    return _token_major(q), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("kope::fused_attention_backward", mutates_args=(), device_types=("cuda", "cpu"))
def _backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phasor: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, rotate_vo: bool, phasor_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (token-major, q's dtype) and the phasor's gradient, summed over its broadcast dims (an empty
    tensor when ``phasor_grad`` is False: the kernels then skip that work)."""
    b, h, n, d = q.shape
    grad_out = _as_token_major(grad_out)
    dq, dk, dv = _token_major(q), _token_major(q), _token_major(q)
    delta = torch.empty_like(lse)
    grad_phasor = q.new_empty((b, h, n, d) if phasor_grad else (0,), dtype=torch.float32)
    _, _, block_m, block_n = _tiles(d)
    shared = _shared_args(q, k, v, phasor, out)
    consts = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, ROTATE_VO=rotate_vo, PHASOR_GRAD=phasor_grad,
                  WIDEN_DOTS=kernels.interpreted(), num_warps=4 if d <= 64 else 8)
    # dq first: it writes delta and the query side of the phasor gradient, which the dk/dv kernel reads
    kernels.attention_backward_dq_kernel[(triton.cdiv(n, block_m), b * h)](
        q, k, v, phasor, out, grad_out, lse, delta, dq, grad_phasor, *shared, d**-0.5, **consts)
    kernels.attention_backward_dkdv_kernel[(triton.cdiv(n, block_n), b * h)](
        q, k, v, phasor, grad_out, lse, delta, dk, dv, grad_phasor, *shared, d**-0.5, **consts)
    if phasor_grad:
        grad_phasor = grad_phasor.sum_to_size(phasor.shape).to(phasor.dtype)
    return dq, dk, dv, grad_phasor


@_backward_op.register_fake
def _backward_fake(q, k, v, phasor, out, lse, grad_out, rotate_vo, phasor_grad):
    grad_phasor = phasor.new_empty(phasor.shape) if phasor_grad else q.new_empty((0,), dtype=torch.float32)
    return _token_major(q), _token_major(q), _token_major(q), grad_phasor


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, phasor, ctx.rotate_vo = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, phasor, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, phasor, out, lse = ctx.saved_tensors
    phasor_grad = ctx.needs_input_grad[3]
    dq, dk, dv, grad_phasor = _backward_op(q, k, v, phasor, out, lse, grad_out, ctx.rotate_vo, phasor_grad)
    return dq, dk, dv, grad_phasor if phasor_grad else None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.kope.fused_attention_forward)
def _forward_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """The model FLOPs of attention, as torch counts them for SDPA (the rotations are element-wise), so a model's
    FLOP count and MFU are the same on either attention path."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.kope.fused_attention_backward)
def _backward_flops(q_shape, k_shape, v_shape, phasor_shape, out, lse, grad_out_shape, *args, out_shape=None,
                    **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape)
