"""Analysis metrics against hand-computed values, and the CLS-attention probes of a model."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

import pipeline.models  # noqa: F401
from pipeline.models.analysis import analyse, attention_entropy, gini, phase_synchrony
from pipeline.models.kope_vit import KopeVisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)


def test_gini_of_uniform_one_hot_and_a_hand_computed_case():
    n = 5
    assert gini(torch.full((n,), 1 / n)).abs() < 1e-6
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    assert gini(one_hot) == pytest.approx((n - 1) / n, abs=1e-5)
    # sorted 0.1, 0.2, 0.7: ((2-4)·0.1 + 0·0.2 + 2·0.7) / 3 = 0.4
    assert gini(torch.tensor([0.7, 0.1, 0.2])) == pytest.approx(0.4, abs=1e-5)


def test_entropy_of_uniform_and_one_hot():
    assert attention_entropy(torch.full((8,), 1 / 8)) == pytest.approx(math.log(8), abs=1e-4)
    assert attention_entropy(torch.tensor([0.0, 1.0, 0.0])).abs() < 1e-5


def test_synchrony_of_aligned_opposed_and_quarter_turn_phases():
    p = torch.tensor([0.5, 0.5])
    aligned = torch.tensor([[0.3, -1.0], [0.3, -1.0]])
    opposed = torch.tensor([[0.0, 1.0], [math.pi, 1.0 + math.pi]])
    quarter = torch.tensor([[0.0], [math.pi / 2]])
    assert phase_synchrony(p, aligned) == pytest.approx(1.0, abs=1e-6)
    assert phase_synchrony(p, opposed) == pytest.approx(0.0, abs=1e-6)
    assert phase_synchrony(p, quarter) == pytest.approx(math.sqrt(0.5), abs=1e-6)


def test_probes_match_the_attention_the_model_computes():
    """With phases fixed at θ0 and no mix, the probe's CLS row and ψ follow from the model's own weights."""
    torch.manual_seed(0)
    model = KopeVisionTransformer(**TINY, kuramoto=False, phase_mix=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        probes = model.forward_cls_attention(x)
        logits = model(x)
        tokens = model._pos_embed(model.patch_embed(x))
        block = model.blocks[0]
        q, k, _ = block.attn.qkv(block.norm1(tokens)).view(2, 17, 3, 2, 32).unbind(2)
        psi = probes["rotation_phases"][0]  # (B, H, N, R)
        rot = torch.polar(torch.ones_like(psi), psi).transpose(1, 2)  # (B, N, H, R)
        qc = torch.complex(q[..., 0::2], q[..., 1::2]) * rot
        kc = torch.complex(k[..., 0::2], k[..., 1::2]) * rot
        scores = torch.einsum("bhr,bjhr->bhj", qc[:, 0], kc.conj()).real / math.sqrt(32)
    assert probes["cls_attention"].shape == (2, 2, 2, 17)
    assert torch.allclose(probes["cls_attention"][0], scores.softmax(-1), atol=1e-6)
    assert torch.allclose(psi[0, 0, 1:, 0], torch.arange(4.0).repeat_interleave(4), atol=1e-6)  # y·w_0
    assert torch.equal(model(x), logits)  # probing leaves no state behind


def test_analyse_returns_json_ready_metrics_per_block_and_head():
    torch.manual_seed(0)
    model = KopeVisionTransformer(**TINY).train()
    report = analyse(model, torch.randn(3, 3, 32, 32))
    assert model.training
    assert set(report) == {"gini", "entropy", "synchrony"}
    for values in report.values():
        assert len(values["per_block_head"]) == 2 and len(values["per_block_head"][0]) == 2
        assert len(values["per_block"]) == 2 and isinstance(values["mean"], float)
    assert all(0 <= g <= 16 / 17 for row in report["gini"]["per_block_head"] for g in row)
    assert all(0 <= s <= 1 + 1e-6 for row in report["synchrony"]["per_block_head"] for s in row)
    assert all(0 <= e <= math.log(17) + 1e-4 for row in report["entropy"]["per_block_head"] for e in row)
    json.dumps(report)


def test_plain_vit_analysis_has_no_synchrony_and_ssa_needs_a_class_token():
    torch.manual_seed(0)
    report = analyse(KopeVisionTransformer(**TINY, kope=False), torch.randn(2, 3, 32, 32))
    assert set(report) == {"gini", "entropy"}
    ssa = timm.create_model("vit_ssa_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="class token"):
        analyse(ssa, torch.randn(1, 3, 32, 32))
