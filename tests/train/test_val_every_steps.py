"""Validation top-1 during supervised training (``supervised.val_every_steps``): a point every N steps and at the
end, the last one the exported model's, and the trained weights bit for bit those of a run without it."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.core.errors import ConfigError
from tests.train.helpers import assert_same_tensors, exported_weights, pretrain_block, run_stage_here, stage_settings


def supervised(shards, val_every_steps: int) -> dict:
    return {"ema_decay": 0.0, "aug": {"image_size": 64}, "val_data": str(shards["val"]),
            "val_every_steps": val_every_steps}


@pytest.mark.slow
def test_val_top1_is_logged_every_n_steps_and_at_the_end_without_changing_training(shards, tmp_path, one_rank):
    block = pretrain_block(str(shards["train"]), steps=7, log_every_steps=1,
                           supervised=supervised(shards, val_every_steps=3))
    outputs = run_stage_here(block, tmp_path / "with")
    events = EventAccumulator(str(tmp_path / "with" / "pretrain" / "tensorboard"))
    events.Reload()
    points = events.Scalars("model/val_top1")
    assert [point.step for point in points] == [3, 6, 7]
    assert all(0 <= point.value <= 1 for point in points)
    assert points[-1].value == pytest.approx(outputs["val_top1"], abs=1e-6), "no EMA: the last point is the export's"

    plain = pretrain_block(str(shards["train"]), steps=7, log_every_steps=1,
                           supervised=supervised(shards, val_every_steps=0))
    run_stage_here(plain, tmp_path / "without")
    assert_same_tensors(exported_weights(tmp_path / "without"), exported_weights(tmp_path / "with"))


def test_val_every_steps_needs_val_data_and_a_logging_step(shards):
    block = {"data": str(shards["train"]), "steps": 1, "global_batch_size": 4, "loader": {"batch_size": 4},
             "supervised": {"val_every_steps": 100}}
    with pytest.raises(ConfigError, match="stages.pretrain.supervised.val_every_steps: needs supervised.val_data"):
        stage_settings(block)
    block["supervised"]["val_data"] = str(shards["val"])
    with pytest.raises(ConfigError, match="stages.pretrain.supervised.val_every_steps: 100 is not a multiple of "
                                          "log_every_steps 30"):
        stage_settings({**block, "log_every_steps": 30})
