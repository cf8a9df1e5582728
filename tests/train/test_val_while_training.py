"""Validation top-1 during supervised training (``supervised.val_while_training``): a point at every logging step,
the last one the exported model's, and the trained weights bit for bit those of a run without it."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.core.errors import ConfigError
from tests.train.helpers import assert_same_tensors, exported_weights, pretrain_block, run_stage_here, stage_settings


def supervised(shards, val_while_training: bool) -> dict:
    return {"ema_decay": 0.0, "aug": {"image_size": 64}, "val_data": str(shards["val"]),
            "val_while_training": val_while_training}


@pytest.mark.slow
def test_val_top1_is_logged_at_every_logging_step_without_changing_training(shards, tmp_path, one_rank):
    block = pretrain_block(str(shards["train"]), steps=6, log_every_steps=2,
                           supervised=supervised(shards, val_while_training=True))
    outputs = run_stage_here(block, tmp_path / "with")
    events = EventAccumulator(str(tmp_path / "with" / "pretrain" / "tensorboard"))
    events.Reload()
    points = events.Scalars("model/val_top1")
    assert [point.step for point in points] == [2, 4, 6]
    assert all(0 <= point.value <= 1 for point in points)
    assert points[-1].value == pytest.approx(outputs["val_top1"], abs=1e-6), "no EMA: the last point is the export's"

    plain = pretrain_block(str(shards["train"]), steps=6, log_every_steps=2,
                           supervised=supervised(shards, val_while_training=False))
    run_stage_here(plain, tmp_path / "without")
    assert_same_tensors(exported_weights(tmp_path / "without"), exported_weights(tmp_path / "with"))


def test_val_while_training_needs_val_data(shards):
    block = {"data": str(shards["train"]), "steps": 1, "global_batch_size": 4, "loader": {"batch_size": 4},
             "supervised": {"val_while_training": True}}
    with pytest.raises(ConfigError, match="stages.pretrain.supervised.val_while_training: needs supervised.val_data"):
        stage_settings(block)
