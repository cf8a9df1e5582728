"""Importing the KoPE authors' checkpoints (``pipeline.models.authors_layout``, ``tools/import_checkpoint.py``).

Their three layouts are generated here with the key names and shapes of their code (their supervised release,
a SimDINOv2 teacher with chunked blocks, an open_clip KoPE CLIP) and random values. The key map is checked
three ways: a forward pass of their architecture written here on *their* tensors equals our converted model's
(so a transpose, a swapped q/k or a missing fold cannot hide behind a fitting shape); ours → theirs → ours is
the identity; and the folders the tool writes load through timm and open_clip and give the same outputs.
"""

from __future__ import annotations

import json
import math
import re

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

import pipeline.models  # noqa: F401  (registers the KoPE models and towers)
from pipeline.export.checksums import verify_checksums
from pipeline.models import authors_layout as layout
from pipeline.models.clip import register_open_clip_configs
from pipeline.models.phase import inverse_softplus
from tests.tools import load_tool

SMALL = dict(width=384, depth=12, heads=6)
PUBLISHED_SUPERVISED_META = {  # the fields their converter keeps, as their published supervised command sets them
    "arch_name": "vit_kope", "model_variant": "small", "patch_size": 16, "input_size": 32, "block_type": "base",
    "num_register_tokens": 0, "layerscale": None, "qkv_bias": True, "ffn_bias": True, "proj_bias": True,
    "qknorm": False, "base": 20, "learnable_pos_embed": True, "kope_gamma": 0.05, "kope_update_ext_phase": True,
    "kope_learn_phase_gamma": False, "share_kope_coupling": True, "kope_coupling_use_vo_proj": True,
    "kope_coupling_use_tanh": False, "kope_vo_rotation": True, "kope_mix": True, "kope_mix_init_gain": 0.1,
    "kope_mix_phase_norm": True, "kope_coupling_qknorm": False, "kope_coupling_qknorm_learn": False,
    "kope_coupling_qk_multilayer": False, "kope_no_phase_norm": False, "source_epoch": 299,
    "source_best_acc1": 80.1,
}
SIMDINO_STUDENT = {  # their published SimDINOv2 command's student settings
    "arch": "vit_kope_small", "patch_size": 16, "layerscale": 0.1, "num_register_tokens": 4, "kope_gamma": 0.05,
    "learn_phase_gamma": "learn", "coupling_qknorm": True, "coupling_qknorm_learn": True,
    "share_kope_coupling": True, "update_ext_token_phase": True, "use_learnable_pos_embed": True,
    "kope_vo_rotation": True, "kope_mix": True, "kope_mix_init_gain": 0.1, "kope_mix_phase_norm": True, "base": 20,
    "no_phase_norm": True, "qknorm": False, "ffn_layer": "mlp", "block_chunks": 4,
}


def randn(generator: torch.Generator, *shape, std: float = 0.02, mean: float = 0.0, dtype=torch.float32):
    return torch.randn(tuple(shape), generator=generator, dtype=dtype) * std + mean


# --- their layouts, from their code's names and shapes --------------------------------------------------------


