"""KoPE ViT numerics: timm equality, an independent 2-D RoPE attention, the Kuramoto step in closed form,
invariances, parameter counts, gradients and precision under autocast."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models import phase as ph
from pipeline.models.kope_vit import KopeVisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)


def tiny(**kwargs) -> KopeVisionTransformer:
    torch.manual_seed(0)
    return KopeVisionTransformer(**{**TINY, **kwargs}).eval()


def images(batch: int = 2, size: int = 32, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def reference_phases(grid: tuple[int, int], rot_dim: int, prefix: int) -> torch.Tensor:
    """θ0 written from the method text: w_j = 20^(-j/(R/2)); patch (y, x) -> [y·w | x·w]; prefix at 0."""
    half = rot_dim // 2
    w = torch.tensor([20.0 ** (-j / half) for j in range(half)], dtype=torch.float64)
    rows = [torch.zeros(rot_dim, dtype=torch.float64) for _ in range(prefix)]
    for y in range(grid[0]):
        for x in range(grid[1]):
            rows.append(torch.cat((y * w, x * w)))
    return torch.stack(rows)


# --- kope=False is timm's ViT -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timm_name, extra",
    [
        ("vit_tiny_patch16_224", {}),
        ("vit_small_patch16_224", dict(reg_tokens=4, no_embed_class=True, init_values=0.1)),
    ],
)
def test_plain_model_loads_timm_weights_strictly_and_matches(timm_name, extra):
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, img_size=64, num_classes=7, **extra).eval()
    name = timm_name.replace("vit_", "vit_kope_")
    model = timm.create_model(name, img_size=64, num_classes=7, kope=False, **extra).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = images(2, 64)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-5
        ours, ref = model.forward_intermediates(x, indices=2), reference.forward_intermediates(x, indices=2)
    assert torch.equal(ours[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(ours[1], ref[1]))


def test_timm_weights_load_non_strictly_into_kope_leaving_only_kope_parts():
    reference = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=7)
    model = timm.create_model("vit_kope_tiny_patch16_224", img_size=64, num_classes=7)
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("coupling.") or k.endswith(".attn.phase_mix") for k in result.missing_keys)
    assert len([k for k in result.missing_keys if k.endswith("phase_mix")]) == 12


# --- kuramoto=False is a 2-D RoPE ViT -----------------------------------------------------------------------


def reference_rope_vit(model: KopeVisionTransformer, x: torch.Tensor, mix: bool, vo: bool) -> torch.Tensor:
    """A RoPE ViT forward in complex arithmetic with an explicit softmax (float64), reusing only the model's
    weights and timm's embedding/MLP/norm modules."""
    tokens = model._pos_embed(model.patch_embed(x))
    heads = model.blocks[0].attn.num_heads
    b, n, c = tokens.shape
    d = c // heads
    grid = model.patch_embed.grid_size
    theta = reference_phases(grid, d // 2, model.num_prefix_tokens)  # (N, R)
    for block in model.blocks:
        attn = block.attn
        e = torch.exp(1j * theta)  # (N, R)
        if mix:
            e = torch.einsum("nc,hcd->hnd", e, attn.phase_mix.to(torch.complex128))
            e = e / e.abs()
        else:
            e = e.expand(heads, n, d // 2)
        rot = e.permute(1, 0, 2)  # (N, H, R)
        qkv = attn.qkv(block.norm1(tokens)).view(b, n, 3, heads, d)
        pairs = torch.complex(qkv[..., 0::2], qkv[..., 1::2])  # (B, N, 3, H, R)
        q, k, v = pairs[:, :, 0] * rot, pairs[:, :, 1] * rot, pairs[:, :, 2] * (rot if vo else 1)
        scores = torch.einsum("bihr,bjhr->bhij", q, k.conj()).real / math.sqrt(d)
        out = torch.einsum("bhij,bjhr->bihr", scores.softmax(-1).to(torch.complex128), v)
        if vo:
            out = out * rot.conj()
        out = torch.stack((out.real, out.imag), dim=-1).reshape(b, n, c)
        tokens = tokens + attn.proj(out)
        tokens = tokens + block.mlp(block.norm2(tokens))
    return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("mix, vo", [(False, True), (True, True), (True, False)])
def test_without_kuramoto_equals_independent_rope_attention(mix, vo):
    model = tiny(kuramoto=False, phase_mix=mix, vo_rotation=vo).double()
    x = images(dtype=torch.float64)
    with torch.no_grad():
        expected = reference_rope_vit(model, x, mix, vo)
        assert (model(x) - expected).abs().max() < 1e-10


# --- Kuramoto step and coupling -----------------------------------------------------------------------------


def test_kuramoto_step_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    theta = torch.rand(2, 3, 7, 4, generator=g, dtype=torch.float64) * 2 * math.pi
    coupling = torch.softmax(torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64), -1)
    z = ph.phasor(theta)
    gamma = 0.3
    stepped = ph.phase_angles(ph.kuramoto_step(z, coupling @ z, gamma))
    pull = (coupling.unsqueeze(-1) * torch.sin(theta.unsqueeze(-3) - theta.unsqueeze(-2))).sum(-2)
    expected = theta + torch.atan(gamma * pull)
    assert wrap(stepped - expected).abs().max() < 1e-12


def reference_coupling_matrix(coupling, x: torch.Tensor) -> torch.Tensor:
    """softmax(⟨s ⊙ rms(Wq x), rms(Wk x)⟩ / √D) per head, from the method text."""
    b, n, c = x.shape
    h, d = coupling.num_heads, coupling.head_dim
    q, k = coupling.qk(x).view(b, n, 2, h, d).unbind(2)
    eps = torch.finfo(x.dtype).eps
    q = q / torch.sqrt(q.square().mean(-1, keepdim=True) + eps) * coupling.q_scale
    k = k / torch.sqrt(k.square().mean(-1, keepdim=True) + eps)
    return torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d), dim=-1)


