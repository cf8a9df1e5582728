"""A matrix on a real Slurm: each variant is its own job, the variants run at the same time, and each downstream
variant waits only for its own upstream variant."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import read_state, wait_until
from tests.cluster.test_slurm_pipeline import JOB_TIMEOUT_S, PROFILE, job_of, kope, submission_script
from tests.runner.conftest import toy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_slurm")]


def test_matrix_variants_are_independent_jobs_that_run_in_parallel(write_pipeline, kope_env, tmp_path):
    path = write_pipeline({"b": toy(1, sleep_s=45, matrix={"value": [1, 2]}), "c": toy(3, source="@b")})
    run_dir = tmp_path / "run"
    submitted = kope(kope_env, "run", str(path), "--cluster", PROFILE)
    assert submitted.returncode == 0, submitted.stderr
    jobs = {name: job_of(run_dir, name) for name in ("b-value_1", "b-value_2", "c-value_1", "c-value_2")}
    assert len(set(jobs.values())) == 4
    assert "--dependency" not in submission_script(run_dir, jobs["b-value_2"])
    assert f"--dependency=afterok:{jobs['b-value_1']}\n" in submission_script(run_dir, jobs["c-value_1"])
    assert jobs["b-value_2"] not in submission_script(run_dir, jobs["c-value_1"])

    both_started = [run_dir / name / "started.rank0" for name in ("b-value_1", "b-value_2")]
    wait_until(lambda: all(path.exists() for path in both_started), JOB_TIMEOUT_S, "both variants to start")
    assert [read_state(run_dir, name).status for name in ("b-value_1", "b-value_2")] == ["running", "running"], \
        "the second variant started while the first still ran"
    wait_until(lambda: all(read_state(run_dir, name).status == "done" for name in jobs), JOB_TIMEOUT_S,
               "every variant to finish")
    assert read_state(run_dir, "c-value_2").outputs == {"value": 3, "upstream": 2}
    first, second = (read_state(run_dir, name) for name in ("b-value_1", "b-value_2"))
    assert max(first.started_at, second.started_at) < min(first.ended_at, second.ended_at)
    table = kope(kope_env, "status", str(run_dir)).stdout
    assert "matrix of 2" in table and "2 done" in table