def their_backbone(*, width=384, depth=12, heads=6, patch=16, image=32, registers=0, layerscale=False,
                   vo_proj=False, learnable_gamma=False, gamma=0.3, chunks=0, classes=0, seed=0,
                   dtype=torch.float32) -> dict[str, torch.Tensor]:
    """``DinoVisionTransformerKoPE.state_dict()`` (shared coupling, learnable positions), plus ``head.*``.
    Values are float32 (as their checkpoints), so our float32 model holds them exactly."""
    g = torch.Generator().manual_seed(seed)
    c, d = width, width // heads
    r, p = d // 2, (image // patch) ** 2

    def w(*shape, **kw):
        return randn(g, *shape, dtype=dtype, **kw)

    def coarse(t):  # multiples of 2^-12: the CLS row folds into cls_token with no float32 rounding
        return torch.round(t * 4096) / 4096

    sd = {"cls_token": coarse(w(1, 1, c, std=0.5)), "pos_embed": coarse(w(1, p + 1, c, std=0.5)),
          "mask_token": torch.zeros(1, c),
          "patch_embed.proj.weight": w(c, 3, patch, patch, std=0.05), "patch_embed.proj.bias": w(c, std=0.1),
          "norm.weight": w(c, std=0.1, mean=1.0), "norm.bias": w(c, std=0.1)}
    if registers:
        sd["register_tokens"] = w(1, registers, c, std=0.5)
    per_chunk = depth // chunks if chunks else 0
    for i in range(depth):
        pre = f"blocks.{i // per_chunk}.{i}." if chunks else f"blocks.{i}."
        for norm in ("norm1", "norm2", *(("phase_norm",) if vo_proj else ())):
            sd[f"{pre}{norm}.weight"], sd[f"{pre}{norm}.bias"] = w(c, std=0.1, mean=1.0), w(c, std=0.1)
        sd[f"{pre}attn.qkv.weight"], sd[f"{pre}attn.qkv.bias"] = w(3 * c, c, std=0.1), w(3 * c)
        sd[f"{pre}attn.proj.weight"], sd[f"{pre}attn.proj.bias"] = w(c, c), w(c)
        sd[f"{pre}attn.kope_mix_coef"] = torch.eye(r, dtype=dtype) + w(heads, r, r, std=0.3)
        sd[f"{pre}mlp.fc1.weight"], sd[f"{pre}mlp.fc1.bias"] = w(4 * c, c), w(4 * c)
        sd[f"{pre}mlp.fc2.weight"], sd[f"{pre}mlp.fc2.bias"] = w(c, 4 * c), w(c)
        if layerscale:
            sd[f"{pre}ls1.gamma"], sd[f"{pre}ls2.gamma"] = w(c, std=0.05, mean=0.1), w(c, std=0.05, mean=0.1)
        if not learnable_gamma:
            sd[f"{pre}phase_gamma"] = torch.tensor(gamma)
    for proj in ("q_proj", "k_proj", *(("v_proj", "o_proj") if vo_proj else ())):
        sd[f"shared_phase_coupling.{proj}.weight"] = w(c, c, std=0.3 if proj in ("q_proj", "k_proj") else 0.1)
        sd[f"shared_phase_coupling.{proj}.bias"] = w(c, std=0.1)
    if not vo_proj:
        sd["shared_phase_coupling.qk_scale"] = w(1, 1, heads, d, std=0.3, mean=1.0)
    if learnable_gamma:
        sd["shared_phase_coupling_gamma._raw"] = torch.tensor([inverse_softplus(gamma)])
    if classes:
        sd["head.weight"], sd["head.bias"] = w(classes, c), w(classes)
    return sd


