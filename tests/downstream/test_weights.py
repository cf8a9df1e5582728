"""Which weights a checkpoint exports, as each task decides (trained, EMA, DINO teacher), and strict loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.checkpoint.files import CheckpointError
from pipeline.export.exporter import load_into
from pipeline.train.tasks import ClipTask, DinoTask, SupervisedTask


def student() -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.ones(2), "backbone.steps": torch.tensor([3]), "dino_head.w": torch.zeros(1)}


def test_supervised_ema_replaces_the_averaged_tensors_and_keeps_integer_buffers():
    trained = {"w": torch.ones(2), "steps": torch.tensor([3])}
    weights, name = SupervisedTask.inference_weights(trained, {"ema": {"w": torch.full((2,), 5.0)}}, "auto")
    assert name == "ema" and weights["w"].tolist() == [5.0, 5.0] and weights["steps"].tolist() == [3]
    assert SupervisedTask.inference_weights(trained, {"ema": None}, "auto")[1] == "trained"
    with pytest.raises(CheckpointError, match="kept no EMA"):
        SupervisedTask.inference_weights(trained, {"ema": None}, "averaged")
    with pytest.raises(CheckpointError, match="do not match"):
        SupervisedTask.inference_weights(trained, {"ema": {"other.w": torch.ones(2)}}, "auto")


def test_dino_exports_the_teacher_backbone_whatever_the_student_checkpoint_holds():
    teacher = {"backbone.w": torch.full((2,), 5.0), "backbone.steps": torch.tensor([3]),
               "dino_head.w": torch.ones(1), "dino_head.frozen_gain": torch.ones(1)}
    weights, name = DinoTask.inference_weights(student(), {"teacher": teacher}, "auto")
    assert name == "teacher" and set(weights) == {"w", "steps"} and weights["w"].tolist() == [5.0, 5.0]
    trained, name = DinoTask.inference_weights(student(), {"teacher": teacher}, "trained")
    assert name == "trained" and trained["w"].tolist() == [1.0, 1.0]
    with pytest.raises(CheckpointError, match="holds no teacher"):
        DinoTask.inference_weights(student(), {}, "averaged")


def test_clip_keeps_no_averaged_copy():
    assert ClipTask.inference_weights({"w": torch.ones(1)}, {}, "auto")[1] == "trained"
    with pytest.raises(CheckpointError, match="keeps no averaged weights"):
        ClipTask.inference_weights({"w": torch.ones(1)}, {}, "averaged")


def test_load_into_restores_scalar_shapes_and_names_mismatches():
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(2.0))
    model.linear = nn.Linear(2, 2)
    state = {"scale": torch.tensor([7.0]), "linear.weight": torch.eye(2), "linear.bias": torch.zeros(2)}
    load_into(model, state, "ckpt")
    assert model.scale.shape == () and model.scale.item() == 7.0
    with pytest.raises(CheckpointError, match=r"ckpt: weights do not fit Module: missing \['linear.bias'\]"):
        load_into(model, {"scale": torch.tensor(1.0), "linear.weight": torch.eye(2)}, "ckpt")
