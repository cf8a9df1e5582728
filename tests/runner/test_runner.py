"""Ordering, skipping, staleness and --force, selection, failure propagation, the lock, killed stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.cli import main
from pipeline.core.run_dir import RunDir
from pipeline.core.run_lock import RunLock
from tests.runner.conftest import toy


def order(tmp_path: Path) -> list[str]:
    path = tmp_path / "run" / "order.txt"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def status(tmp_path: Path, stage: str) -> str:
    return RunDir(tmp_path / "run").read(stage).status


@pytest.fixture
def diamond(write_pipeline):
    """d needs b and c, which need a; e is independent. Declared out of order on purpose."""
    return write_pipeline({
        "d": toy(4, needs=["b", "c"]), "b": toy(2, source="@a"), "c": toy(3, source="@a"),
        "a": toy(1), "e": toy(5),
    })


def test_runs_in_dependency_order_then_skips(diamond, tmp_path, capsys):
    assert main(["run", str(diamond)]) == 0
    ran = order(tmp_path)
    assert sorted(ran) == ["a", "b", "c", "d", "e"]
    assert ran.index("a") < ran.index("b") < ran.index("d") and ran.index("c") < ran.index("d")
    state = RunDir(tmp_path / "run").read("b")
    assert state.status == "done" and state.outputs == {"value": 2, "upstream": 1}
    assert state.inputs["@a"] == RunDir(tmp_path / "run").read("a").fingerprint
    assert state.started_at and state.ended_at and state.duration_s is not None
    assert main(["run", str(diamond)]) == 0
    assert len(order(tmp_path)) == 5, "a second run must not run anything again"


def test_changed_config_stops_and_names_key_until_forced(diamond, tmp_path, capsys):
    assert main(["run", str(diamond)]) == 0
    capsys.readouterr()
    assert main(["run", str(diamond), "b.value=20"]) == 3
    err = capsys.readouterr().err
    assert "stage 'b'" in err and "value: 2 -> 20" in err and "--force b" in err
    assert len(order(tmp_path)) == 5
    assert main(["run", str(diamond), "b.value=20", "--force", "b"]) == 0
    assert order(tmp_path)[5:] == ["b", "d"], "forcing b re-runs b and its dependents only"
    assert RunDir(tmp_path / "run").read("d").inputs["@b"] == RunDir(tmp_path / "run").read("b").fingerprint


def test_changed_external_input_is_detected(write_pipeline, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "result.json").write_text(json.dumps({"value": 1}))
    path = write_pipeline({"a": toy(1, source=str(data))})
    assert main(["run", str(path)]) == 0
    time.sleep(0.01)
    (data / "extra.bin").write_bytes(b"x")
    assert main(["run", str(path)]) == 3
    assert f"input {data} changed" in capsys.readouterr().err


def test_only_from_until(diamond, tmp_path, capsys):
    assert main(["run", str(diamond), "--until", "b"]) == 0
    assert order(tmp_path) == ["a", "b"]
    assert status(tmp_path, "d") == "pending"
    assert main(["run", str(diamond), "--only", "e"]) == 0
    assert order(tmp_path)[2:] == ["e"]
    assert main(["run", str(diamond), "--only", "d"]) == 3
    assert "needs 'c', which is not done" in capsys.readouterr().err
    assert main(["run", str(diamond), "--from", "c"]) == 0
    assert order(tmp_path)[3:] == ["c", "d"]
    assert main(["run", str(diamond), "--only", "nope"]) == 2


def test_failure_leaves_dependents_pending_and_exits_nonzero(write_pipeline, tmp_path, capsys):
    path = write_pipeline({"a": toy(1), "b": toy(2, source="@a", fail=True), "c": toy(3, needs="b"), "e": toy(5)})
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "failed stages: b: RuntimeError: planted failure in b" in err
    assert status(tmp_path, "b") == "failed" and status(tmp_path, "c") == "pending"
    assert status(tmp_path, "e") == "done", "independent stages still run"
    state = RunDir(tmp_path / "run").read("b")
    assert "planted failure" in (tmp_path / "run" / state.traceback).read_text()
    assert main(["status", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert "error: b: RuntimeError: planted failure in b" in table
    assert main(["run", str(path), "b.fail=false"]) == 0, "fixing the failure resumes"
    assert order(tmp_path) == ["a", "b", "e", "b", "c"]


def test_second_run_is_refused_while_locked(write_pipeline, tmp_path, capsys):
    path = write_pipeline({"a": toy(1)})
    with RunLock(tmp_path / "run"):
        assert main(["run", str(path)]) == 4
        err = capsys.readouterr().err
        assert "another kope run holds this run directory" in err and f"pid {os.getpid()}" in err
    assert order(tmp_path) == []
    assert main(["run", str(path)]) == 0


def test_stale_lock_of_killed_run_is_taken_over(write_pipeline, tmp_path, subprocess_env, kope_cmd):
    path = write_pipeline({"slow": toy(1, sleep_s=60), "after": toy(2, needs="slow")})
    proc = subprocess.Popen([*kope_cmd, "run", str(path)], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = tmp_path / "run" / "slow" / "started.rank0"
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert status(tmp_path, "slow") == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert status(tmp_path, "slow") == "running", "a SIGKILL leaves the stage marked running, not done"
    rerun = subprocess.run([*kope_cmd, "run", str(path), "slow.sleep_s=0"], env=subprocess_env,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "ended without releasing the lock" in rerun.stderr
    state = RunDir(tmp_path / "run").read("slow")
    assert state.status == "done" and state.attempt == 2
    assert order(tmp_path) == ["slow", "slow", "after"]


@pytest.mark.slow
def test_local_executor_runs_every_rank(write_pipeline, tmp_path, subprocess_env, kope_cmd):
    path = write_pipeline({"a": toy(1, launch={"executor": "local", "nproc": 2}), "b": toy(2, source="@a")})
    proc = subprocess.run([*kope_cmd, "run", str(path)], env=subprocess_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = sorted((tmp_path / "run" / "order.txt").read_text().splitlines())
    assert lines == ["a rank0/2", "a rank1/2", "b rank0/1"]
    assert status(tmp_path, "a") == "done"
    assert (tmp_path / "run" / "logs" / "a.rank1.log").exists()


@pytest.mark.slow
def test_a_failure_on_another_rank_fails_the_stage_with_its_traceback(write_pipeline, tmp_path, subprocess_env,
                                                                     kope_cmd):
    two_ranks = {"executor": "local", "nproc": 2}
    path = write_pipeline({"a": toy(1, fail_rank=1, launch=two_ranks), "b": toy(2, source="@a")})
    proc = subprocess.run([*kope_cmd, "run", str(path)], env=subprocess_env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "kope: stage a failed: RuntimeError: planted failure in a" in proc.stderr
    state = RunDir(tmp_path / "run").read("a")
    assert state.status == "failed" and "rank*.traceback.txt" in state.error
    assert "planted failure" in (tmp_path / "run" / "logs" / "a.rank1.traceback.txt").read_text()
    assert status(tmp_path, "b") != "done"


def test_status_puts_headline_metrics_first(tmp_path):
    from pipeline.core.run_state import StageState
    from pipeline.core.status import format_status

    run_state = RunDir(tmp_path)
    state = StageState("finetune", "finetune")
    state.outputs = {"steps": 280, "samples_seen": 8960, "export": "finetune/export", "loss": 2.377812345,
                     "val_top5": 0.5333333, "val_top1": 0.1366667, "histogram": [1, 2]}
    state.mark_finished("done")
    run_state.write(state)
    line = format_status(tmp_path).splitlines()[1]
    assert line.split()[:2] == ["finetune", "done"]
    assert line.split("  ")[-1].strip().startswith("val_top1=0.1367 export=finetune/export loss=2.378 ")
    assert "histogram" not in line


def test_a_launch_reads_its_snapshot_not_the_latest_config(write_pipeline, tmp_path, subprocess_env):
    """What a queued job runs is fixed when it is launched: a later `kope run` writes a new snapshot and a new
    config.yaml, and the old snapshot (which the job names) stays as it was."""
    path = write_pipeline({"a": toy(1)})
    assert main(["run", str(path)]) == 0
    run = RunDir(tmp_path / "run")
    first = run.read("a").config
    assert first.startswith("snapshots/config-") and (run.root / first).is_file()
    assert main(["run", str(path), "a.value=2", "--force", "a"]) == 0
    second = run.read("a").config
    assert second != first and yaml.safe_load((run.root / first).read_text())["stages"]["a"]["value"] == 1
    assert yaml.safe_load(run.config_file.read_text())["stages"]["a"]["value"] == 2
    done = subprocess.run([sys.executable, "-m", "pipeline.core.stage_main", str(run.root), "a", "--config", first],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert run.read("a").outputs["value"] == 1 and run.read("a").config == first
    assert main(["run", str(path)]) == 0
    assert sorted(p.name for p in run.snapshot_dir.iterdir()) == sorted({Path(first).name, Path(second).name}), \
        "the same config names the same snapshot"


def test_force_starts_the_stage_over_in_an_empty_folder(write_pipeline, tmp_path):
    path = write_pipeline({"a": toy(1)})
    assert main(["run", str(path)]) == 0
    leftover = tmp_path / "run" / "a" / "leftover.txt"
    leftover.write_text("from the earlier run")
    assert main(["run", str(path), "--force", "a"]) == 0
    assert not leftover.exists() and (tmp_path / "run" / "a" / "result.json").exists()