def their_clip(name: str = "ViT-KoPE-Demo-8-64", heads: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Their open_clip ``CLIP`` with the KoPE tower (``qknorm_learn``); the text tower is open_clip's own."""
    register_open_clip_configs()
    cfg = open_clip.get_model_config(name)
    text = {k: v for k, v in open_clip.create_model(name).state_dict().items() if not k.startswith("visual.")}
    g = torch.Generator().manual_seed(seed)
    trunk = timm.create_model(cfg["vision_cfg"]["timm_model_name"])
    c, layers, patch = trunk.embed_dim, len(trunk.blocks), trunk.patch_embed.patch_size[0]
    tokens, d = trunk.pos_embed.shape[1], c // heads
    r, e = d // 2, cfg["embed_dim"]

    def w(*shape, **kw):
        return randn(g, *shape, **kw)

    v = "visual."
    sd = {f"{v}conv1.weight": w(c, 3, patch, patch, std=0.05), f"{v}class_embedding": w(c, std=0.5),
          f"{v}positional_embedding": w(tokens, c, std=0.5), f"{v}proj": w(c, e, std=0.1)}
    for norm in ("ln_pre", "ln_post"):
        sd[f"{v}{norm}.weight"], sd[f"{v}{norm}.bias"] = w(c, std=0.1, mean=1.0), w(c, std=0.1)
    for i in range(layers):
        pre = f"{v}transformer.resblocks.{i}."
        for norm in ("ln_1", "ln_2"):
            sd[f"{pre}{norm}.weight"], sd[f"{pre}{norm}.bias"] = w(c, std=0.1, mean=1.0), w(c, std=0.1)
        sd[f"{pre}attn.in_proj_weight"], sd[f"{pre}attn.in_proj_bias"] = w(3 * c, c, std=0.1), w(3 * c)
        sd[f"{pre}attn.out_proj.weight"], sd[f"{pre}attn.out_proj.bias"] = w(c, c), w(c)
        sd[f"{pre}attn.kope_mix_coef"] = torch.eye(r) + w(heads, r, r, std=0.3)
        sd[f"{pre}mlp.c_fc.weight"], sd[f"{pre}mlp.c_fc.bias"] = w(4 * c, c), w(4 * c)
        sd[f"{pre}mlp.c_proj.weight"], sd[f"{pre}mlp.c_proj.bias"] = w(c, 4 * c), w(c)
    coupling = f"{v}transformer.shared_phase_coupling."
    for proj in ("q_proj", "k_proj"):
        sd[f"{coupling}{proj}.weight"], sd[f"{coupling}{proj}.bias"] = w(c, c, std=0.3), w(c, std=0.1)
    sd[f"{coupling}qk_scale"] = w(1, 1, heads, d, std=0.3, mean=1.0)
    return sd | {k: t + w(*t.shape, std=0.01) if t.is_floating_point() else t for k, t in text.items()}


# --- their forward passes, written here from their architecture -----------------------------------------------


def _rotate(x, cos, sin):
    re_, im = x[..., 0::2], x[..., 1::2]
    return torch.stack((re_ * cos - im * sin, re_ * sin + im * cos), dim=-1).flatten(-2)


def _attend(q, k, v):
    weights = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", weights, v)


def _grid_angles(gh: int, gw: int, rot: int) -> torch.Tensor:
    freqs = 1.0 / 20.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    return torch.cat((ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs), dim=-1)


def their_backbone_forward(sd: dict, images: torch.Tensor, heads: int) -> dict[str, torch.Tensor]:
    """``DinoVisionTransformerKoPE`` (shared coupling, phases ``[B, N, H, R]`` as cos and sin) in float64."""
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v.double() for k, v in sd.items()}
    vo_proj = "shared_phase_coupling.v_proj.weight" in sd
    c = sd["cls_token"].shape[-1]
    d, patch, b = c // heads, sd["patch_embed.proj.weight"].shape[-1], images.shape[0]
    r = d // 2
    t = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    gh, gw = t.shape[-2:]
    t = torch.cat((sd["cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)), 1) + sd["pos_embed"]
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if regs:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]), dim=1)
    angles = _grid_angles(gh, gw, r)
    prefix = torch.zeros(1 + regs, r, dtype=torch.float64)  # CLS and registers start at phase 0
    cos = torch.cat((prefix + 1, angles.cos()))[None, :, None].expand(b, -1, heads, -1)
    sin = torch.cat((prefix, angles.sin()))[None, :, None].expand(b, -1, heads, -1)
    n = t.shape[1]

    def ln(x, name):
        return F.layer_norm(x, (c,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)

    def lin(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        pre = f"blocks.{i}."
        scale = {ls: sd.get(f"{pre}{ls}.gamma", torch.ones((), dtype=torch.float64)) for ls in ("ls1", "ls2")}
        q, k, v = lin(ln(t, pre + "norm1"), pre + "attn.qkv").view(b, n, 3, heads, d).unbind(2)
        mix = sd[pre + "attn.kope_mix_coef"]
        mc, ms = torch.einsum("bnhc,hcd->bnhd", cos, mix), torch.einsum("bnhc,hcd->bnhd", sin, mix)
        inv = (mc.square() + ms.square()).clamp_min(1e-5).rsqrt()
        mc, ms = mc * inv, ms * inv
        out = _rotate(_attend(_rotate(q, mc, ms), _rotate(k, mc, ms), _rotate(v, mc, ms)), mc, -ms)
        t = t + scale["ls1"] * lin(out.reshape(b, n, c), pre + "attn.proj")
        t = t + scale["ls2"] * lin(F.gelu(lin(ln(t, pre + "norm2"), pre + "mlp.fc1")), pre + "mlp.fc2")
        drive = ln(t, pre + "phase_norm") if vo_proj else t
        cq = lin(drive, "shared_phase_coupling.q_proj").view(b, n, heads, d)
        ck = lin(drive, "shared_phase_coupling.k_proj").view(b, n, heads, d)
        phase = torch.cat((cos, sin), dim=-1)
        if vo_proj:
            values = lin(phase.reshape(b, n, c), "shared_phase_coupling.v_proj").view(b, n, heads, d)
            field = lin(_attend(cq, ck, values).reshape(b, n, c), "shared_phase_coupling.o_proj").view(b, n, heads, d)
        else:
            cq = F.rms_norm(cq, (d,)) * sd["shared_phase_coupling.qk_scale"]
            field = _attend(cq, F.rms_norm(ck, (d,)), phase)
        delta, z = field.view(b, n, heads, 2, r), phase.view(b, n, heads, 2, r)
        delta = delta - (delta * z).sum(-2, keepdim=True) * z
        if "shared_phase_coupling_gamma._raw" in sd:
            gamma = F.softplus(sd["shared_phase_coupling_gamma._raw"]).clamp_max(1.0)
        else:
            gamma = sd[pre + "phase_gamma"]
        z = F.normalize(z + gamma * delta, dim=-2, eps=1e-5)
        cos, sin = z[..., 0, :], z[..., 1, :]
    t = ln(t, "norm")
    out = {"cls_token": t[:, 0], "register_tokens": t[:, 1:1 + regs], "patch_tokens": t[:, 1 + regs:],
           "patch_phases": torch.atan2(sin, cos)[:, 1 + regs:].transpose(1, 2)}
    if "head.weight" in sd:
        out["logits"] = lin(t[:, 0], "head")
    return out


def their_clip_image(sd: dict, images: torch.Tensor, heads: int, gamma: float = 0.05) -> torch.Tensor:
    """Their open_clip KoPE ``VisionTransformer`` (phases ``[B, N, H, R, 2]``, interleaved) in float64."""
    sd = {k.removeprefix("visual."): v.double() for k, v in sd.items() if k.startswith("visual.")}
    c = sd["class_embedding"].shape[0]
    d, patch, b = c // heads, sd["conv1.weight"].shape[-1], images.shape[0]
    r = d // 2

    def ln(x, name):
        return F.layer_norm(x, (c,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def lin(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    t = F.conv2d(images, sd["conv1.weight"], None, stride=patch)
    gh, gw = t.shape[-2:]
    t = torch.cat((sd["class_embedding"].expand(b, 1, c), t.flatten(2).transpose(1, 2)), 1)
    t = ln(t + sd["positional_embedding"], "ln_pre")
    angles = _grid_angles(gh, gw, r)
    cls = torch.stack((torch.ones(1, r, dtype=torch.float64), torch.zeros(1, r, dtype=torch.float64)), dim=-1)
    state = torch.cat((cls, torch.stack((angles.cos(), angles.sin()), dim=-1)))[None, :, None]
    state = state.expand(b, -1, heads, -1, -1)
    n = t.shape[1]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        pre = f"transformer.resblocks.{i}."
        qkv = F.linear(ln(t, pre + "ln_1"), sd[pre + "attn.in_proj_weight"], sd[pre + "attn.in_proj_bias"])
        q, k, v = (x.reshape(b, n, heads, d) for x in qkv.chunk(3, dim=-1))
        mixed = torch.einsum("bnhdi,hde->bnhei", state, sd[pre + "attn.kope_mix_coef"])
        mixed = mixed * mixed.square().sum(-1, keepdim=True).clamp_min(1e-5).rsqrt()
        mc, ms = mixed.unbind(-1)
        out = _rotate(_attend(_rotate(q, mc, ms), _rotate(k, mc, ms), _rotate(v, mc, ms)), mc, -ms)
        t = t + lin(out.reshape(b, n, c), pre + "attn.out_proj")
        t = t + lin(F.gelu(lin(ln(t, pre + "ln_2"), pre + "mlp.c_fc")), pre + "mlp.c_proj")
        coupling = "transformer.shared_phase_coupling."
        cq = F.rms_norm(lin(t, coupling + "q_proj").view(b, n, heads, d), (d,)) * sd[coupling + "qk_scale"]
        ck = F.rms_norm(lin(t, coupling + "k_proj").view(b, n, heads, d), (d,))
        delta = _attend(cq, ck, state.flatten(-2)).view(b, n, heads, r, 2)
        delta = delta - (delta * state).sum(-1, keepdim=True) * state
        state = F.normalize(state + gamma * delta, dim=-1, eps=1e-5)
    return ln(t, "ln_post")[:, 0] @ sd["proj"]


def images(batch: int = 2, size: int = 32, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7), dtype=dtype)


def converted(fmt: str, theirs: dict, settings: dict | None = None, name: str = "ViT-KoPE-B-16"):
    target = layout.model_for(fmt, theirs, settings, open_clip_name=name)
    ours, dropped = layout.from_authors(fmt, theirs, target)
    model = target.build().eval()
    model.load_state_dict(ours, strict=True)
    return model, target, dropped


def held_gamma(theirs: dict, model: torch.nn.Module) -> dict:
    """Their tensors with each fixed ``phase_gamma`` replaced by the step size our float32 ``gamma_raw`` holds
    (``softplus`` of the nearest float32 to ``inverse_softplus(γ)``, about 3e-8 off): with the large random
    weights here, 12 blocks amplify that to 1e-4, which would hide what the test is for."""
    coupling = model.visual.trunk.coupling if hasattr(model, "visual") else model.coupling
    gamma = torch.tensor(float(coupling.gamma), dtype=torch.float64)
    return {k: gamma if k.endswith("phase_gamma") else v for k, v in theirs.items()}


def assert_same_phases(ours: torch.Tensor, theirs: torch.Tensor, atol: float) -> None:
    assert (torch.polar(torch.ones_like(ours), ours) - torch.polar(torch.ones_like(theirs), theirs)).abs().max() < atol


# --- the key map against their forward pass (float64) ---------------------------------------------------------


def test_supervised_release_equals_their_forward_pass():
    theirs = their_backbone(**SMALL, vo_proj=True, classes=10)
    model, target, dropped = converted("supervised", theirs, PUBLISHED_SUPERVISED_META)
    assert (target.name, target.kwargs["coupling"], target.kwargs["img_size"]) == (
        "vit_kope_small_patch16_224", "vo_proj", 32)
    assert dropped == ["mask_token"]
    assert abs(float(model.coupling.gamma) - 0.3) < 1e-7  # their per-block γ buffers, as our one step size
    model = model.double()
    x = images()
    with torch.no_grad():
        reference = their_backbone_forward(held_gamma(theirs, model), x, heads=6)
        out = model.forward_feature_dict(x)
        logits = model(x)
    assert (logits - reference["logits"]).abs().max() < 1e-10
    assert (out["patch_tokens"] - reference["patch_tokens"]).abs().max() < 1e-10
    assert_same_phases(out["patch_phases"], reference["patch_phases"], 1e-10)


def test_simdino_teacher_with_registers_and_chunked_blocks_equals_their_forward_pass():
    backbone = their_backbone(**SMALL, registers=4, layerscale=True, learnable_gamma=True, chunks=4)
    assert "blocks.3.11.attn.qkv.weight" in backbone
    g = torch.Generator().manual_seed(3)
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | {
        "dino_head.mlp.0.weight": randn(g, 2048, 384), "dino_head.last_layer.weight_g": randn(g, 256, 1),
        "ibot_head.mlp.0.weight": randn(g, 2048, 384)}
    model, target, dropped = converted("simdino", teacher, SIMDINO_STUDENT)
    assert target.name == "vit_kope_small_patch16_224_reg4" and target.registers == 4
    assert target.kwargs["learnable_gamma"] and target.kwargs["init_values"] == 0.1
    assert dropped == ["dino_head.last_layer.weight_g", "dino_head.mlp.0.weight", "ibot_head.mlp.0.weight",
                       "mask_token"]
    # our reg4 models give the CLS token no position row: theirs is folded into cls_token
    assert model.pos_embed.shape[1] == 4 and torch.equal(
        model.cls_token.double(), (backbone["cls_token"] + backbone["pos_embed"][:, :1]).float().double())
    model = model.double()
    x = images()
    with torch.no_grad():
        reference = their_backbone_forward(backbone, x, heads=6)
        out = model.forward_feature_dict(x)
    for key in ("cls_token", "register_tokens", "patch_tokens"):
        assert (out[key] - reference[key]).abs().max() < 1e-10, key
    assert_same_phases(out["patch_phases"], reference["patch_phases"], 1e-10)


def test_open_clip_kope_clip_equals_their_tower_and_keeps_the_text_tower():
    theirs = their_clip()
    model, target, dropped = converted("open_clip", theirs, {"kope_coupling_gamma": 0.05}, "ViT-KoPE-Demo-8-64")
    assert target.library == "open_clip" and dropped == []
    ours = model.state_dict()
    for key, value in theirs.items():
        if not key.startswith("visual."):
            assert torch.equal(ours[key], value), key
    # the demo tower is 64 wide with a 64-d embedding: a square projection, so only the forward shows a transpose
    assert theirs["visual.proj"].shape == (64, 64)
    gamma = float(model.visual.trunk.coupling.gamma)  # the config's 0.05, as our float32 gamma_raw holds it
    assert abs(gamma - 0.05) < 1e-8
    x = images(size=64)
    with torch.no_grad():
        reference = their_clip_image(theirs, x, heads=2, gamma=gamma)
        ours_image = model.double().encode_image(x)
    assert (ours_image - reference).abs().max() < 1e-10


# --- round trips ----------------------------------------------------------------------------------------------


def perturbed(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() and not k.endswith("gamma_raw")
            else v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt, target", [
    ("supervised", layout.OurModel("timm", "vit_kope_small_patch16_224",
                                   {"coupling": "vo_proj", "img_size": 32, "num_classes": 7, "gamma": 0.3})),
    ("simdino", layout.OurModel("timm", "vit_kope_small_patch16_224_reg4",
                                {"learnable_gamma": True, "init_values": 0.1, "img_size": 32, "num_classes": 0},
                                registers=4)),
    ("open_clip", layout.OurModel("open_clip", "ViT-KoPE-Demo-8-64")),
])
def test_ours_to_theirs_to_ours_is_the_identity(fmt, target):
    ours = perturbed(target.build())
    theirs = layout.to_authors(fmt, ours, target)
    back, _ = layout.from_authors(fmt, theirs, target)
    assert back.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(back[key], value), key


def test_their_layout_of_ours_has_their_names_and_shapes():
    target = layout.OurModel("timm", "vit_kope_small_patch16_224_reg4",
                             {"learnable_gamma": True, "init_values": 0.1, "img_size": 32, "num_classes": 0},
                             registers=4)
    theirs = layout.to_authors("simdino", target.build().state_dict(), target)
    generated = their_backbone(**SMALL, registers=4, layerscale=True, learnable_gamma=True)
    assert {k.removeprefix("backbone."): tuple(v.shape) for k, v in theirs.items()} == {
        k: tuple(v.shape) for k, v in generated.items()}


# --- one-line errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"shared_phase_coupling.q_proj.0.weight": torch.zeros(384, 384)}),
     "shared_phase_coupling.q_proj.0.weight: not in the key map"),
    (lambda sd: sd.update({"blocks.3.attn.kope_mix_coef": torch.zeros(6, 32, 31)}),
     "blocks.3.attn.kope_mix_coef: shape (6, 32, 31) does not fit our blocks.3.attn.phase_mix (6, 32, 32)"),
    (lambda sd: sd.pop("blocks.1.norm2.bias"), "blocks.1.norm2.bias: missing"),
    (lambda sd: sd.update({"blocks.5.phase_gamma": torch.tensor(0.1)}), "phase_gamma differ between blocks"),
])
def test_a_key_that_does_not_fit_fails_with_one_line_naming_it(edit, message):
    theirs = their_backbone(**SMALL, vo_proj=True, classes=10)
    edit(theirs)
    with pytest.raises(layout.LayoutError) as error:
        target = layout.model_for("supervised", theirs, PUBLISHED_SUPERVISED_META, "release.pth")
        layout.from_authors("supervised", theirs, target, "release.pth")
    assert message in str(error.value) and str(error.value).startswith("release.pth: ")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("setting, message", [
    ({"kope_coupling_use_tanh": True}, "kope_coupling_use_tanh=True"),
    ({"kope_mix_phase_norm": False}, "kope_mix_phase_norm=False"),
    ({"kope_coupling_qknorm": True}, "coupling q/k RMS-norm on with value/output projections"),
    ({"arch_name": "vit_rope"}, "only vit_kope imports"),
])
def test_settings_our_model_cannot_represent_are_refused(setting, message):
    theirs = their_backbone(**SMALL, vo_proj=True, classes=10)
    with pytest.raises(layout.LayoutError, match=re.escape(message)):
        layout.model_for("supervised", theirs, PUBLISHED_SUPERVISED_META | setting, "release.pth")


