"""A pipeline on a real Slurm (two nodes on this machine, accounting in slurmdbd): dependencies, failures,
status, cancel, job arrays, a two-node process group, requeue and time limits."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.slurm_state import query_jobs
from tests.cluster.conftest import REPO, read_state, requeue_count, stage, wait_until
from tests.runner.conftest import toy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_slurm")]
PROFILE = str(REPO / "configs" / "cluster" / "local-slurm.yaml")
JOB_TIMEOUT_S = 600


def kope(env: dict, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.core.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def job_of(run_dir: Path, name: str) -> str:
    return read_state(run_dir, name).job.job_id


def profile(tmp_path: Path, **slurm) -> str:
    """The local Slurm profile with some keys changed."""
    path = tmp_path / "profile.yaml"
    path.write_text(json.dumps({"include": PROFILE, "slurm": slurm}))
    return str(path)


def squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%T|%r"], capture_output=True,
                          text=True).stdout.strip()


def run_to_completion(job: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Wait for ``job`` to end; a requeued job waits about two minutes before Slurm starts it again
    (its begin time), which this shortens so the test does not sleep through it. Not to zero: a node that saw
    the job killed in the same second rejects the relaunch ("Job credential revoked") and the job fails."""

    lifted_at = -math.inf

    def ended() -> bool:
        nonlocal lifted_at
        state = squeue_state(job)
        if state == "PENDING|BeginTime" and time.monotonic() > lifted_at + 10:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], check=True)
            lifted_at = time.monotonic()
        return state.split("|")[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

    wait_until(ended, timeout_s, f"job {job} to end", interval_s=1.0)
    return squeue_state(job).split("|")[0]


def submission_script(run_dir: Path, job: str) -> str:
    return (run_dir / "slurm" / f"{job}_submission.sh").read_text()


def steps_log(run_dir: Path) -> list[str]:
    return (run_dir / "count" / "steps.log").read_text().splitlines()


def assert_states_without_accounting(tmp_path: Path, monkeypatch, expected: dict[str, str]) -> None:
    """With no sacct on PATH (no accounting), the controller still answers for live jobs."""
    only_squeue = tmp_path / "bin"
    only_squeue.mkdir()
    (only_squeue / "squeue").symlink_to(shutil.which("squeue"))
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(only_squeue))
        assert {job: info.state for job, info in query_jobs(expected).items()} == expected


def test_a_refused_submission_is_one_line_naming_the_stage(write_pipeline, kope_env, tmp_path):
    path = write_pipeline({"a": toy(1)})
    refused = kope(kope_env, "run", str(path), "--cluster", profile(tmp_path, partition="no-such-partition"))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "kope: sbatch refused stage a: sbatch: error: Batch job submission failed: Invalid partition name specified")


def test_dependency_order_failure_stops_dependents_then_resume(write_pipeline, kope_env, tmp_path):
    path = write_pipeline({"a": toy(1), "b": toy(2, source="@a"), "c": toy(3, source="@a", fail=True),
                           "d": toy(4, needs=["b", "c"])})
    run_dir = tmp_path / "run"
    done = kope(kope_env, "run", str(path), "--cluster", PROFILE, "--wait", "--poll-s", "1")
    assert done.returncode == 1, done.stderr
    assert "stages not done: c, d" in done.stderr
    jobs = {name: job_of(run_dir, name) for name in "abcd"}
    assert len(set(jobs.values())) == 4
    assert f"--dependency=afterok:{jobs['a']}" in submission_script(run_dir, jobs["b"])
    assert "--kill-on-invalid-dep=yes" in submission_script(run_dir, jobs["d"])
    assert f"--dependency=afterok:{jobs['b']}:{jobs['c']}" in submission_script(run_dir, jobs["d"])
    order = [line.split()[0] for line in (run_dir / "order.txt").read_text().splitlines()]
    assert order[0] == "a" and sorted(order[1:]) == ["b", "c"], "d never started"
    assert read_state(run_dir, "b").inputs["@a"] == read_state(run_dir, "a").fingerprint, "b started after a was done"
    assert [read_state(run_dir, name).status for name in "abcd"] == ["done", "done", "failed", "pending"]
    slurm = query_jobs(jobs.values())
    assert [slurm[jobs[name]].state for name in "abcd"] == ["COMPLETED", "COMPLETED", "FAILED", "CANCELLED"]
    table = kope(kope_env, "status", str(run_dir)).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines()}
    assert rows["a"][1] == "done" and "COMPLETED" in rows["a"]
    assert rows["c"][1] == "failed" and "FAILED" in rows["c"] and f"slurm/{jobs['c']}_0_log.err" in rows["c"]
    assert rows["d"][1] == "blocked" and "CANCELLED" in rows["d"]
    assert "error: c: RuntimeError: planted failure in c" in table
    assert "error: d: not started: needs c" in table

    again = kope(kope_env, "run", str(path), "--cluster", PROFILE, "c.fail=false", "--wait", "--poll-s", "1")
    assert again.returncode == 0, again.stderr
    assert "skipped (done): a, b" in again.stdout
    assert job_of(run_dir, "a") == jobs["a"] and job_of(run_dir, "c") != jobs["c"]
    assert all(read_state(run_dir, name).status == "done" for name in "abcd")
    assert [line.split()[0] for line in (run_dir / "order.txt").read_text().splitlines()][3:] == ["c", "d"]


