"""README's first command: the demo pipeline runs end to end, and a second run does nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.run_state import RunState

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_runs_once(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "configs/pipelines/demo.yaml", "--run-dir", str(run_dir)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    states = RunState(run_dir)
    names = states.stage_names()
    assert names and all(states.read(name).status == "done" for name in names)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(f"stage {name}: done, skipped" in second.stderr for name in names)
    assert ": running" not in second.stderr