def test_a_backbone_size_without_a_name_of_ours_is_refused():
    theirs = their_backbone(width=64, depth=2, heads=2, vo_proj=True)
    with pytest.raises(layout.LayoutError, match="a 2-block, 64-wide backbone has no name of ours"):
        layout.model_for("supervised", theirs, PUBLISHED_SUPERVISED_META)


# --- the tool: files in, export folders out -------------------------------------------------------------------


def run_tool(*args: str) -> dict:
    return load_tool("import_checkpoint").main([str(a) for a in args])


def split_release(sd: dict, meta: dict) -> dict:
    backbone = {k: v.float() for k, v in sd.items() if not k.startswith("head.")}
    head = {k.removeprefix("head."): v.float() for k, v in sd.items() if k.startswith("head.")}
    return {"backbone": backbone, "head": head, "meta": meta}


@pytest.mark.slow
def test_tool_imports_a_supervised_release_and_its_safetensors_mirror(tmp_path, capsys):
    theirs = their_backbone(**SMALL, vo_proj=True, classes=1000)
    release = split_release(theirs, PUBLISHED_SUPERVISED_META)
    torch.save(release, tmp_path / "release.pth")
    summary = run_tool("--format", "supervised", tmp_path / "release.pth", tmp_path / "export")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    folder = tmp_path / "export"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md", "SHA256SUMS"}
    verify_checksums(folder)
    assert summary["max_abs_diff"]["timm"] <= 1e-5 and summary["weights"] == "trained"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_kope_small_patch16_224" and config["model_args"]["coupling"] == "vo_proj"
    assert len(config["label_names"]) == 1000 and config["pretrained_cfg"]["crop_pct"] == 1.0
    card = (folder / "README.md").read_text()
    assert "the KoPE authors' supervised checkpoint" in card and "80.1" in card
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval().double()
    x = images()
    with torch.no_grad():
        reference = their_backbone_forward(held_gamma(theirs, model), x, heads=6)
        assert (model(x) - reference["logits"]).abs().max() < 1e-10

    flat = {f"{group}.{k}": v for group in ("backbone", "head") for k, v in release[group].items()}
    save_file(flat, str(tmp_path / "release.safetensors"),
              metadata={k: json.dumps(v) for k, v in release["meta"].items()})
    mirror = run_tool("--format", "supervised", tmp_path / "release.safetensors", tmp_path / "mirror")
    assert mirror["sha256"] == summary["sha256"]  # the same weights, byte for byte


