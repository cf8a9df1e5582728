"""Parameter groups of a real KoPE ViT: weight-decay exclusions, layer-wise lr decay, per-module multipliers."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import pipeline.models  # noqa: F401  (registers vit_kope_*)
from pipeline.train.engine import set_schedule
from pipeline.train.optim import OptimSettings, build_optimizer
from pipeline.train.param_groups import build_param_groups


def tiny_kope(**kwargs) -> nn.Module:
    return timm.create_model("vit_kope_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                             num_heads=2, num_classes=5, learnable_gamma=True, **kwargs)


def scales(groups) -> dict[str, tuple[float, float]]:
    return {name: (group["lr_scale"], group["wd_scale"]) for group in groups for name in group["names"]}


def test_no_weight_decay_on_norms_biases_gamma_position_embedding_and_tokens():
    by_name = scales(build_param_groups(tiny_kope(reg_tokens=2, init_values=0.1)))
    for name in ("pos_embed", "cls_token", "reg_token", "norm.weight", "blocks.0.norm1.bias", "blocks.1.ls1.gamma",
                 "coupling.gamma_raw", "patch_embed.proj.bias", "head.bias"):
        assert by_name[name][1] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "coupling.qk.weight", "head.weight"):
        assert by_name[name][1] == 1.0, name


def test_layer_decay_and_module_multipliers_compose():
    groups = build_param_groups(tiny_kope(), layer_decay=0.5, lr_multipliers={"patch_embed": 0.2, "coupling": 0.5})
    by_name = scales(groups)
    # timm's grouping: stem = layer 0, block i = layer i + 1 (the final norm and the shared coupling join the
    # last block), the head its own top layer with scale 1.
    assert by_name["head.weight"][0] == 1.0
    assert by_name["blocks.1.mlp.fc1.weight"][0] == 0.5 and by_name["norm.weight"][0] == 0.5
    assert by_name["blocks.0.attn.proj.weight"][0] == 0.25
    assert by_name["pos_embed"][0] == pytest.approx(0.125)
    assert by_name["patch_embed.proj.weight"][0] == pytest.approx(0.125 * 0.2)
    assert by_name["coupling.qk.weight"][0] == pytest.approx(0.5 * 0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(tiny_kope().parameters()))


def test_multipliers_match_module_paths_anywhere_in_a_name_and_unknown_paths_are_refused():
    wrapped = nn.ModuleDict({"backbone": tiny_kope()})
    by_name = scales(build_param_groups(wrapped, lr_multipliers={"patch_embed": 0.2}))
    assert by_name["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.2)
    assert by_name["backbone.blocks.0.attn.qkv.weight"][0] == 1.0
    with pytest.raises(ValueError, match="no parameter lies under 'patch_embedding'"):
        build_param_groups(wrapped, lr_multipliers={"patch_embedding": 0.2})


def test_schedule_values_reach_each_group_scaled():
    model = tiny_kope()
    groups = build_param_groups(model, layer_decay=0.5)
    optimizer = build_optimizer(groups, OptimSettings(), zero_stage=0, device=torch.device("cpu"))
    set_schedule(optimizer, lr=1e-3, weight_decay=0.05)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
        assert group["weight_decay"] == pytest.approx(0.05 * group["wd_scale"])
    assert all("names" not in group for group in optimizer.param_groups)
