"""A stop signal to `kope run` while it trains, under the inline executor (through `timeout`, as a user would) and
the local executor (2 ranks, loader workers): every rank saves a checkpoint at the same step boundary, `kope run`
exits 75 without starting the next stage and leaves no process behind, and running it again ends with the weights
of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.errors import INTERRUPTED_EXIT_CODE
from pipeline.core.run_dir import RunDir
from tests.runner.conftest import stage_processes
from tests.train.helpers import (
    REPO,
    assert_same_tensors,
    exported_weights,
    kope_run,
    latest_step,
    pretrain_block,
    run_pipeline_file,
    train_env,
    write_pipeline,
)

pytestmark = pytest.mark.slow
STEPS = 12


def stages(data: str) -> dict:
    block = pretrain_block(data, steps=STEPS, log_every_steps=1, checkpoint={"every_steps": 100, "keep": 2},
                           loader={"batch_size": 4, "num_workers": 1, "window_shards": 2})
    return {"pretrain": block, "export": {"kind": "export", "source": "@pretrain"}}


def stop_while_training(cmd: list[str], run_dir: Path, signum: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start ``cmd``; once step 4 is logged, send it ``signum``; wait for it to end."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = run_dir / "logs" / "pretrain.log"
    deadline = time.monotonic() + 1200
    while not (log.exists() and f"step 4/{STEPS}" in log.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_stopped_resumably(result: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert result.returncode == INTERRUPTED_EXIT_CODE, result.stderr[-3000:]
    assert "run the same command again" in result.stderr.strip().splitlines()[-1]
    run = RunDir(run_dir)
    state = run.read("pretrain")
    assert state.status == "interrupted" and state.error.startswith("Preempted: SIGTERM received"), state.error
    assert 4 <= latest_step(run_dir) < STEPS, "a checkpoint at the step boundary after the signal"
    assert run.read("export").status == "pending", "the next stage did not start"
    assert "DataLoader worker" not in result.stderr, "loader workers leave the stop to the training process"
    assert stage_processes(run_dir) == []


def test_sigterm_through_timeout_to_an_inline_run(shards, tmp_path):
    reference = run_pipeline_file(tmp_path / "reference", stages(str(shards["train"])), executor="inline")
    pipeline = write_pipeline(tmp_path / "stopped", stages(str(shards["train"])), executor="inline")
    run_dir = tmp_path / "stopped" / "run"
    cmd = ["timeout", "--preserve-status", "600", sys.executable, "-m", "pipeline.core.cli", "run", str(pipeline)]
    assert_stopped_resumably(stop_while_training(cmd, run_dir), run_dir)
    resumed = kope_run(pipeline)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_tensors(exported_weights(reference), exported_weights(run_dir))
    assert RunDir(run_dir).read("export").status == "done"


def test_sigterm_to_kope_run_with_two_local_ranks_and_loader_workers(shards, tmp_path):
    reference = run_pipeline_file(tmp_path / "reference", stages(str(shards["train"])))
    pipeline = write_pipeline(tmp_path / "stopped", stages(str(shards["train"])))
    run_dir = tmp_path / "stopped" / "run"
    cmd = [sys.executable, "-m", "pipeline.core.cli", "run", str(pipeline)]
    result = stop_while_training(cmd, run_dir)
    assert_stopped_resumably(result, run_dir)
    assert f"process exit codes [{INTERRUPTED_EXIT_CODE}, {INTERRUPTED_EXIT_CODE}]" in result.stderr
    resumed = kope_run(pipeline)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_tensors(exported_weights(reference), exported_weights(run_dir))
