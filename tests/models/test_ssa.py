"""Selective Synchronization Attention: weights against a pairwise reference, exact zeros, row sums, bounded
gradients, a non-trivial start and a model that learns."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import pipeline.models  # noqa: F401
from pipeline.models.ssa import SelectiveSyncAttention


def smooth_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency random images: neighbouring patches look alike, as in natural images."""
    coarse = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)


def reference_weights(attn: SelectiveSyncAttention, x: torch.Tensor) -> torch.Tensor:
    """The method text pair by pair: Δ = ‖ω_i − ω_j‖, J = exp(−αΔ²), τ = K·r·J + 1e-8,
    S = J·sqrt(1 − (Δ/τ)²) if Δ ≤ τ else 0, rows divided by their sums."""
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    omega, phi, _ = attn.in_proj(x).view(b, n, 3, h, d).unbind(2)
    alpha, coupling = F.softplus(attn.alpha_raw), F.softplus(attn.coupling_raw)
    out = torch.zeros(b, h, n, n, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            order = torch.exp(1j * phi[bi, :, hi]).mean(0).abs().mean()
            for i in range(n):
                for j in range(n):
                    delta = torch.linalg.vector_norm(omega[bi, i, hi] - omega[bi, j, hi])
                    strength = torch.exp(-alpha[hi] * delta**2)
                    tau = coupling * order * strength + 1e-8
                    if delta <= tau:
                        out[bi, hi, i, j] = strength * torch.sqrt(1 - (delta / tau) ** 2)
    return out / out.sum(-1, keepdim=True)


def test_weights_match_pairwise_reference_with_exact_zeros_and_unit_rows():
    torch.manual_seed(0)
    attn = SelectiveSyncAttention(32, num_heads=2).double()
    with torch.no_grad():
        x = F.layer_norm(torch.randn(2, 1, 32, dtype=torch.float64) + 0.6 * torch.randn(2, 12, 32,
                         dtype=torch.float64), (32,))
        weights = attn.attention_weights(x)
        expected = reference_weights(attn, x)
    assert (weights - expected).abs().max() < 1e-6  # the clamp near ρ = 1 is the only allowed difference
    assert torch.equal(weights == 0, expected == 0)
    zeros = (weights == 0).float().mean()
    assert 0.05 < zeros < 0.95, zeros
    assert (weights.sum(-1) - 1).abs().max() < 1e-12
    assert (torch.diagonal(weights, dim1=-2, dim2=-1) > 0).all()


def test_initialisation_locks_a_useful_fraction_of_pairs_in_a_model():
    model = timm.create_model("vit_ssa_tiny_patch16_224", num_classes=10).eval()
    with torch.no_grad():
        tokens = model._embed(smooth_images(2, 224))[0]
        fractions = []
        for block in model.blocks:
            weights = block.attn.attention_weights(block.norm1(tokens))
            n = weights.shape[-1]
            fractions.append(((weights > 0).float().sum((-1, -2)).mean() - n) / (n * n - n))
            assert (weights.sum(-1) - 1).abs().max() < 1e-5
            tokens = block(tokens)
    assert all(0.05 < f < 0.9 for f in fractions), fractions


def test_gradients_stay_bounded_at_the_locking_edge():
    """Two tokens whose mismatch sits just inside the locking range: sqrt(1 − ρ²) has an unbounded slope there."""
    attn = SelectiveSyncAttention(4, num_heads=1).double()
    with torch.no_grad():
        attn.in_proj.weight.zero_()
        attn.in_proj.weight[:4] = torch.eye(4)
    coupling = F.softplus(attn.coupling_raw).item()
    alpha = F.softplus(attn.alpha_raw).item()
    # solve Δ = K·exp(−αΔ²) (r = 1 since φ = 0) by bisection, then step a hair inside
    lo, hi = 0.0, coupling
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < coupling * math.exp(-alpha * mid * mid) else (lo, mid)
    x = torch.zeros(1, 2, 4, dtype=torch.float64)
    x[0, 1, 0] = lo * (1 - 1e-12)
    x.requires_grad_(True)
    weights = attn.attention_weights(x)
    assert weights[0, 0, 0, 1] > 0
    weights[0, 0, 0, 1].backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 200
    assert torch.isfinite(attn.coupling_raw.grad) and attn.coupling_raw.grad.abs() < 200


def test_top_k_keeps_at_most_k_weights_per_row():
    torch.manual_seed(0)
    attn = SelectiveSyncAttention(32, num_heads=2, top_k=3)
    x = F.layer_norm(torch.randn(1, 1, 32) + 0.3 * torch.randn(2, 10, 32), (32,))
    with torch.no_grad():
        weights = attn.attention_weights(x)
    assert ((weights > 0).sum(-1) <= 3).all()
    assert (weights.sum(-1) - 1).abs().max() < 1e-6


def test_ssa_model_trains_on_a_batch():
    digits = load_digits()
    x = torch.tensor(digits.images[:16], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 8 - 1
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target[:16])
    torch.manual_seed(0)
    model = timm.create_model("vit_ssa_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.blocks[0].attn.alpha_raw.grad.abs().sum() > 0 and model.blocks[0].attn.coupling_raw.grad != 0


def test_masks_are_refused():
    with pytest.raises(ValueError, match="masks"):
        SelectiveSyncAttention(8, num_heads=2)(torch.randn(1, 3, 8), attn_mask=torch.ones(3, 3))
