"""The ``pretrain`` stage in this process (one rank): outputs, TensorBoard, retention, settings checks on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pipeline.models  # noqa: F401  (registers vit_kope_*)
from pipeline.checkpoint.files import CheckpointError
from pipeline.core.errors import ConfigError
from pipeline.train.run import run_length
from pipeline.train.tasks.supervised import SupervisedTask, TimmModel
from tests.train.helpers import (
    TINY_KOPE,
    exported_weights,
    pretrain_block,
    rewind_to_checkpoint,
    run_stage_here,
    stage_settings,
)


def test_outputs_tensorboard_and_exported_model(shards, tmp_path, one_rank):
    block = pretrain_block(str(shards["train"]), steps=4, checkpoint={"every_steps": 1, "keep": 2},
                           supervised={"ema_decay": 0.9, "aug": {"image_size": 64}, "val_data": str(shards["val"])})
    outputs = run_stage_here(block, tmp_path)
    assert outputs["steps"] == 4 and outputs["samples_seen"] == 64 and outputs["val_samples"] == 90
    assert 0 <= outputs["val_top1"] <= outputs["val_top5"] <= 1
    out = tmp_path / "pretrain"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]

    spec = json.loads((out / "model.json").read_text())
    assert (spec["library"], spec["mode"], spec["checkpoint"]) == ("timm", "supervised", "checkpoints/step_00000004")
    model = timm.create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(exported_weights(tmp_path))
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 90)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "opt/lr", "opt/weight_decay", "opt/grad_norm", "opt/skipped_steps", "perf/img_per_s",
            "perf/step_s", "perf/data_wait_s", "perf/epoch", "model/gamma", "model/phase_synchrony",
            "eval/val_top1"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    # the lr of the step just taken: warm-up step 1 of 2 from 1e-6 to 1e-3, then cosine step 1 of 2 to 1e-5
    assert [e.value for e in events.Scalars("opt/lr")] == pytest.approx([5.005e-4, 5.05e-4], rel=1e-5)
    assert [e.value for e in events.Scalars("model/gamma")] == pytest.approx([0.05, 0.05])
    assert all(0 < e.value <= 1 for e in events.Scalars("model/phase_synchrony"))
    assert all(e.value > 0 for e in events.Scalars("perf/img_per_s"))


def test_resume_refuses_changed_training_settings_and_accepts_changed_checkpointing(shards, tmp_path, one_rank):
    block = pretrain_block(str(shards["train"]), steps=4)
    run_stage_here(block, tmp_path)
    rewind_to_checkpoint(tmp_path, 2)
    changed = {**block, "optim": {**block["optim"], "lr": 2e-3}}
    with pytest.raises(CheckpointError, match=r"written with other settings \(optim.lr: 0.001 -> 0.002\)"):
        run_stage_here(changed, tmp_path)
    outputs = run_stage_here({**block, "checkpoint": {"every_steps": 3, "keep": 1}, "log_every_steps": 1}, tmp_path)
    assert outputs["steps"] == 4


def test_length_from_steps_epochs_or_samples():
    loader = {"batch_size": 4, "samples_per_epoch": 80}  # 10 micro-steps of 4 x 2 ranks per epoch

    def length(**length: float) -> int:
        settings = stage_settings({"data": "/", "global_batch_size": 16, "loader": loader, **length})
        return run_length(settings, Path("/"), world_size=2).total_steps

    assert length(steps=7) == 7
    assert length(epochs=3) == 15
    assert length(samples=100) == 6
    with pytest.raises(ConfigError, match=r"stages.pretrain.epochs: set exactly one of steps, epochs, samples "
                                          r"\(got steps, epochs\)"):
        length(steps=7, epochs=1)
    with pytest.raises(ConfigError, match="stages.pretrain.samples: 10 is less than one optimizer step"):
        length(samples=10)


def test_ema_under_zero3_and_odd_mixup_batches_are_config_errors(shards):
    block = {"data": str(shards["train"]), "steps": 1, "global_batch_size": 4, "loader": {"batch_size": 4}}
    with pytest.raises(ConfigError, match="stages.pretrain.supervised.ema_decay: an EMA of the weights needs "
                                          "zero_stage 0, 1 or 2"):
        stage_settings({**block, "zero_stage": 3})
    with pytest.raises(ConfigError, match="stages.pretrain.loader.batch_size: Mixup/CutMix pairs images within a "
                                          "batch: 3 must be even"):
        stage_settings({**block, "global_batch_size": 3, "loader": {"batch_size": 3}})
    settings = stage_settings({**block, "zero_stage": 3, "supervised": {"ema_decay": 0.0}})
    task = SupervisedTask(settings.supervised, model=TimmModel("vit_kope_tiny_patch16_224"),
                          data_dir=shards["train"], loader=settings.loader, seed=0)
    assert task.num_classes == 90 and task.model_spec()["kwargs"]["num_classes"] == 90


def test_supervised_with_learnable_gamma_trains_and_exports_a_scalar_gamma(shards, tmp_path, one_rank):
    model = {**TINY_KOPE, "kwargs": {**TINY_KOPE["kwargs"], "learnable_gamma": True}}
    run_stage_here(pretrain_block(str(shards["train"]), model=model, steps=3), tmp_path)
    weights = exported_weights(tmp_path)
    rho = [name for name, tensor in weights.items() if "coupling" in name and tensor.dim() == 0]
    assert rho, "the learnable Kuramoto step should be exported as a 0-dim tensor"
    spec = json.loads((tmp_path / "pretrain" / "model.json").read_text())
    timm.create_model(spec["name"], **spec["kwargs"]).load_state_dict(weights)