def test_model_coupling_step_equals_closed_form_with_independent_coupling_matrix():
    model = tiny(gamma=0.2).double()
    with torch.no_grad():
        model.coupling.q_scale.normal_()  # a non-trivial query scale
        x = torch.randn(2, 9, 64, dtype=torch.float64)
        theta = torch.rand(2, 2, 9, 16, dtype=torch.float64) * 6
        stepped = ph.phase_angles(model.coupling(x, ph.phasor(theta)))
        k = reference_coupling_matrix(model.coupling, x)
    gamma = model.coupling.gamma
    assert abs(float(gamma) - 0.2) < 1e-6
    pull = (k.unsqueeze(-1) * torch.sin(theta.unsqueeze(-3) - theta.unsqueeze(-2))).sum(-2)
    assert wrap(stepped - (theta + torch.atan(gamma * pull))).abs().max() < 1e-10


def test_vo_proj_coupling_steps_along_projected_mean_field_of_each_blocks_own_norm():
    model = tiny(coupling="vo_proj", gamma=0.2).double()
    coupling = model.coupling
    assert coupling.q_scale is None and {"v", "o"} <= dict(coupling.named_children()).keys()
    assert not any(name.startswith("norm") for name, _ in coupling.named_children())  # no shared norm
    with torch.no_grad():
        coupling.qk.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))  # a peaked K
        for i, block in enumerate(model.blocks):  # per-block norms that differ
            block.phase_norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(i))
            block.phase_norm.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(10 + i))
        x = torch.randn(2, 9, 64, dtype=torch.float64)
        theta = torch.rand(2, 2, 9, 16, dtype=torch.float64) * 6
        z = ph.phasor(theta)
        for block in model.blocks:
            xn = block.phase_norm(x)
            q, k = coupling.qk(xn).view(2, 9, 2, 2, 32).unbind(2)
            weights = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(32), -1)
            values = coupling.v(z.transpose(1, 2).reshape(2, 9, 64)).view(2, 9, 2, 32)
            m = coupling.o(torch.einsum("bhij,bjhd->bihd", weights, values).reshape(2, 9, 64)).view(2, 9, 2, 32)
            mc, ms = m.transpose(1, 2).chunk(2, -1)
            tangential = ms * torch.cos(theta) - mc * torch.sin(theta)  # Im(m·conj(z))
            expected = theta + torch.atan(coupling.gamma * tangential)
            stepped = ph.phase_angles(model._block_step(_Identity(block), x, z, step=True)[1])
            assert wrap(stepped - expected).abs().max() < 1e-10
        first = ph.phase_angles(model._block_step(_Identity(model.blocks[0]), x, z, step=True)[1])
        second = ph.phase_angles(model._block_step(_Identity(model.blocks[1]), x, z, step=True)[1])
    assert wrap(first - second).abs().max() > 1e-3  # the norm used is the block's own


