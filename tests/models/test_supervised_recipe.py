"""The supervised recipe builds the authors' supervised KoPE model; the spec's rms_qk variant is one override."""

from __future__ import annotations

import timm
import torch
import yaml

import pipeline.models  # noqa: F401  (registers the KoPE models)
from pipeline.core.config.loader import load_pipeline
from tests.train.helpers import REPO

RECIPE = REPO / "configs" / "recipes" / "supervised.yaml"


def recipe_model(tmp_path, model_override: dict | None = None) -> torch.nn.Module:
    (tmp_path / "train").mkdir(exist_ok=True)
    stage = {"kind": "pretrain", "include": str(RECIPE), "data": str(tmp_path / "train"),
             "supervised": {"val_data": str(tmp_path / "train")}}
    if model_override:
        stage["model"] = model_override
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"name": "supervised", "stages": {"pretrain": stage}}))
    model = load_pipeline(path).stages["pretrain"].settings.model
    with torch.device("meta"):
        return timm.create_model(model.name, **model.kwargs)


def test_recipe_builds_the_authors_supervised_variant(tmp_path):
    model = recipe_model(tmp_path)
    coupling = model.coupling
    assert coupling.variant == "vo_proj" and coupling.q_scale is None and coupling.v is not None
    names = {name for name, _ in model.named_parameters()}
    assert {f"blocks.{i}.phase_norm.weight" for i in range(12)} <= names  # one LayerNorm per block
    assert "coupling.gamma_raw" not in names  # γ is a fixed buffer
    assert model.num_reg_tokens == 0 and model.blocks[0].attn.vo_rotation and model.blocks[0].attn.phase_mix is not None


def test_rms_qk_variant_is_a_one_line_override(tmp_path):
    model = recipe_model(tmp_path, {"kwargs": {"coupling": "rms_qk"}})
    assert model.coupling.variant == "rms_qk" and model.coupling.q_scale is not None
    assert not any("phase_norm" in name for name, _ in model.named_parameters())
    assert abs(model.blocks[-1].drop_path1.drop_prob - 0.05) < 1e-9  # the recipe's other kwargs stay