@pytest.mark.slow
def test_tool_imports_a_simdino_teacher_with_its_config(tmp_path):
    backbone = their_backbone(**SMALL, registers=4, layerscale=True, learnable_gamma=True, chunks=4)
    g = torch.Generator().manual_seed(3)
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | {"dino_head.mlp.0.weight": randn(g, 64, 384)}
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"student": SIMDINO_STUDENT, "optim": {"epochs": 100}}))
    summary = run_tool("--format", "simdino", tmp_path / "teacher_checkpoint.pth", tmp_path / "export",
                       "--source-config", tmp_path / "config.yaml")
    assert summary["cls_position_row_folded"] and summary["weights"] == "teacher"
    assert summary["dropped"] == ["dino_head.mlp.0.weight", "mask_token"]
    folder = tmp_path / "export"
    verify_checksums(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_kope_small_patch16_224_reg4"
    assert config["pretrained_cfg"]["crop_pct"] == 0.875  # DINO's evaluation crop
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval().double()
    x = images()
    with torch.no_grad():
        out, reference = model.forward_feature_dict(x), their_backbone_forward(backbone, x, heads=6)
    for key in ("cls_token", "register_tokens", "patch_tokens"):
        assert (out[key] - reference[key]).abs().max() < 1e-10, key


@pytest.mark.slow
def test_tool_imports_an_open_clip_checkpoint_that_open_clip_and_timm_load(tmp_path):
    theirs = their_clip()
    checkpoint = {"epoch": 32, "name": "kope-clip", "state_dict": {f"module.{k}": v for k, v in theirs.items()}}
    torch.save(checkpoint, tmp_path / "epoch_32.pt")
    config = {"embed_dim": 64, "vision_cfg": {"kope_mode": True, "kope_coupling_gamma": 0.05, "kope_mix": True,
                                              "kope_vo_rotation": True, "kope_mix_phase_norm": True}}
    (tmp_path / "ViT-KoPE-Demo.json").write_text(json.dumps(config))
    summary = run_tool("--format", "open_clip", tmp_path / "epoch_32.pt", tmp_path / "export",
                       "--open-clip-model", "ViT-KoPE-Demo-8-64", "--source-config", tmp_path / "ViT-KoPE-Demo.json")
    folder = tmp_path / "export"
    assert {"open_clip_config.json", "open_clip_model.safetensors", "config.json", "model.safetensors",
            "README.md", "SHA256SUMS"} <= {p.name for p in folder.iterdir()}
    verify_checksums(folder)
    assert set(summary["max_abs_diff"]) == {"open_clip", "timm"}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    x = images(size=64).float()
    with torch.no_grad():
        reference = their_clip_image(theirs, x.double(), heads=2)
        assert (model.encode_image(x).double() - reference).abs().max() < 1e-4
        tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a handwritten seven"])
        text = model.encode_text(tokens)
    assert torch.isfinite(text).all() and text.shape == (1, 64)
    trunk = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        assert (model.visual.trunk(x) - trunk(x)).abs().max() < 1e-6


def test_tool_fails_with_one_line_and_leaves_nothing_behind(tmp_path, capsys):
    theirs = their_backbone(**SMALL, vo_proj=True, classes=10)
    theirs["blocks.2.attn.q_norm.weight"] = torch.ones(64)
    torch.save(split_release(theirs, PUBLISHED_SUPERVISED_META), tmp_path / "release.pth")
    with pytest.raises(SystemExit) as exit_info:
        run_tool("--format", "supervised", tmp_path / "release.pth", tmp_path / "export")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "blocks.2.attn.q_norm.weight: not in the key map" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.pth"]


def test_tool_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    theirs = their_backbone(**SMALL, vo_proj=True, classes=10)
    torch.save(split_release(theirs, PUBLISHED_SUPERVISED_META), tmp_path / "release.pth")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        run_tool("--format", "supervised", tmp_path / "release.pth", tmp_path / "export")
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "export" / "keep.txt").read_text() == "mine"
