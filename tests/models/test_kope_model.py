"""KoPE ViT as a timm model: registry in a fresh interpreter, local weight files, outputs for every mode,
other resolutions and gradient checkpointing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import pipeline.models  # noqa: F401
from pipeline.models.kope_vit import KopeVisionTransformer

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=5)
NAMES = [
    f"vit_kope_{size}_patch16_224{reg}" for size in ("tiny", "small", "base", "large") for reg in ("", "_reg4")
] + [f"vit_ssa_{size}_patch16_224" for size in ("tiny", "small", "base")]

FRESH_PROCESS = """
import json, sys
import torch, timm
import pipeline.models
heavy = [m for m in ("deepspeed", "webdataset", "submitit", "open_clip") if m in sys.modules]
report = {"heavy": heavy, "registered": timm.list_models("vit_kope_*") + timm.list_models("vit_ssa_*")}
names = json.loads(sys.argv[1])
built = {}
for name in names:
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    built[name] = [type(model).__name__, cfg["input_size"], cfg["classifier"], cfg["num_classes"],
                   model.num_reg_tokens]
model = timm.create_model("vit_kope_tiny_patch16_224_reg4", num_classes=3).eval()
report["tiny_logits"] = list(model(torch.randn(1, 3, 224, 224)).shape)
try:
    timm.create_model("vit_kope_huge_patch16_224")
except Exception as error:
    report["unknown"] = [type(error).__name__, str(error)]
report["built"] = built
print(json.dumps(report))
"""


def test_every_registered_name_builds_in_a_fresh_interpreter_with_only_torch_and_timm():
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(NAMES)],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert set(NAMES) <= set(report["registered"])
    for name, (cls, input_size, classifier, classes, regs) in report["built"].items():
        assert cls == "KopeVisionTransformer" and input_size == [3, 224, 224], name
        assert classifier == "head" and classes == 1000, name
        assert regs == (4 if name.endswith("_reg4") else 0), name
    assert report["tiny_logits"] == [1, 3]
    kind, message = report["unknown"]
    assert kind == "RuntimeError" and "Unknown model (vit_kope_huge_patch16_224)" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_from_a_local_file_through_timm(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("vit_kope_tiny_patch16_224", num_classes=4, img_size=64).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = timm.create_model(
        "vit_kope_tiny_patch16_224", pretrained=True, num_classes=4, img_size=64,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=4),
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_pretrained_file_at_another_resolution_gets_its_position_embedding_resampled(tmp_path):
    source = timm.create_model("vit_kope_tiny_patch16_224", num_classes=4, img_size=64)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = timm.create_model(
        "vit_kope_tiny_patch16_224", pretrained=True, num_classes=4, img_size=96,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"), num_classes=4),
    )
    assert loaded.pos_embed.shape == (1, 1 + 36, 192)
    assert loaded(torch.randn(1, 3, 96, 96)).shape == (1, 4)


def tiny(**kwargs) -> KopeVisionTransformer:
    torch.manual_seed(0)
    return KopeVisionTransformer(**{**TINY, **kwargs}).eval()


def test_feature_dict_splits_tokens_and_returns_patch_phases():
    model = tiny(reg_tokens=4, no_embed_class=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_feature_dict(x)
        tokens = model.forward_features(x)
    assert out["cls_token"].shape == (2, 64) and out["register_tokens"].shape == (2, 4, 64)
    assert out["patch_tokens"].shape == (2, 16, 64) and out["patch_phases"].shape == (2, 2, 16, 16)
    # forward_features skips the final Kuramoto step, which only moves phases: tokens are identical
    assert torch.equal(out["cls_token"], tokens[:, 0]) and torch.equal(out["patch_tokens"], tokens[:, 5:])
    assert torch.equal(model.forward_head(tokens), model(x))


def test_plain_model_feature_dict_has_no_phases():
    out = tiny(kope=False).forward_feature_dict(torch.randn(1, 3, 32, 32))
    assert "patch_phases" not in out and out["patch_tokens"].shape == (1, 16, 64)


def test_forward_intermediates_follow_timm_contract():
    model = tiny(reg_tokens=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[0, 2], norm=True)
        tokens = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        as_dict = model.forward_intermediates(x, indices=2, output_dict=True)
        features = model.forward_features(x)
    assert [m.shape for m in maps] == [(2, 64, 4, 4)] * 2
    assert torch.allclose(final, features)
    assert torch.allclose(maps[1], features[:, 2:].reshape(2, 4, 4, 64).permute(0, 3, 1, 2))
    (patches, prefix), = tokens
    assert patches.shape == (2, 16, 64) and prefix.shape == (2, 2, 64)
    assert set(as_dict) == {"image_intermediates", "image_features"}
    features_only = timm.create_model("vit_kope_tiny_patch16_224", features_only=True, out_indices=(5, 11))
    assert [f.shape for f in features_only(torch.randn(1, 3, 224, 224))] == [(1, 192, 14, 14)] * 2


def test_other_resolution_interpolates_position_embedding_and_lays_phases_on_new_grid():
    model = tiny(dynamic_img_size=True, gamma=0.0)
    fixed = tiny(gamma=0.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), fixed(x), atol=1e-6)
        out = model.forward_feature_dict(torch.randn(2, 3, 48, 64))
    assert out["patch_tokens"].shape == (2, 6 * 8, 64)
    phases = out["patch_phases"][0, 0]  # (48, 16); γ = 0 keeps θ0, whose channels 0 and R/2 are y·1 and x·1
    rows, cols = torch.arange(6.0).repeat_interleave(8), torch.arange(8.0).repeat(6)
    for channel, expected in ((0, rows), (8, cols)):
        assert torch.allclose(torch.polar(torch.ones(48), phases[:, channel]),
                              torch.polar(torch.ones(48), expected), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model = tiny(learnable_gamma=True, init_values=0.1).train()
        model.set_grad_checkpointing(checkpointing)
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_options_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 4"):
        KopeVisionTransformer(embed_dim=60, num_heads=6)
    with pytest.raises(ValueError, match="patch_drop_rate"):
        KopeVisionTransformer(**TINY, patch_drop_rate=0.5)
    with pytest.raises(ValueError, match="coupling"):
        KopeVisionTransformer(**TINY, coupling="tanh")
    with pytest.raises(ValueError, match="attention masks"):
        tiny().forward_features(torch.randn(1, 3, 32, 32), attn_mask=torch.ones(17, 17, dtype=torch.bool))


def test_training_options_train_a_step():
    model = tiny(reg_tokens=4, init_values=0.1, drop_path_rate=0.1, learnable_gamma=True).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert "blocks.0.ls1.gamma" in model.state_dict()


def test_compiles_to_one_graph_with_the_hand_written_backward_passes():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without code generation."""
    torch._dynamo.reset()
    model = tiny(depth=2, learnable_gamma=True).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, eager[name], atol=1e-6, rtol=1e-5), name
