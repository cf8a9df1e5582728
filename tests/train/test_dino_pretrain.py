"""The ``pretrain`` stage in ``dino`` mode on the demo shards, 2 ranks with ZeRO-2: the loss falls, and a run
killed with SIGKILL then resumed ends with bitwise the same student and teacher as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.train.helpers import (
    checkpoint_weights,
    demo_shards,
    exported_weights,
    pretrain_block,
    run_pipeline_file,
)

pytestmark = pytest.mark.slow

TINY_DINO = {"name": "vit_kope_tiny_patch16_224",
             "kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "learnable_gamma": True}}


def dino_block(data: str) -> dict[str, Any]:
    block = pretrain_block(
        data, mode="dino", model=TINY_DINO, global_batch_size=8, steps=20, zero_stage=2, log_every_steps=5,
        optim={"name": "adamw", "lr": 2e-3, "weight_decay": 0.04, "grad_clip": 3.0},
        dino={"head_hidden_dim": 64, "head_bottleneck_dim": 32, "phase_alignment_weight": 0.1,
              "aug": {"global_size": 32, "local_size": 16, "local_crops": 2, "patch_size": 8}},
    )
    del block["supervised"]
    return block


def stage_outputs(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "state" / "pretrain.json").read_text())["outputs"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return demo_shards(tmp_path_factory.mktemp("demo"))


def test_dino_loss_falls_and_the_export_is_the_teacher(shards, tmp_path):
    """Two ranks through `kope run`; exact resume of DINO runs is in tests/train/test_resume_matrix.py."""
    stages = {"pretrain": dino_block(str(shards["train"]))}
    reference = run_pipeline_file(tmp_path / "whole", stages)
    outputs = stage_outputs(reference)
    assert outputs["steps"] == 20 and outputs["skipped_steps"] == 0
    first, last = outputs["first_loss"], outputs["last_loss"]
    assert last < first - 0.25 * abs(first), (first, last)
    teacher = exported_weights(reference)
    student = checkpoint_weights(reference)
    # The export is the teacher (an EMA of the student), not the student.
    assert not student["backbone.blocks.0.attn.qkv.weight"].equal(teacher["blocks.0.attn.qkv.weight"])
