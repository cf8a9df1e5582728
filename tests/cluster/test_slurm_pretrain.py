"""The pretrain stage on the local Slurm: a 2-node x 1-task DeepSpeed (ZeRO-2, gloo) job under srun, requeued
while it trains (by ``scontrol requeue``, and by the signal Slurm sends before a time limit), ends with exactly
the weights of an uninterrupted run by two local processes: the same code gives the same result anywhere."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cluster.slurm_state import query_jobs
from tests.cluster.conftest import read_state, requeue_count, wait_until
from tests.cluster.test_slurm_pipeline import job_of, kope, profile, run_to_completion
from tests.train.helpers import (
    assert_same_tensors,
    exported_weights,
    latest_step,
    train_env,
    write_pipeline,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_slurm")]


def submit_two_nodes(block: dict, root: Path, *flags: str) -> tuple[Path, str]:
    pipeline = write_pipeline(root, {"pretrain": block})
    submitted = kope(train_env(), "run", str(pipeline), "--cluster", profile(root, nodes=2), *flags)
    assert submitted.returncode == 0, submitted.stderr
    return root / "run", job_of(root / "run", "pretrain")


def interrupt_after_first_checkpoint(run_dir: Path, command: list[str]) -> int:
    wait_until(lambda: latest_step(run_dir) >= 2, 600, "the first checkpoint", interval_s=0.2)
    subprocess.run(command, check=True)
    return latest_step(run_dir)


def assert_resumed_exactly(run_dir: Path, job: str, reference: Path) -> None:
    assert run_to_completion(job) == "COMPLETED"
    state = read_state(run_dir, "pretrain")
    assert state.status == "done" and state.attempt == 2
    assert "resumed from step_" in (run_dir / "logs" / "pretrain.log").read_text()
    assert_same_tensors(exported_weights(reference), exported_weights(run_dir))


def test_two_node_deepspeed_job_trains_like_two_local_processes(pretrain_stage, pretrain_reference, tmp_path):
    run_dir, job = submit_two_nodes(pretrain_stage, tmp_path, "--wait", "--poll-s", "2")
    assert query_jobs([job])[job].state == "COMPLETED"
    log = (run_dir / "logs" / "pretrain.log").read_text()
    assert "4 per rank x 2 ranks" in log and "ZeRO stage 2" in log
    assert_same_tensors(exported_weights(pretrain_reference), exported_weights(run_dir))


def test_two_node_deepspeed_job_requeued_by_scontrol_resumes_exactly(pretrain_stage, pretrain_reference, tmp_path):
    run_dir, job = submit_two_nodes(pretrain_stage, tmp_path)
    at = interrupt_after_first_checkpoint(run_dir, ["scontrol", "requeue", job])
    assert at < pretrain_stage["steps"], "the requeue landed while training"
    assert_resumed_exactly(run_dir, job, pretrain_reference)


def test_time_limit_warning_checkpoints_requeues_and_resumes_exactly(pretrain_stage, pretrain_reference, tmp_path):
    """USR2 is what Slurm sends ``signal_delay_s`` before the time limit (here sent at a chosen moment)."""
    run_dir, job = submit_two_nodes(pretrain_stage, tmp_path)
    interrupt_after_first_checkpoint(run_dir, ["scancel", "--signal=USR2", job])
    assert_resumed_exactly(run_dir, job, pretrain_reference)
    assert requeue_count(job) == 1
