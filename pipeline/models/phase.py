"""Phase maths of KoPE: 2-D RoPE initial phases, the per-head phase mix, rotations, the shared Kuramoto
coupling and its step.

Phases travel through the network as unit phasors, never as angles, so no block pays for trigonometry:
a phasor tensor has shape ``(B, H, N, 2R)`` with the last dimension laid out ``[cos θ (R) | sin θ (R)]``
(the coupling attention uses it directly as its values). A leading batch or head size of 1 broadcasts: the
initial phases are the same for every sample and head, so they stay ``(1, 1, N, 2R)`` until the first
Kuramoto step makes them sample-dependent.

Channels of q, k, v and the attention output are interleaved pairs: pair ``c`` of a head is
``a[2c] + i·a[2c+1]``, so a rotation reads the activation as ``(..., R, 2)`` with no gather.

Everything here is tensor code without data-dependent control flow, so ``torch.compile`` traces it into
one graph and fuses the element-wise work. The mix, the rotations, the Kuramoto step and the RMS norm are
autograd functions with hand-written backward passes, each the exact derivative of its forward for every input
(unit or clamped phasors): in eager mode they save only their inputs (or, for the RMS norm, its output) instead
of every fp32 intermediate, and recompute the cheap rest.
The phase arithmetic (mix, normalisation, retraction) runs in fp32 even under autocast; rotations run in the
activation dtype with fp32-computed cos/sin.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

MIX_EPS = 1e-5
"""Lower clamp on ``|ẑ|²`` when the mixed phasor is renormalised (1/sqrt(max(|ẑ|², eps)))."""

STEP_EPS = 1e-5
"""Lower clamp on ``|z + γu|`` when the Kuramoto step renormalises (as ``F.normalize``)."""

ROPE_BASE = 20.0

CouplingVariant = Literal["rms_qk", "vo_proj"]


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off: phase arithmetic must not drop to bf16 (errors would compound over blocks).
    Devices without autocast (``meta``, used to size models) need nothing."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def phase_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype phase arithmetic runs in: fp32, or fp64 when an input is fp64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def rope_frequencies(rot_dim: int, base: float = ROPE_BASE, device: torch.device | None = None) -> torch.Tensor:
    """``w_j = base^(-j / (R/2))`` for ``j < R/2``: one set for rows, the same set again for columns."""
    half = rot_dim // 2
    return base ** (-torch.arange(half, dtype=torch.float64, device=device) / half)


def grid_phases(
    grid_size: tuple[int, int],
    rot_dim: int,
    num_prefix_tokens: int = 0,
    base: float = ROPE_BASE,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial phases θ0, shape ``(prefix + gh·gw, R)``: zeros for prefix tokens, then 2-D RoPE per patch.

    A patch at integer position ``(y, x)`` (row-major, from 0, no normalisation) gets
    ``[y·w_0 .. y·w_{R/2-1} | x·w_0 .. x·w_{R/2-1}]``; any grid size works, which is how other input
    resolutions get their phases.
    """
    if rot_dim % 2:
        raise ValueError(f"KoPE needs an even number of oscillators per head (head_dim divisible by 4), got {rot_dim}")
    gh, gw = grid_size
    freqs = rope_frequencies(rot_dim, base, device).to(dtype)
    ys = torch.arange(gh, dtype=dtype, device=device).repeat_interleave(gw)
    xs = torch.arange(gw, dtype=dtype, device=device).repeat(gh)
    patches = torch.cat((ys[:, None] * freqs, xs[:, None] * freqs), dim=-1)
    prefix = patches.new_zeros(num_prefix_tokens, rot_dim)
    return torch.cat((prefix, patches), dim=0)


def phasor(theta: torch.Tensor) -> torch.Tensor:
    """Angles ``(..., R)`` to phasors ``(..., 2R)`` laid out ``[cos | sin]``, in (at least) fp32."""
    theta = theta.to(phase_dtype(theta.dtype))
    return torch.cat((theta.cos(), theta.sin()), dim=-1)


