"""A run directory moved to another path (another filesystem, a renamed project folder) keeps its identity: the
fine-tuning that was interrupted there resumes from its checkpoint and ends as an uninterrupted run."""

from __future__ import annotations

import shutil

import pytest

from pipeline.core.run_dir import RunDir
from tests.train.helpers import (
    TINY_KOPE,
    assert_same_tensors,
    exported_weights,
    kope_run,
    pretrain_block,
    rewind_to_checkpoint,
    write_pipeline,
)


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_in_a_moved_run_directory(shards, tmp_path):
    data = str(shards["train"])
    stages = {
        "pretrain": pretrain_block(data, steps=2, schedule={"warmup_steps": 1},
                                   supervised={"ema_decay": 0.0, "aug": {"image_size": 64}}),
        "export": {"kind": "export", "source": "@pretrain"},
        "finetune": {"kind": "finetune", "init": "@export", "data": data, "global_batch_size": 8,
                     "loader": {"batch_size": 4, "num_workers": 0}, "steps": 4, "checkpoint": {"every_steps": 2},
                     "supervised": {"ema_decay": 0.0, "aug": {"image_size": 64}}},
    }
    assert TINY_KOPE["name"] in str(stages["pretrain"]["model"])
    pipeline = write_pipeline(tmp_path / "first", stages, executor="inline")
    done = kope_run(pipeline)
    assert done.returncode == 0, done.stderr[-4000:]
    run = RunDir(tmp_path / "first" / "run")
    reference = exported_weights(run.root, "finetune")

    rewind_to_checkpoint(run.root, 2, "finetune")  # what a run killed after checkpoint 2 leaves behind
    state = run.read("finetune")
    state.status = "running"
    run.write(state)
    shutil.rmtree(run.stage_dir("finetune") / "export")
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(run.root, moved)

    resumed = kope_run(pipeline, extra_args=["--run-dir", str(moved)])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage pretrain: done, skipped" in resumed.stderr and "stage export: done, skipped" in resumed.stderr
    assert "resumed from step_00000002" in resumed.stderr
    assert_same_tensors(reference, exported_weights(moved, "finetune"))
