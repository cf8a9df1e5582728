"""Selective Synchronization Attention (SSA): attention weights from which token oscillators can phase-lock.

A drop-in replacement for timm's ``Attention`` (same constructor arguments), used by the ``vit_ssa_*`` models:
the KoPE ViT with ``kope=False`` and no positional encoding. Per head, tokens get natural frequencies
``ω = W_ω x``, phases ``φ = W_φ x`` and values ``v = W_v x``. Two oscillators lock when their frequency
mismatch ``Δ_ij = ‖ω_i − ω_j‖`` is within the locking range ``τ_ij = K·r·J_ij`` (``J_ij = exp(−α Δ_ij²)``,
``r`` the head's phase order parameter); the weight is the locked amplitude ``J_ij·sqrt(1 − (Δ_ij/τ_ij)²)``
and exactly 0 for pairs that cannot lock. Rows are normalised by their sum (no softmax); the diagonal always
locks (Δ_ii = 0), so every row sums to 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from pipeline.models.kope_vit import SIZES, KopeVisionTransformer, create_vit, pretrained_cfg
from pipeline.models.phase import inverse_softplus, phase_dtype

__all__ = ["SelectiveSyncAttention"]

TAU_EPS = 1e-8
LOCK_CLAMP = 1e-4
"""Lower clamp on ``1 − ρ²`` inside the square root: bounds its gradient by 1/(2·sqrt(1e-4)) = 50."""
INIT_ALPHA = 1.0
INIT_COUPLING = 2.0


class SelectiveSyncAttention(nn.Module):
    """SSA with an initialisation that locks a useful fraction of pairs from the first step.

    At the reference initialisation (all maps at timm's std 0.02, K and α near softplus(0)) frequency
    mismatches are several units while locking ranges are below 1, so almost no off-diagonal pair locks and
    attention starts as the identity (no gradient reaches the pair terms). Here instead:

    * ``W_ω`` rows start at std ``1/sqrt(C·d)``, so ``E[Δ²] ≈ 2(1 − corr(x_i, x_j))`` for unit-variance
      tokens: mismatches of order 1, smaller between similar tokens;
    * ``α`` starts at 1 and ``K`` at 2 (``softplus`` of their raw parameters).

    Then ``τ ≈ 2r·exp(−Δ²)`` with ``r ≈ 1`` (phases start nearly aligned), and pairs lock for ``Δ`` below
    about 0.9: similar tokens attend to each other, dissimilar ones get exact zeros (on smooth images about
    10–45 % of off-diagonal pairs lock at initialisation; on white noise almost none, as it should).
    ``top_k`` optionally keeps the k largest weights per row.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Any = None,
        top_k: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if qk_norm or scale_norm:
            raise ValueError("SSA has no queries or keys to normalise (qk_norm / scale_norm)")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.top_k = top_k
        self.in_proj = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)  # ω | φ | v
        self.alpha_raw = nn.Parameter(torch.empty(num_heads, device=device, dtype=torch.float32))
        self.coupling_raw = nn.Parameter(torch.empty((), device=device, dtype=torch.float32))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.in_proj.weight, std=0.02)
        self.init_weights()

    def init_weights(self) -> None:
        """The locking-friendly start described above (timm's init calls this after its own Linear init)."""
        dim = self.in_proj.in_features
        with torch.no_grad():
            trunc_normal_(self.in_proj.weight[:dim], std=(dim * self.head_dim) ** -0.5)
            self.alpha_raw.fill_(inverse_softplus(INIT_ALPHA))
            self.coupling_raw.fill_(inverse_softplus(INIT_COUPLING))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        omega, phi, v = self.in_proj(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return omega, phi, v

    def _weights(self, omega: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """Row-normalised ``(B, H, N, N)`` locking weights, computed in fp32."""
        with torch.autocast(device_type=omega.device.type, enabled=False):
            dtype = phase_dtype(omega.dtype)
            omega, phi = omega.to(dtype), phi.to(dtype)
            sq = omega.square().sum(-1)
            mismatch2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * omega @ omega.transpose(-2, -1)).clamp_min(0)
            eye = torch.eye(omega.shape[-2], dtype=torch.bool, device=omega.device)
            mismatch2 = mismatch2.masked_fill(eye, 0.0)
            alpha = F.softplus(self.alpha_raw).view(1, -1, 1, 1)
            coupling = F.softplus(self.coupling_raw)
            order = torch.sqrt(phi.cos().mean(-2).square() + phi.sin().mean(-2).square()).mean(-1)  # (B, H)
            strength = (-alpha * mismatch2).exp()
            tau = coupling * order[..., None, None] * strength + TAU_EPS
            ratio2 = mismatch2 / tau.square()
            locked = ratio2 <= 1.0
            weights = torch.where(locked, strength * (1.0 - ratio2).clamp_min(LOCK_CLAMP).sqrt(), 0.0)
            if self.top_k is not None and self.top_k < weights.shape[-1]:
                kth = weights.topk(self.top_k, dim=-1).values[..., -1:]
                weights = torch.where(weights >= kth, weights, 0.0)
            return weights / weights.sum(-1, keepdim=True)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, H, N, N)`` attention matrix for tokens ``x`` (rows sum to 1, unlocked pairs exactly 0)."""
        omega, phi, _ = self._split(x)
        return self._weights(omega, phi)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("SSA does not take attention masks")
        b, n, c = x.shape
        omega, phi, v = self._split(x)
        weights = self.attn_drop(self._weights(omega, phi))
        out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


default_cfgs = generate_default_cfgs(
    {f"vit_ssa_{size}_patch16_224": pretrained_cfg() for size in ("tiny", "small", "base")}
)


def _ssa(variant: str, size: str, pretrained: bool, kwargs: dict) -> KopeVisionTransformer:
    """SSA ViTs pool their patch tokens: a class token (a learned constant with its own frequency) locks to
    almost no patch, so it would attend only to itself and never see the image."""
    args = dict(
        patch_size=16,
        **SIZES[size],
        kope=False,
        attn_layer=SelectiveSyncAttention,
        pos_embed="none",
        class_token=False,
        global_pool="avg",
    )
    return create_vit(variant, pretrained, **{**args, **kwargs})


@register_model
def vit_ssa_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """ViT-Ti/16 with SSA in every block, no positional encoding, mean-pooled patch tokens."""
    return _ssa("vit_ssa_tiny_patch16_224", "tiny", pretrained, kwargs)


@register_model
def vit_ssa_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """ViT-S/16 with SSA in every block, no positional encoding, mean-pooled patch tokens."""
    return _ssa("vit_ssa_small_patch16_224", "small", pretrained, kwargs)


@register_model
def vit_ssa_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """ViT-B/16 with SSA in every block, no positional encoding, mean-pooled patch tokens."""
    return _ssa("vit_ssa_base_patch16_224", "base", pretrained, kwargs)