def phase_angles(z: torch.Tensor) -> torch.Tensor:
    """Phasors ``(..., 2R)`` back to angles ``(..., R)`` in ``(-π, π]``."""
    cos, sin = z.to(phase_dtype(z.dtype)).chunk(2, dim=-1)
    return torch.atan2(sin, cos)


def split_phasor(z: torch.Tensor) -> torch.Tensor:
    """``(..., N, 2R)`` phasor as a rotation ``(..., N, 2, R)`` (a view): used when there is no mix."""
    return z.unflatten(-1, (2, z.shape[-1] // 2))


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """``(..., 2R)`` laid out ``[cos | sin]`` as ``(..., 2, R)`` (a view)."""
    return t.unflatten(-1, (2, t.shape[-1] // 2))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-oscillator dot product of 2-vectors stored along dim -2."""
    return (a * b).sum(dim=-2, keepdim=True)


def _normalise(w: torch.Tensor, eps2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w / sqrt(max(|w|², eps²))`` per oscillator, with ``|w|²`` and the inverse norm for the backward."""
    norm2 = w.square().sum(dim=-2, keepdim=True)
    inv = norm2.clamp_min(eps2).rsqrt()
    return w * inv, norm2, inv


def _normalise_backward(grad: torch.Tensor, out: torch.Tensor, norm2: torch.Tensor, inv: torch.Tensor,
                        eps2: float) -> torch.Tensor:
    """Gradient through ``_normalise``: the radial part vanishes except where the clamp is active."""
    radial = torch.where(norm2 >= eps2, _dot(grad, out), 0.0)
    return inv * (grad - radial * out)


class _MixRotation(torch.autograd.Function):
    """Mix and renormalise; saves only its inputs (z, M) and recomputes the small matmul in backward."""

    @staticmethod
    def forward(z: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        return _MixRotation._compute(z, mix)[0]

    @staticmethod
    def _compute(z: torch.Tensor, mix: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with _no_autocast(z.device.type):
            dtype = phase_dtype(z.dtype, mix.dtype)
            rows = _pairs(z.to(dtype)).flatten(-3, -2)  # (B, H, 2N, R): rows n·2 + {cos, sin}
            mixed = torch.matmul(rows, mix.to(dtype)).unflatten(-2, (z.shape[-2], 2))  # (B, H, N, 2, R)
            out, norm2, inv = _normalise(mixed, MIX_EPS)
            return out, rows, norm2, inv

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        z, mix = ctx.saved_tensors
        out, rows, norm2, inv = _MixRotation._compute(z, mix)
        grad_mixed = _normalise_backward(grad.to(out.dtype), out, norm2, inv, MIX_EPS).flatten(-3, -2)
        mix_t = mix.to(out.dtype)
        grad_z = grad_mix = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.matmul(grad_mixed, mix_t.transpose(-2, -1)).sum_to_size(rows.shape)
            grad_z = grad_rows.unflatten(-2, (z.shape[-2], 2)).flatten(-2).to(z.dtype)
        if ctx.needs_input_grad[1]:
            grad_mix = torch.matmul(rows.transpose(-2, -1), grad_mixed).sum(0).to(mix.dtype)
        return grad_z, grad_mix


def mix_rotation(z: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """The block's rotation phasor ``e^{iψ}``: ``ẑ[d] = Σ_c M[h, c, d]·z[c]``, renormalised with a clamp.

    ``z``: ``(B|1, H|1, N, 2R)`` phasors; ``mix``: ``(H, R, R)``. Returns ``(B|1, H, N, 2, R)`` fp32 with
    ``[..., 0, :]`` = cos ψ and ``[..., 1, :]`` = sin ψ. The same real matrix acts on cos and sin, so both are
    rows of one batched matmul over ``(B, H)``.
    """
    return _MixRotation.apply(z, mix)


def token_major(rot: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A rotation ``(B|1, H, N, 2, R)`` as ``(B|1, N, H, 2, R)`` in ``dtype``: cast once, then a view.

    Eager kernels read the permuted view strided; ``torch.compile`` folds it into the rotation kernel.
    """
    return rot.to(dtype).transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    re, im = x.unflatten(-1, (x.shape[-1] // 2, 2)).unbind(-1)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


class _PairRotation(torch.autograd.Function):
    """``y = x·e^{±iψ}`` on interleaved pairs. Saves its *input*: the derivative in the phasor needs ``x``
    itself, which the output cannot give back where the phasor is shorter than 1 (a clamped mix) or zero.
    For the output rotation the input is the attention output, which attention keeps anyway."""

    @staticmethod
    def forward(x: torch.Tensor, rot: torch.Tensor, conj: bool) -> torch.Tensor:
        cos, sin = rot.unbind(-2)
        return _rotate(x, cos, -sin if conj else sin)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, rot, ctx.conj = inputs
        ctx.save_for_backward(x, rot)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, rot = ctx.saved_tensors
        return (*pair_rotation_grads(grad, x, rot, ctx.conj, ctx.needs_input_grad[:2]), None)


def pair_rotation_grads(grad: torch.Tensor, x: torch.Tensor, rot: torch.Tensor, conj: bool,
                        needs: tuple[bool, bool] = (True, True)) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``y = x·e^{±iψ}`` in ``x`` (the transposed 2×2 map) and in the phasor (``rot``'s shape)."""
    cos, sin = rot.unbind(-2)
    sin = -sin if conj else sin
    grad_x = _rotate(grad, cos, -sin) if needs[0] else None
    grad_rot = None
    if needs[1]:
        x_re, x_im = x.unflatten(-1, (x.shape[-1] // 2, 2)).unbind(-1)
        g_re, g_im = grad.unflatten(-1, (grad.shape[-1] // 2, 2)).unbind(-1)
        grad_sin = g_im * x_re - g_re * x_im
        grad_rot = torch.stack((g_re * x_re + g_im * x_im, -grad_sin if conj else grad_sin), dim=-2)
        grad_rot = grad_rot.sum_to_size(rot.shape)
    return grad_x, grad_rot


def rotate_pairs(x: torch.Tensor, rot: torch.Tensor, conj: bool = False) -> torch.Tensor:
    """Multiply each interleaved pair of ``x`` (last dim ``2R``) by ``e^{iψ}`` (or ``e^{-iψ}`` if ``conj``),
    ``rot`` holding ``(cos ψ, sin ψ)`` along dim -2: shape ``(..., 2, R)`` broadcastable to ``x``'s pairs."""
    return _PairRotation.apply(x, rot, conj)


def rotate_qkv(qkv: torch.Tensor, rot: torch.Tensor, rotate_v: bool = True) -> torch.Tensor:
    """Rotate q, k (and v) of a fused ``(B, N, 3, H, D)`` projection by ``e^{iψ}`` in one pass.

    ``rot`` is token-major ``(B|1, N, H, 2, R)`` in the activation dtype. Returns a new ``(B, N, 3, H, D)``
    tensor; slicing it into q, k, v afterwards is free (views): no separate copies of q, k and v exist.
    """
    rot = rot.unsqueeze(2)
    if rotate_v:
        return rotate_pairs(qkv, rot)
    return torch.cat((rotate_pairs(qkv[:, :, :2], rot), qkv[:, :, 2:]), dim=2)


def unrotate_heads(out: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate an attention output ``(B, H, N, D)`` back by ``e^{-iψ}`` and merge heads to ``(B, N, H·D)``.

    Token-major output is what the projection wants, so this replaces the transpose copy a plain ViT makes.
    """
    b, h, n, d = out.shape
    return rotate_pairs(out.transpose(1, 2), rot, conj=True).reshape(b, n, h * d)


class _KuramotoStep(torch.autograd.Function):
    """The step in fp32 with an analytic backward; saves only z, m and γ (no fp32 intermediates)."""

    @staticmethod
    def _compute(z: torch.Tensor, mean_field: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with _no_autocast(z.device.type):
            dtype = phase_dtype(z.dtype)
            zp, mp, gamma = _pairs(z.to(dtype)), _pairs(mean_field.to(dtype)), gamma.to(dtype)
            radial = _dot(mp, zp)
            tangent = mp - radial * zp
            out, norm2, inv = _normalise(zp + gamma * tangent, STEP_EPS * STEP_EPS)
            return out, zp, mp, gamma, radial, tangent, norm2, inv

    @staticmethod
    def forward(z: torch.Tensor, mean_field: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return _KuramotoStep._compute(z, mean_field, gamma)[0].flatten(-2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, mean_field, gamma_in = ctx.saved_tensors
        out, zp, mp, gamma, radial, tangent, norm2, inv = _KuramotoStep._compute(z, mean_field, gamma_in)
        grad_w = _normalise_backward(_pairs(grad.to(out.dtype)), out, norm2, inv, STEP_EPS * STEP_EPS)
        grad_z = grad_m = grad_gamma = None
        if ctx.needs_input_grad[0]:  # w = z + γ(m − (m·z) z)
            grad_z = grad_w - gamma * (radial * grad_w + mp * _dot(zp, grad_w))
            grad_z = grad_z.flatten(-2).sum_to_size(z.shape).to(z.dtype)
        if ctx.needs_input_grad[1]:
            grad_m = (gamma * (grad_w - _dot(grad_w, zp) * zp)).flatten(-2).sum_to_size(mean_field.shape)
            grad_m = grad_m.to(mean_field.dtype)
        if ctx.needs_input_grad[2]:
            grad_gamma = (grad_w * tangent).sum().reshape(gamma_in.shape).to(gamma_in.dtype)
        return grad_z, grad_m, grad_gamma


def kuramoto_step(z: torch.Tensor, mean_field: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """One Kuramoto step on the unit circle: ``z ← normalise(z + γ·(m − Re(m·z̄)·z))`` in fp32.

    ``z``: ``(B|1, H|1, N, 2R)`` unit phasors; ``mean_field`` ``m``: ``(B, H, N, 2R)`` (any dtype), the
    coupling-weighted sum of the other tokens' phasors. Subtracting the radial part keeps only the tangential
    pull, so the closed form is ``θ ← θ + arctan(γ·Σ_j K_ij·sin(θ_j − θ_i))``.
    """
    if not isinstance(gamma, torch.Tensor):
        gamma = torch.tensor(float(gamma), dtype=phase_dtype(z.dtype), device=z.device)
    return _KuramotoStep.apply(z, mean_field, gamma)


class _RmsNormalise(torch.autograd.Function):
    """RMS normalisation without weight, computed in fp32 but stored in the input dtype: it saves only its
    output (which the coupling attention keeps anyway) and the inverse RMS."""

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(x.device.type):
            dtype = phase_dtype(x.dtype)
            xf = x.to(dtype)
            inv_rms = (xf.square().mean(-1, keepdim=True) + torch.finfo(dtype).eps).rsqrt()
            return (xf * inv_rms).to(x.dtype), inv_rms

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        y, inv_rms = output
        ctx.save_for_backward(y, inv_rms)
        ctx.mark_non_differentiable(inv_rms)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        y, inv_rms = ctx.saved_tensors
        yf, gf = y.to(inv_rms.dtype), grad.to(inv_rms.dtype)
        return (inv_rms * (gf - yf * (gf * yf).mean(-1, keepdim=True))).to(grad.dtype)


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dim (eps: the fp32/fp64 machine epsilon, as ``F.rms_norm``)."""
    return _RmsNormalise.apply(x)[0]


def inverse_softplus(value: float) -> float:
    """ρ with ``softplus(ρ) = value``: how a learnable step size is initialised (−inf for 0)."""
    if value <= 0:
        return -math.inf
    return value + math.log(-math.expm1(-value))


def bounded_softplus(raw: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """``min(softplus(ρ), max)``: a positive step size that cannot overshoot."""
    return F.softplus(raw).clamp_max(max_value)


class KuramotoCoupling(nn.Module):
    """The data-dependent coupling K and one Kuramoto step, shared by every block.

    ``rms_qk`` (default): ``K = softmax(⟨s_h ⊙ rms(Wq x'), rms(Wk x')⟩ / √D)`` per head, mean field
    ``m = K·z``. ``vo_proj`` (the authors' supervised variant): no RMS norm or query scale, and
    ``m = Wo·(K·Wv z)`` with projections that mix heads; its LayerNorm on ``x'`` belongs to each block
    (``KopeBlock.phase_norm``), so the caller passes the normalised tokens. Both attentions are one SDPA call
    whose values are the phasors ``[cos | sin]``. The step size γ is stored as ``ρ`` with ``γ = min(softplus(ρ), 1)``:
    a buffer when fixed, a parameter (no weight decay) when learnable.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        gamma: float = 0.05,
        learnable_gamma: bool = False,
        variant: CouplingVariant = "rms_qk",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if variant not in ("rms_qk", "vo_proj"):
            raise ValueError(f"coupling must be 'rms_qk' or 'vo_proj', got {variant!r}")
        if not 0.0 <= gamma <= 1.0 or (learnable_gamma and gamma == 0.0):
            raise ValueError(f"gamma must lie in [0, 1] (and be > 0 when learnable), got {gamma}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.variant = variant
        self.initial_gamma = gamma
        self.qk = nn.Linear(dim, 2 * dim, **dd)
        if variant == "rms_qk":
            self.q_scale = nn.Parameter(torch.empty(num_heads, self.head_dim, **dd))
            self.v = self.o = None
        else:
            self.q_scale = None
            self.v = nn.Linear(dim, dim, **dd)
            self.o = nn.Linear(dim, dim, **dd)
        raw = torch.empty((), device=device, dtype=torch.float32)
        if learnable_gamma:
            self.gamma_raw = nn.Parameter(raw)
        else:
            self.register_buffer("gamma_raw", raw)
        for linear in (self.qk, self.v, self.o):
            if linear is not None:
                trunc_normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
        self.init_weights()

    def init_weights(self) -> None:
        """Unit query scale and the initial step size (timm's init resets the linear layers itself)."""
        with torch.no_grad():
            if self.q_scale is not None:
                self.q_scale.fill_(1.0)
            self.gamma_raw.fill_(inverse_softplus(self.initial_gamma))

    @property
    def gamma(self) -> torch.Tensor:
        return bounded_softplus(self.gamma_raw)

    def mean_field(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``m = K·z`` (or ``Wo·K·Wv z``): ``(B, H, N, 2R)`` from tokens ``(B, N, C)`` and phasors ``z``."""
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        q, k = self.qk(x).view(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        z = z.expand(b, h, n, d)
        if self.q_scale is not None:
            q = rms_normalise(q) * self.q_scale.to(q.dtype).unsqueeze(1)
            k = rms_normalise(k)
            return F.scaled_dot_product_attention(q, k, z.to(q.dtype))
        values = self.v(z.transpose(1, 2).reshape(b, n, c).to(x.dtype)).view(b, n, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, values)
        return self.o(out.transpose(1, 2).reshape(b, n, c)).view(b, n, h, d).transpose(1, 2)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The phasors after one Kuramoto step driven by the post-block tokens ``x`` (for ``vo_proj``, after
        the block's own LayerNorm)."""
        return kuramoto_step(z, self.mean_field(x, z), self.gamma)
