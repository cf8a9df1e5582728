"""The hand-written backward passes of the phase maths against finite differences (float64 gradcheck) and
against plain autograd of the same forward (float32), for unit and non-unit phasors, with the mix and step
clamps active, and in the broadcast shapes the model uses (initial phases shared by every sample and head)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from pipeline.models import phase as ph
from pipeline.models.kope_vit import KopeVisionTransformer


def random(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unit_phasor(*shape, seed: int = 0) -> torch.Tensor:
    return ph.phasor(random(*shape, seed=seed) * 3)


def spread_columns(mix: torch.Tensor, low: float = -5.0, seed: int = 0) -> torch.Tensor:
    """Scale each output column of a mix by 10^u, u spread over [low, 0]: columns below about 10^-2.5 make
    ``|ẑ|² < MIX_EPS``, so the renormalisation clamps there and the rotation phasor is shorter than 1."""
    u = torch.rand(mix.shape[:-2] + (1, mix.shape[-1]), generator=torch.Generator().manual_seed(seed),
                   dtype=mix.dtype) * low
    return mix * 10.0**u


# --- plain-autograd forms of the same forward (the reference the hand-written passes must equal) ----------


def plain_mix_rotation(z: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    dtype = ph.phase_dtype(z.dtype, mix.dtype)
    cos, sin = z.to(dtype).chunk(2, dim=-1)
    cos, sin = cos @ mix.to(dtype), sin @ mix.to(dtype)
    inv = (cos.square() + sin.square()).clamp_min(ph.MIX_EPS).rsqrt()
    return torch.stack((cos * inv, sin * inv), dim=-2)


def plain_rotate_pairs(x: torch.Tensor, rot: torch.Tensor, conj: bool = False) -> torch.Tensor:
    cos, sin = rot.unbind(-2)
    sin = -sin if conj else sin
    re, im = x.unflatten(-1, (x.shape[-1] // 2, 2)).unbind(-1)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


def plain_kuramoto_step(z: torch.Tensor, mean_field: torch.Tensor, gamma) -> torch.Tensor:
    dtype = ph.phase_dtype(z.dtype)
    zp, mp = z.to(dtype).unflatten(-1, (2, -1)), mean_field.to(dtype).unflatten(-1, (2, -1))
    tangent = mp - (mp * zp).sum(-2, keepdim=True) * zp
    return F.normalize(zp + gamma * tangent, dim=-2, eps=ph.STEP_EPS).flatten(-2)


def plain_rms_normalise(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x.to(ph.phase_dtype(x.dtype)), (x.shape[-1],)).to(x.dtype)


PLAIN = {"mix_rotation": plain_mix_rotation, "rotate_pairs": plain_rotate_pairs,
         "kuramoto_step": plain_kuramoto_step, "rms_normalise": plain_rms_normalise}


# --- gradcheck, float64 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, heads", [(2, 3), (1, 1), (2, 1)])
def test_mix_rotation_gradients(batch, heads):
    z = unit_phasor(batch, heads, 5, 4, seed=1).requires_grad_()
    mix = (torch.eye(4, dtype=torch.float64) + 0.3 * random(3, 4, 4, seed=2)).requires_grad_()
    assert gradcheck(ph.mix_rotation, (z, mix))


@pytest.mark.parametrize("batch, heads", [(2, 3), (1, 1)])
def test_mix_rotation_gradients_where_the_clamp_is_active(batch, heads):
    z = unit_phasor(batch, heads, 6, 8, seed=3).requires_grad_()
    mix = spread_columns(torch.eye(8, dtype=torch.float64) + 0.5 * random(3, 8, 8, seed=4), seed=5)
    norm2 = plain_mix_rotation(z, mix).square().sum(-2)
    assert (norm2 < 0.5).float().mean() > 0.2 and (norm2 > 0.99).float().mean() > 0.2  # both regimes present
    assert gradcheck(ph.mix_rotation, (z, mix.requires_grad_()))


@pytest.mark.parametrize("conj", [False, True])
@pytest.mark.parametrize("rot_batch", [3, 1])
def test_pair_rotation_gradients(conj, rot_batch):
    x = random(3, 5, 2, 6, seed=3).requires_grad_()
    rot = ph.split_phasor(unit_phasor(rot_batch, 5, 1, 3, seed=4)).requires_grad_()  # broadcast over dim 2
    assert gradcheck(lambda a, b: ph.rotate_pairs(a, b, conj=conj), (x, rot))


@pytest.mark.parametrize("conj", [False, True])
def test_pair_rotation_gradients_with_phasors_shorter_than_one_or_zero(conj):
    x = random(3, 5, 2, 8, seed=6).requires_grad_()
    rot = random(1, 5, 1, 2, 4, seed=7) * torch.tensor([1.0, 0.3, 1e-3, 0.0])  # the last oscillator: e^{iψ} = 0
    assert gradcheck(lambda a, b: ph.rotate_pairs(a, b, conj=conj), (x, rot.requires_grad_()))


def test_pair_rotation_is_inverted_by_its_conjugate():
    x = random(2, 4, 3, 8, seed=5)
    rot = ph.split_phasor(unit_phasor(2, 4, 3, 4, seed=6))
    assert torch.allclose(ph.rotate_pairs(ph.rotate_pairs(x, rot), rot, conj=True), x, atol=1e-12)


@pytest.mark.parametrize("z_shape", [(2, 3, 5, 4), (1, 1, 5, 4)])
def test_kuramoto_step_gradients(z_shape):
    z = unit_phasor(*z_shape, seed=7).requires_grad_()
    mean_field = (0.7 * random(2, 3, 5, 8, seed=8)).requires_grad_()
    gamma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(ph.kuramoto_step, (z, mean_field, gamma))


def test_kuramoto_step_gradients_off_the_circle_and_where_the_clamp_is_active():
    z = (random(2, 3, 5, 8, seed=9) * torch.tensor([1.0, 0.4, 2e-6, 2e-6]).repeat(2)).requires_grad_()
    mean_field = (random(2, 3, 5, 8, seed=10) * torch.tensor([1.0, 1.0, 1.0, 1e-6]).repeat(2)).requires_grad_()
    gamma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    stepped = ph.kuramoto_step(z, mean_field, gamma).unflatten(-1, (2, 4)).norm(dim=-2)
    assert (stepped[..., 3] < 0.9).all() and ((stepped[..., :2] - 1).abs() < 1e-12).all()  # clamped / not
    assert gradcheck(ph.kuramoto_step, (z, mean_field, gamma), eps=1e-9, atol=1e-6)


def test_rms_normalise_matches_rms_norm_and_its_gradients():
    x = random(2, 3, 5, 8, seed=9).requires_grad_()
    assert torch.allclose(ph.rms_normalise(x), torch.nn.functional.rms_norm(x, (8,)), atol=1e-14)
    assert gradcheck(ph.rms_normalise, (x,))
    tiny = (random(2, 3, 5, 8, seed=10) * 1e-8).requires_grad_()  # mean(x²) below eps: eps dominates
    assert gradcheck(ph.rms_normalise, (tiny,), eps=1e-14, atol=1e-6)


# --- float32 against plain autograd --------------------------------------------------------------------------


def test_each_function_equals_plain_autograd_in_float32():
    z = unit_phasor(2, 3, 6, 8, seed=11).float().requires_grad_()
    mix = spread_columns(torch.eye(8) + 0.5 * random(3, 8, 8, seed=12, dtype=torch.float32), seed=13)
    x = random(2, 6, 3, 16, seed=14, dtype=torch.float32).requires_grad_()
    field = random(2, 3, 6, 16, seed=15, dtype=torch.float32).requires_grad_()
    gamma = torch.tensor(0.2, requires_grad=True)
    weights = [random(*s, seed=20 + i, dtype=torch.float32) for i, s in
               enumerate([(2, 6, 3, 16), (2, 6, 3, 16), (2, 3, 6, 16), (2, 3, 6, 16)])]

    def run(fns):
        mix_ = mix.clone().requires_grad_()
        rot = fns["mix_rotation"](z, mix_).transpose(1, 2)
        out = [fns["rotate_pairs"](x, rot), fns["rotate_pairs"](x, rot, conj=True),
               fns["kuramoto_step"](z, field, gamma), fns["rms_normalise"](field)]
        loss = sum((o * w).sum() for o, w in zip(out, weights))
        return torch.autograd.grad(loss, (z, mix_, x, field, gamma))

    ours = run({name: getattr(ph, name) for name in PLAIN})
    plain = run(PLAIN)
    for name, a, b in zip(("z", "mix", "x", "mean_field", "gamma"), ours, plain):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name


def test_phase_gradients_reach_bf16_inputs_in_their_dtype():
    z = unit_phasor(2, 2, 3, 4).float().requires_grad_()
    field = random(2, 2, 3, 8).bfloat16().requires_grad_()
    x = random(2, 3, 2, 8).bfloat16().requires_grad_()
    rot = ph.token_major(ph.mix_rotation(z, torch.eye(4).expand(2, 4, 4)), torch.bfloat16)
    loss = ph.kuramoto_step(z, field, 0.1).sum() + ph.rotate_pairs(x, rot).float().sum()
    loss.backward()
    assert field.grad.dtype == x.grad.dtype == torch.bfloat16 and z.grad.dtype == torch.float32
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# --- a deep model: every parameter gradient equals plain autograd's --------------------------------------------


def deep_model(coupling: str) -> KopeVisionTransformer:
    torch.manual_seed(0)
    model = KopeVisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=5,
                                  coupling=coupling, learnable_gamma=True, gamma=0.3, reg_tokens=1).train()
    with torch.no_grad():
        for i, block in enumerate(model.blocks):  # trained-looking mixes: far from I, columns of spread scale
            mix = block.attn.phase_mix
            mix.copy_(spread_columns(mix + 0.5 * torch.randn_like(mix), seed=100 + i))
        if model.coupling.q_scale is not None:
            model.coupling.q_scale.normal_(1.0, 0.5)
    return model


def parameter_gradients(model: KopeVisionTransformer, images: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model.forward_feature_dict(images)
    logits = model.forward_head(torch.cat((out["cls_token"][:, None], out["patch_tokens"]), 1), pre_logits=False)
    weights = random(*logits.shape, seed=30, dtype=torch.float32)
    phase_weights = random(*out["patch_phases"].shape, seed=31, dtype=torch.float32)
    loss = (logits * weights).sum() + (out["patch_phases"].cos() * phase_weights).sum()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("coupling", ["rms_qk", "vo_proj"])
def test_deep_model_gradients_equal_plain_autograd_with_clamped_mixes(coupling, monkeypatch):
    model = deep_model(coupling)
    images = random(2, 3, 32, 32, seed=32, dtype=torch.float32)
    with torch.no_grad():  # the clamp is active for a good part of the oscillators in every block
        z = model.initial_phasor((4, 4), images.device)
        clamped = [float((block.attn.rotation(z).square().sum(-2) < 0.99).float().mean()) for block in model.blocks]
    assert min(clamped) > 0.1, clamped
    ours = parameter_gradients(model, images)
    for name, plain in PLAIN.items():
        monkeypatch.setattr(ph, name, plain)
    reference = parameter_gradients(model, images)
    assert ours.keys() == reference.keys() and len(ours) > 12 * 12
    for name, grad in reference.items():
        scale = grad.abs().max()
        assert scale > 0, name
        assert (ours[name] - grad).abs().max() <= 1e-4 * scale, name
