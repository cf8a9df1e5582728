"""Choosing the exported weights (trained or averaged), the backbone prefix, and strict loading errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.export.exporter import load_into
from pipeline.export.safe_load import CheckpointError
from pipeline.export.weights import WeightsLayout, backbone_state_dict, select_weights

LAYOUT = WeightsLayout(backbone_prefix="backbone.", averaged_path=("task", "teacher"), averaged_name="teacher")


def trained() -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.ones(2), "backbone.steps": torch.tensor([3]), "head.w": torch.zeros(1)}


def test_auto_takes_the_averaged_copy_and_completes_unaveraged_integer_buffers():
    client = {"task": {"teacher": {"module.backbone.w": torch.full((2,), 5.0), "module.head.w": torch.ones(1)}}}
    weights, name = select_weights(trained(), client, LAYOUT, "auto")
    assert name == "teacher"
    assert weights["backbone.w"].tolist() == [5.0, 5.0] and weights["backbone.steps"].tolist() == [3]
    assert backbone_state_dict(weights, LAYOUT.backbone_prefix).keys() == {"w", "steps"}


def test_without_an_averaged_copy_auto_falls_back_and_averaged_refuses():
    assert select_weights(trained(), {"task": {}}, LAYOUT, "auto")[1] == "trained"
    with pytest.raises(CheckpointError, match="no averaged weights at task/teacher"):
        select_weights(trained(), {"task": {}}, LAYOUT, "averaged")


def test_an_averaged_copy_of_another_model_is_refused():
    client = {"task": {"teacher": {"other.w": torch.ones(2)}}}
    with pytest.raises(CheckpointError, match="do not match"):
        select_weights(trained(), client, LAYOUT, "auto")


def test_load_into_restores_scalar_shapes_and_names_mismatches():
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(2.0))
    model.linear = nn.Linear(2, 2)
    state = {"scale": torch.tensor([7.0]), "linear.weight": torch.eye(2), "linear.bias": torch.zeros(2)}
    load_into(model, state, "ckpt")
    assert model.scale.shape == () and model.scale.item() == 7.0
    with pytest.raises(CheckpointError, match=r"ckpt: weights do not fit Module: missing \['linear.bias'\]"):
        load_into(model, {"scale": torch.tensor(1.0), "linear.weight": torch.eye(2)}, "ckpt")
