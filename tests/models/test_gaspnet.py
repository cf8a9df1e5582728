"""GASPnet: shapes, finite phases, the Kuramoto step against its formula, and learning on real digits."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from pipeline.models.gaspnet import ComplexMap, KuramotoCoupling


def _random_map(batch=2, channels=4, height=3, width=5, seed=0) -> ComplexMap:
    gen = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(batch, channels, height, width, generator=gen)
    phase = (torch.rand(batch, channels, height, width, generator=gen) * 2 - 1) * math.pi
    return ComplexMap(amplitude, phase.cos(), phase.sin())


@pytest.mark.parametrize("name", ["gaspnet_tiny", "gaspnet_small"])
def test_registered_and_shapes(name):
    model = timm.create_model(name, num_classes=7).eval()
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (3, 7)
        features = model.forward_features(x)
        assert features.shape == (3, model.num_features)
        assert model.forward_head(features, pre_logits=True).shape == (3, model.num_features)
        # Any input size: pooling is global.
        assert model(torch.randn(2, 3, 40, 52)).shape == (2, 7)
        maps = model.forward_layers(x)
    assert [m.amplitude.shape[-1] for m in maps] == [32, 16, 8]
    model.reset_classifier(3)
    assert model(x).shape == (3, 3) and model.get_classifier().out_features == 3


def test_phases_stay_unit_and_finite_with_grads():
    torch.manual_seed(0)
    model = timm.create_model("gaspnet_tiny")
    x = torch.rand(4, 3, 64, 64)
    x[:, :, :32] = 0  # a black region: f(z) = 0 there, which must not give NaN phases or gradients
    maps = model.forward_layers(x)
    for z in maps:
        for t in z:
            assert torch.isfinite(t).all()
        assert (z.amplitude >= 0).all()
        assert (z.cos.square() + z.sin.square() <= 1 + 1e-5).all()
    first = maps[0].cos.square() + maps[0].sin.square()
    # Layer-1 units that see only black pixels have no phase (phasor 0); those that see the noise are unit.
    assert torch.all(first[:, :, :16] == 0)
    torch.testing.assert_close(first[:, :, 17:], torch.ones_like(first[:, :, 17:]), atol=1e-4, rtol=0)
    model(x).square().sum().backward()
    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name
    for i in range(3):  # every layer's coupling shapes the read-out
        assert model.couplings[i].query.weight.grad.abs().sum() > 0
        assert model.couplings[i].key.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("heads", [1, 2])
def test_one_kuramoto_step_matches_formula(heads):
    torch.manual_seed(1)
    coupling = KuramotoCoupling(channels=4, heads=heads, key_dim=3, steps=1, strength=0.7)
    z = _random_map()
    out = coupling(z)

    # φ_u ← φ_u + η Σ_v K[u, v] a_v sin(φ_v − φ_u), K[u, v] = softmax_v(q_u·k_v / √d), per channel,
    # each channel using the coupling of its head; written with explicit loops over positions.
    batch, channels, height, width = z.amplitude.shape
    n = height * width
    q = coupling.query(z.amplitude).reshape(batch, heads, 3, n)
    k = coupling.key(z.amplitude).reshape(batch, heads, 3, n)
    phase = torch.atan2(z.sin, z.cos).reshape(batch, channels, n)
    amplitude = z.amplitude.reshape(batch, channels, n)
    expected = phase.clone()
    per_head = channels // heads
    with torch.no_grad():
        for b in range(batch):
            for c in range(channels):
                h = c // per_head
                for u in range(n):
                    logits = torch.stack([q[b, h, :, u] @ k[b, h, :, v] / math.sqrt(3) for v in range(n)])
                    weights = torch.softmax(logits, dim=0)
                    drive = sum(
                        weights[v] * amplitude[b, c, v] * torch.sin(phase[b, c, v] - phase[b, c, u]) for v in range(n)
                    )
                    expected[b, c, u] = phase[b, c, u] + 0.7 * drive
    expected = expected.reshape(z.amplitude.shape)
    torch.testing.assert_close(out.cos, expected.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sin, expected.sin(), atol=1e-5, rtol=0)
    assert torch.equal(out.amplitude, z.amplitude)
    assert not torch.allclose(out.cos, z.cos)  # the step did move the phases


def test_dynamics_depend_only_on_phase_differences():
    torch.manual_seed(2)
    coupling = KuramotoCoupling(channels=4, steps=3)
    z = _random_map(seed=3)
    shift = torch.tensor(1.1)
    shifted = ComplexMap(
        z.amplitude, z.cos * shift.cos() - z.sin * shift.sin(), z.sin * shift.cos() + z.cos * shift.sin()
    )
    out, out_shifted = coupling(z), coupling(shifted)
    back_cos = out_shifted.cos * shift.cos() + out_shifted.sin * shift.sin()
    back_sin = out_shifted.sin * shift.cos() - out_shifted.cos * shift.sin()
    torch.testing.assert_close(back_cos, out.cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(back_sin, out.sin, atol=1e-5, rtol=0)


def test_synchronises_a_coupled_population():
    """With uniform coupling (zero keys and queries) and small spread, phases contract toward their mean."""
    coupling = KuramotoCoupling(channels=1, steps=20, strength=0.5)
    for conv in (coupling.query, coupling.key):
        torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(coupling.query.bias)
    phase = torch.linspace(-1.0, 1.0, 16).view(1, 1, 4, 4)
    z = ComplexMap(torch.ones_like(phase), phase.cos(), phase.sin())
    with torch.no_grad():
        out = coupling(z)
    spread_before = phase.std()
    spread_after = torch.atan2(out.sin, out.cos).std()
    assert spread_after < 0.1 * spread_before


def test_bf16_autocast_keeps_phases_fp32():
    model = timm.create_model("gaspnet_tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = model.forward_layers(torch.randn(2, 3, 32, 32))
        logits = model(torch.randn(2, 3, 32, 32))
    assert all(z.cos.dtype == torch.float32 and z.sin.dtype == torch.float32 for z in maps)
    assert torch.isfinite(logits.float()).all()


def _two_digit_batch(n: int = 16):
    """Pairs of real 8×8 handwritten digits superimposed (pixel max), upsampled to 32×32, with 2-hot labels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randperm(len(labels), generator=gen)[: 2 * n].view(2, n)
    keep = labels[first] != labels[second]
    first, second = first[keep], second[keep]
    pair = torch.maximum(images[first], images[second])[:, None]
    x = F.interpolate(pair, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    target = F.one_hot(labels[first], 10) + F.one_hot(labels[second], 10)
    return x, target.float()


def test_trains_on_a_batch():
    torch.manual_seed(0)
    x, target = _two_digit_batch()
    model = timm.create_model("gaspnet_tiny", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.binary_cross_entropy_with_logits(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
