"""Exact resume in every combination the README allows, at small size: each mode x the ZeRO stages it supports x
1 or 2 ranks x gradient accumulation x loader workers changed between attempts x a stop by kill (a run left as a
kill after a checkpoint leaves it) or by SIGTERM to one rank (every rank stops at the same step boundary and
saves). Each resumed run ends with the bits of an uninterrupted one, and TensorBoard shows every step once.

The cases run in two process groups (2 ranks and 1 rank) of ``tests/train/resume_worker.py``, started once per
session. A kill during a save is tests/train/test_faults.py; real signals through ``kope run`` under each
executor are tests/train/test_stop_signals.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.checkpoint.files import CheckpointError
from pipeline.core.logs import get_logger
from pipeline.core.ranks import free_port
from pipeline.core.stage import StageContext
from pipeline.export.package import export_training_stage
from tests.train.helpers import (
    REPO,
    STAGE,
    assert_same_tensors,
    checkpoint_weights,
    exported_weights,
    rewind_to_checkpoint,
    run_stage_here,
    train_env,
)
from tests.train.resume_worker import CASES, block_for

pytestmark = pytest.mark.slow
TIMEOUT_S = 1500


def run_group(out: Path, ranks: int, spec: dict) -> dict:
    port = str(free_port())
    names = [case.name for case in CASES if case.ranks == ranks]
    logs = [out / f"group{ranks}.rank{rank}.log" for rank in range(ranks)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.train.resume_worker", str(out),
                               json.dumps({**spec, "cases": names})],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                              env=train_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank, log in enumerate(logs)]
    codes = [proc.wait(timeout=TIMEOUT_S) for proc in procs]
    assert codes == [0] * ranks, "".join(log.read_text()[-4000:] for log in logs)
    return json.loads((out / f"summaries-{ranks}.json").read_text())


@pytest.fixture(scope="session")
def matrix(shards, captions, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("resume-matrix")
    spec = {"data": {"images": str(shards["train"]), "captions": str(captions)}}
    return out, {**run_group(out, 2, spec), **run_group(out, 1, spec)}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_stopped_run_resumes_to_the_bits_of_an_uninterrupted_one(matrix, case):
    out, summaries = matrix
    summary = summaries[case.name]
    whole, resumed = summary["whole"], summary["resumed"]
    assert whole["steps"] == resumed["steps"] == case.steps and whole["skipped_steps"] == 0
    expected_stop = case.at + 1 if case.stop == "signal" else case.at
    assert summary["stopped_at"] == expected_stop < case.steps, "the run stopped, saved there, and resumed"
    run_dir = out / case.name / "interrupted"
    assert_same_tensors(exported_weights(out / case.name / "whole"), exported_weights(run_dir))
    assert_same_tensors(torch.load(out / case.name / "whole_checkpoint.pt"), checkpoint_weights(run_dir))
    events = EventAccumulator(str(run_dir / STAGE / "tensorboard"))
    events.Reload()
    logged = sorted({*range(case.log_every, case.steps + 1, case.log_every), case.steps})  # and the last step
    for tag in ("train/loss", "opt/lr"):
        assert [event.step for event in events.Scalars(tag)] == logged, f"{tag}: every step once"


def test_zero_stages_train_the_same_model(matrix):
    """Partitioning changes where optimizer states live, not the arithmetic: fp32 runs agree closely."""
    out, _ = matrix
    reference = checkpoint_weights(out / "supervised-z0-signal" / "whole")
    for name in ("supervised-z1-rewind", "supervised-z3-rewind"):
        weights = checkpoint_weights(out / name / "whole")
        assert all(torch.allclose(reference[k], weights[k], atol=1e-5) for k in reference), name


def test_a_dino_run_with_frozen_head_weights_exports_under_zero_1(matrix, tmp_path):
    """DeepSpeed saves frozen parameters only from ZeRO-2 up; the teacher holds them itself."""
    out, _ = matrix
    run_dir = out / "dino-centring-z1-rewind" / "interrupted"
    ctx = StageContext(name="export", run_dir=run_dir, out_dir=tmp_path / "export", seed=0, log=get_logger("t"))
    exported = export_training_stage(run_dir / STAGE, tmp_path / "export", ctx)
    assert exported["weights"] == "teacher" and exported["max_abs_diff"] <= 1e-5
    from safetensors.torch import load_file

    assert_same_tensors(exported_weights(run_dir), load_file(tmp_path / "export" / "model.safetensors"))


def test_another_rank_count_resumes_stage_0_and_is_refused_for_partitioned_states(matrix, shards, one_rank,
                                                                                  tmp_path):
    out, _ = matrix
    data = {"images": str(shards["train"])}
    by_name = {case.name: case for case in CASES}
    for name, refused in (("supervised-z1-rewind", True), ("supervised-z0-signal", False)):
        run_dir = tmp_path / name
        shutil.copytree(out / name / "whole", run_dir)
        rewind_to_checkpoint(run_dir, 2)
        block = {**block_for(by_name[name], data, 0), "global_batch_size": 8}
        if refused:
            with pytest.raises(CheckpointError, match="written by 2 ranks with ZeRO stage 1, .* resume it on 2 "
                                                      "ranks") as error:
                run_stage_here(block, run_dir)
            assert "\n" not in str(error.value)
        else:
            outputs = run_stage_here(block, run_dir)
            assert outputs["steps"] == 6
            assert torch.isfinite(torch.stack([t.float().sum() for t in exported_weights(run_dir).values()])).all()