class _Identity(torch.nn.Module):
    """A block that leaves the tokens as they are but keeps the wrapped block's ``phase_norm``."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.phase_norm = block.phase_norm

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x


def test_only_vo_proj_models_have_per_block_coupling_norms():
    names = {variant: {n for n, _ in tiny(coupling=variant).named_parameters()} for variant in ("rms_qk", "vo_proj")}
    assert {f"blocks.{i}.phase_norm.{w}" for i in range(2) for w in ("weight", "bias")} <= names["vo_proj"]
    assert not any("phase_norm" in n for n in names["rms_qk"])
    assert not any("phase_norm" in n for n, _ in tiny(coupling="vo_proj", kuramoto=False).named_parameters())


def test_coupling_rows_sum_to_one():
    """A synchronised state is a fixed point of the mean field only if every row of K sums to 1."""
    model = tiny().double()
    with torch.no_grad():
        x = torch.randn(3, 17, 64, dtype=torch.float64) * 3
        theta = torch.rand(3, 2, 1, 16, dtype=torch.float64).expand(3, 2, 17, 16)
        z = ph.phasor(theta)
        mean_field = model.coupling.mean_field(x, z)
        k = reference_coupling_matrix(model.coupling, x)
    assert (mean_field - z).abs().max() < 1e-12
    assert (k.sum(-1) - 1).abs().max() < 1e-12


def test_gamma_zero_keeps_the_2d_rope_phases():
    model = tiny(gamma=0.0, reg_tokens=2)
    with torch.no_grad():
        phases = model.forward_feature_dict(images())["patch_phases"]
    expected = reference_phases((4, 4), 16, 0).float()
    assert phases.shape == (2, 2, 16, 16)
    assert wrap(phases - expected).abs().max() < 1e-5


def test_kuramoto_moves_phases_and_mix_changes_rotation():
    model = tiny(gamma=0.5)
    with torch.no_grad():
        phases = model.forward_feature_dict(images())["patch_phases"]
    assert wrap(phases - reference_phases((4, 4), 16, 0).float()).abs().max() > 1e-2


def test_constant_phase_shift_leaves_logits_unchanged_and_shifts_final_phases():
    model = tiny(gamma=0.3, reg_tokens=1).double()
    x = images(dtype=torch.float64)
    theta = torch.rand(2, 2, 18, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 6
    with torch.no_grad():
        base = model.forward_feature_dict(x, initial_phases=theta)
        shifted = model.forward_feature_dict(x, initial_phases=theta + 1.234)
    for key in ("cls_token", "patch_tokens", "register_tokens"):
        assert (base[key] - shifted[key]).abs().max() < 1e-10
    assert wrap(shifted["patch_phases"] - base["patch_phases"] - 1.234).abs().max() < 1e-10


# --- size, gradients, precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("size, millions", [("small", 22.0), ("base", 87.1), ("large", 305.8)])
def test_parameter_counts_without_classifier(size, millions):
    with torch.device("meta"):
        kope = timm.create_model(f"vit_kope_{size}_patch16_224", num_classes=0, learnable_gamma=True)
        vit = timm.create_model(f"vit_{size}_patch16_224", num_classes=0)
    count = sum(p.numel() for p in kope.parameters())
    c, depth, heads = vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads
    rot = c // heads // 2
    extra = 2 * (c * c + c) + c + 1 + depth * heads * rot * rot
    assert count == sum(p.numel() for p in vit.parameters()) + extra
    assert round(count / 1e6, 1) == millions


@pytest.mark.parametrize("size, millions, with_head", [("small", 22.34, 22.72), ("base", 88.33, 89.10),
                                                       ("large", 307.94, 308.97)])
def test_parameter_counts_of_the_authors_supervised_variant(size, millions, with_head):
    """``vo_proj`` with γ fixed (the supervised recipe): shared q/k and v/o maps, one LayerNorm per block, the
    mixes; no query scale, no trained γ."""
    with torch.device("meta"):
        kope = timm.create_model(f"vit_kope_{size}_patch16_224", coupling="vo_proj")
        vit = timm.create_model(f"vit_{size}_patch16_224")
    c, depth, heads = vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads
    rot = c // heads // 2
    extra = 4 * (c * c + c) + depth * 2 * c + depth * heads * rot * rot
    count = sum(p.numel() for p in kope.parameters())
    assert count == sum(p.numel() for p in vit.parameters()) + extra
    head = sum(p.numel() for p in kope.head.parameters())
    assert (round((count - head) / 1e6, 2), round(count / 1e6, 2)) == (millions, with_head)


@pytest.mark.parametrize("variant", ["rms_qk", "vo_proj"])
def test_gradients_reach_coupling_mixes_and_gamma(variant):
    model = tiny(learnable_gamma=True, coupling=variant).train()
    model(images()).square().mean().backward()
    named = dict(model.named_parameters())
    kope_params = [n for n in named if n.startswith("coupling.") or n.endswith("phase_mix")]
    assert "coupling.gamma_raw" in kope_params and len(kope_params) >= 5
    for name in kope_params:
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert "coupling.gamma_raw" in model.no_weight_decay()


def test_phase_maths_stays_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    z = ph.phasor(torch.rand(2, 2, 5, 8, generator=g) * 6)
    mix = torch.eye(8) + 0.1 * torch.randn(2, 8, 8, generator=g)
    field = torch.randn(2, 2, 5, 16, generator=g).bfloat16()
    plain_rot, plain_step = ph.mix_rotation(z, mix), ph.kuramoto_step(z, field, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rot, step = ph.mix_rotation(z, mix), ph.kuramoto_step(z, field, 0.05)
        phases = tiny().forward_feature_dict(images())["patch_phases"]
    assert rot.dtype == step.dtype == phases.dtype == torch.float32
    assert torch.equal(rot, plain_rot) and torch.equal(step, plain_step)
    assert (rot.square().sum(-2) - 1).abs().max() < 1e-6


def test_bf16_autocast_forward_stays_close_to_fp32():
    model = tiny()
    x = images()
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max() + 0.05


def test_extra_multiply_adds_match_the_method_cost_formula():
    """Per block KoPE adds 2NC² (coupling q/k) + 2N²C (coupling attention) + 2NHR² (mix); the logits path
    skips the coupling after the last block, whose phases nothing reads."""

    def forward_macs(name: str) -> int:
        with torch.device("meta"):
            model = timm.create_model(name)
            images = torch.randn(1, 3, 224, 224)
        counter = FlopCounterMode(display=False)
        with counter:
            model(images)
        return counter.get_total_flops() // 2

    n, c, heads, rot, depth = 197, 768, 12, 32, 12
    coupling, mix = 2 * n * c * c + 2 * n * n * c, 2 * n * heads * rot * rot
    extra = forward_macs("vit_kope_base_patch16_224") - forward_macs("vit_base_patch16_224")
    assert extra == depth * mix + (depth - 1) * coupling
