"""The ``pretrain`` stage in ``clip`` mode on the demo's captioned images (downloaded by img2dataset from a local
server, sharded by ``shard_datacomp``), 2 ranks with ZeRO-1: a run killed with SIGKILL then resumed ends with
bitwise the same model as an uninterrupted one. That CLIP training learns is the demo pipeline's test: its
CLIP loss stays near chance for about 150 steps before it reads the digits, far more than fit here."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.data.manifest import Manifest
from pipeline.models.clip import create_kope_clip
from tests.train.helpers import (
    exported_weights,
    pretrain_block,
    run_pipeline_file,
)

pytestmark = pytest.mark.slow

MODEL = "ViT-KoPE-Ti-16-64"


def clip_block(data: str) -> dict[str, Any]:
    block = pretrain_block(
        data, mode="clip", model={"name": MODEL, "kwargs": {}}, global_batch_size=8, steps=40, zero_stage=1,
        log_every_steps=10, checkpoint={"every_steps": 8, "keep": 2},
        optim={"name": "adamw", "lr": 1e-4, "weight_decay": 0.2, "betas": [0.9, 0.98]},
    )
    del block["supervised"]
    return block


def test_clip_run_through_kope_run_exports_an_open_clip_model(captions, tmp_path):
    """Two ranks through `kope run`; exact resume of CLIP runs is in tests/train/test_resume_matrix.py."""
    assert Manifest.load(captions).num_samples == 64
    stages = {"pretrain": clip_block(str(captions))}
    reference = run_pipeline_file(tmp_path / "whole", stages)
    outputs = json.loads((reference / "state" / "pretrain.json").read_text())["outputs"]
    assert outputs["steps"] == 40 and outputs["skipped_steps"] == 0
    assert 1.5 < outputs["first_loss"] < 2.6, "about ln(8): 4 captions per rank against 8 images"
    weights = exported_weights(reference)
    model = create_kope_clip(MODEL)[0]
    model.load_state_dict(weights)  # the export is an open_clip state dict
    spec = json.loads((reference / "pretrain" / "model.json").read_text())
    assert (spec["library"], spec["name"]) == ("open_clip", MODEL)
