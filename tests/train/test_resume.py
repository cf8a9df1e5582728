"""Exact resume with 2 ranks through ``kope run`` (local executor): a run stopped by SIGTERM on one rank, then
SIGKILLed with all its processes, then run again, ends with the same bits as an uninterrupted run, and
TensorBoard shows every step once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.core.errors import INTERRUPTED_EXIT_CODE
from tests.train.helpers import (
    REPO,
    assert_same_tensors,
    checkpoint_weights,
    exported_weights,
    kill_after_checkpoint,
    kope_run,
    latest_step,
    pretrain_block,
    run_pipeline_file,
    train_env,
    write_pipeline,
)


def rank_process(run_dir: Path, rank: int) -> int:
    """The pid of the stage process of ``rank`` working on ``run_dir``."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        ours = b"pipeline.core.stage_main" in cmdline and str(run_dir).encode() in cmdline
        if ours and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no stage process of rank {rank} for {run_dir}")


def stop_one_rank_after_checkpoint(pipeline: Path, run_dir: Path, step: int) -> subprocess.CompletedProcess:
    """``kope run``; once checkpoint ``step`` is latest, SIGTERM rank 1 alone; wait for the run to end."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.core.cli", "run", str(pipeline)],
                            cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while latest_step(run_dir) < step:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.kill(rank_process(run_dir, 1), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_two_ranks_stopped_killed_and_resumed_end_bitwise_equal(shards, tmp_path):
    stages = {"pretrain": pretrain_block(str(shards["train"]), steps=12, zero_stage=1,
                                         checkpoint={"every_steps": 2, "keep": 2})}
    reference = run_pipeline_file(tmp_path / "whole", stages)

    pipeline = write_pipeline(tmp_path / "interrupted", stages)
    run_dir = tmp_path / "interrupted" / "run"
    stopped = stop_one_rank_after_checkpoint(pipeline, run_dir, 2)
    assert stopped.returncode == INTERRUPTED_EXIT_CODE
    assert f"process exit codes [{INTERRUPTED_EXIT_CODE}, {INTERRUPTED_EXIT_CODE}]" in stopped.stderr
    state = yaml.safe_load((run_dir / "state" / "pretrain.json").read_text())
    assert state["status"] == "interrupted" and state["error"].startswith("Preempted: SIGTERM received")
    stopped_at = latest_step(run_dir)
    assert 2 < stopped_at < 12, "rank 0 stopped with rank 1 at a later step boundary and saved"

    killed_at = kill_after_checkpoint(pipeline, run_dir, stopped_at + 2)
    assert killed_at < 12
    resumed = kope_run(pipeline)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from step_{killed_at:08d}" in resumed.stderr

    assert_same_tensors(exported_weights(reference), exported_weights(run_dir))
    assert_same_tensors(checkpoint_weights(reference), checkpoint_weights(run_dir))

    events = EventAccumulator(str(run_dir / "pretrain" / "tensorboard"))
    events.Reload()
    for tag in ("train/loss", "opt/lr", "perf/img_per_s"):
        assert [event.step for event in events.Scalars(tag)] == list(range(2, 13, 2)), tag
