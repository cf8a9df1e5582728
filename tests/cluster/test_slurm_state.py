"""What query_jobs makes of real Slurm jobs while they run and after they end: an array job is all of its
tasks at every moment (the accounting database alone lags and may hold one record for the whole array),
and exit codes read as ``code:signal``."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from cluster.slurm_state import query_jobs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_slurm")]
TASKS = 3


def sbatch(tmp_path: Path, body: str, *options: str) -> str:
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{body}\n")
    done = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *options, str(script)],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().split(";")[0]


def test_an_array_job_is_all_its_tasks_from_submission_to_end(tmp_path):
    array = sbatch(tmp_path, "sleep 2", f"--array=0-{TASKS - 1}")
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        info = query_jobs([array])[array]
        seen.append(info.describe())
        if info.finished:
            break
        time.sleep(0.2)
    assert seen[-1] == f"COMPLETED ({TASKS}/{TASKS} tasks done)", seen
    assert all(f"/{TASKS} tasks done" in shown for shown in seen), sorted(set(seen))
    running = [shown for shown in seen if shown.startswith("RUNNING")]
    assert running, "the poll never saw the tasks run"


def test_a_failed_job_shows_its_exit_code_and_signal(tmp_path):
    failed = sbatch(tmp_path, "exit 3")
    killed = sbatch(tmp_path, "kill -9 $$")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(info.finished for info in query_jobs([failed, killed]).values()):
        time.sleep(0.2)
    infos = query_jobs([failed, killed])
    assert infos[failed].describe() == "FAILED (exit 3:0)"
    assert infos[killed].describe() == "FAILED (exit 0:9)"
