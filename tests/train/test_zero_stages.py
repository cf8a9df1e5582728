"""ZeRO stages 0-3 (fp32, bf16 and bf16 autocast) with 2 processes: each trains, checkpoints, exports, and
resumes after checkpoint 2 to the same bits; a checkpoint resumes on another rank count only at stage 0."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint.files import CheckpointError
from pipeline.core.ranks import free_port
from tests.train.helpers import (
    REPO,
    assert_same_tensors,
    checkpoint_weights,
    exported_weights,
    pretrain_block,
    rewind_to_checkpoint,
    run_stage_here,
    train_env,
)
from tests.train.zero_worker import CASES, case_name


@pytest.fixture(scope="module")
def zero_runs(shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zero")
    port = str(free_port())
    logs = [out / f"rank{rank}.log" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.train.zero_worker", str(out), str(shards["train"])],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                              env=train_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank, log in enumerate(logs)]
    codes = [proc.wait(timeout=900) for proc in procs]
    assert codes == [0, 0], "".join(log.read_text()[-3000:] for log in logs)
    return out, json.loads((out / "summaries.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "precision"), CASES)
def test_zero_stage_trains_and_resumes_bitwise(zero_runs, zero_stage, precision):
    out, summaries = zero_runs
    name = case_name(zero_stage, precision)
    whole, resumed = summaries[name]["whole"], summaries[name]["resumed"]
    assert whole["steps"] == resumed["steps"] == 4 and whole["skipped_steps"] == 0
    assert 0 < whole["last_loss"] < whole["first_loss"], "the loss falls"
    run_dir = out / name
    assert_same_tensors(load_file(run_dir / "whole.safetensors"), exported_weights(run_dir))
    assert_same_tensors(torch.load(run_dir / "whole_checkpoint.pt"), checkpoint_weights(run_dir))


@pytest.mark.slow
def test_zero_stages_train_the_same_model(zero_runs):
    """Partitioning changes where optimizer states live, not the arithmetic: fp32 runs agree closely."""
    out, _ = zero_runs
    reference = checkpoint_weights(out / case_name(0, "fp32"))
    for zero_stage in (1, 3):
        weights = checkpoint_weights(out / case_name(zero_stage, "fp32"))
        assert all(torch.allclose(reference[k], weights[k], atol=1e-5) for k in reference), zero_stage


@pytest.mark.slow
def test_other_rank_count_resumes_stage_0_and_is_refused_for_partitioned_states(zero_runs, shards, one_rank,
                                                                                   tmp_path):
    out = tmp_path
    for stage in (0, 1):
        shutil.copytree(zero_runs[0] / case_name(stage, "fp32"), out / case_name(stage, "fp32"))
    block = pretrain_block(str(shards["train"]), steps=4, zero_stage=1, precision="fp32",
                           supervised={"ema_decay": 0.9, "aug": {"image_size": 64}})
    run_dir = out / case_name(1, "fp32")
    rewind_to_checkpoint(run_dir, 2)
    with pytest.raises(CheckpointError, match="written by 2 ranks with ZeRO stage 1, .* resume it on 2 ranks") as error:
        run_stage_here(block, run_dir)
    assert "\n" not in str(error.value)

    run_dir = out / case_name(0, "fp32")
    rewind_to_checkpoint(run_dir, 2)
    outputs = run_stage_here({**block, "zero_stage": 0}, run_dir)
    assert outputs["steps"] == 4 and os.path.exists(run_dir / "pretrain" / "model.safetensors")
    assert torch.isfinite(torch.stack([t.float().sum() for t in exported_weights(run_dir).values()])).all()