def test_status_shows_live_jobs_and_cancel_ends_them(write_pipeline, kope_env, tmp_path, monkeypatch):
    path = write_pipeline({"slow": toy(1, sleep_s=600), "after": toy(2, source="@slow")})
    run_dir = tmp_path / "run"
    submitted = kope(kope_env, "run", str(path), "--cluster", PROFILE)
    assert submitted.returncode == 0, submitted.stderr
    slow, after = job_of(run_dir, "slow"), job_of(run_dir, "after")
    assert f"submitted: slow={slow}, after={after}" in submitted.stdout
    started = run_dir / "slow" / "started.rank0"
    wait_until(started.exists, JOB_TIMEOUT_S, "the slow stage to start")
    table = kope(kope_env, "status", str(run_dir)).stdout
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert "running" in rows["slow"] and "RUNNING" in rows["slow"]
    assert "PENDING (Dependency)" in rows["after"]
    assert_states_without_accounting(tmp_path, monkeypatch, {slow: "RUNNING", after: "PENDING"})

    local = kope(kope_env, "run", str(path))
    assert local.returncode == 1 and f"still queued or running on Slurm: slow (job {slow})" in local.stderr
    resubmit = kope(kope_env, "run", str(path), "--cluster", PROFILE)
    assert resubmit.returncode == 0 and "still RUNNING; keeping it" in resubmit.stderr
    assert job_of(run_dir, "slow") == slow, "a second submission keeps the running job"

    cancelled = kope(kope_env, "cancel", str(run_dir))
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"slow (job {slow})" in cancelled.stdout and f"after (job {after})" in cancelled.stdout
    slurm = query_jobs([slow, after])
    assert slurm[slow].state == "CANCELLED" and slurm[after].state == "CANCELLED"
    pid = int(started.read_text())
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 60, "the stage process to end")
    assert "CANCELLED" in kope(kope_env, "status", str(run_dir)).stdout
    assert "nothing queued or running" in kope(kope_env, "cancel", str(run_dir)).stdout


def test_stage_with_parts_runs_as_an_array_job(write_pipeline, kope_env, tmp_path):
    path = write_pipeline({"parts": stage("parts", items=7)})
    run_dir = tmp_path / "run"
    done = kope(kope_env, "run", str(path), "--cluster", profile(tmp_path, stages={"parts": {"array": 3}}),
                "--wait", "--poll-s", "1")
    assert done.returncode == 0, done.stderr
    state = read_state(run_dir, "parts")
    array = state.job.array_job_id
    assert state.status == "done" and state.outputs == {"items": 7, "written_by_run": 0}
    writers = {json.loads((run_dir / "parts" / f"item{i}.json").read_text())["writer"] for i in range(7)}
    assert writers == {f"part {part}/3 task {array}_{part}" for part in range(3)}
    assert f"--dependency=afterok:{array}" in submission_script(run_dir, state.job.job_id)
    assert all((run_dir / "logs" / f"parts.part{part}.log").exists() for part in range(3))
    assert query_jobs([array])[array].describe() == "COMPLETED (3/3 tasks done)"


def test_two_nodes_all_reduce_under_srun_with_ranks_from_slurm(write_pipeline, kope_env, tmp_path):
    reports = tmp_path / "reports"
    path = write_pipeline({"probe": stage("probe", report_dir=str(reports))})
    run_dir = tmp_path / "run"
    done = kope(kope_env, "run", str(path), "--cluster", profile(tmp_path, nodes=2), "--wait", "--poll-s", "1")
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((reports / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["world_size"], r["local_rank"]) for r in ranks] == [(0, 2, 0), (1, 2, 0)]
    assert {r["slurm_node"] for r in ranks} == {"kope-node1", "kope-node2"}
    assert {r["master_addr"] for r in ranks} == {"kope-node1"}
    assert [r["all_reduce"] for r in ranks] == [3.0, 3.0]
    assert read_state(run_dir, "probe").pid == ranks[0]["pid"], "rank 0 wrote the state file"
    written = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "slurm" not in p.parts}
    snapshot = read_state(run_dir, "probe").job.config
    assert written == {".lock", "config.yaml", snapshot, "state/probe.json", "logs/kope.log", "logs/probe.log",
                       "logs/probe.rank1.log", "probe/result.json"}, "rank 1 writes nothing but its own log"


def test_time_limit_checkpoints_and_requeues_until_done(write_pipeline, kope_env, tmp_path):
    # 60 s of steps: longer than the 30 s before the warning plus slurmctld's up to 30 s of lateness in sending it
    path = write_pipeline({"count": stage("counter", steps=30, step_s=2.0)})
    run_dir = tmp_path / "run"
    limited = profile(tmp_path, time_min=1, signal_delay_s=30, max_requeues=8)
    assert kope(kope_env, "run", str(path), "--cluster", limited).returncode == 0
    job = job_of(run_dir, "count")
    assert "--signal=USR2@30" in submission_script(run_dir, job) and "--time=1" in submission_script(run_dir, job)
    assert run_to_completion(job, timeout_s=900) == "COMPLETED"
    lines = steps_log(run_dir)
    assert [int(line.split()[1]) for line in lines if line.startswith("step")] == list(range(30))
    assert any(line.startswith("stop") and line.endswith("SIGUSR1") for line in lines), "stopped by the warning"
    assert read_state(run_dir, "count").status == "done"
    assert requeue_count(job) >= 1
