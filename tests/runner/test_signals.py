"""The stop contract of `kope run` with real processes and signals (toy stages; training stages in
tests/train/test_stop_signals.py): a stop signal ends the running stage resumably, starts no further stage and exits
75; a second one soon after stops hard; no stage process outlives `kope run`; the lock is not taken over while one
lives; every failure before a stage's own code is recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.cli import main
from pipeline.core.errors import INTERRUPTED_EXIT_CODE
from pipeline.core.kinds import BUILTIN_KINDS, StageKind
from pipeline.core.run_dir import RunDir
from tests.runner.conftest import stage_processes, toy

TWO_RANKS = {"executor": "local", "nproc": 2}


def wait_for(condition, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start(kope_cmd, path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([*kope_cmd, "run", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def started_ranks(run_dir: Path, stage: str, ranks: int) -> bool:
    return all((run_dir / stage / f"started.rank{rank}").exists() for rank in range(ranks))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1],
                         ids=lambda s: s.name)
def test_a_stop_signal_ends_the_stage_resumably_and_starts_no_other(write_pipeline, tmp_path, subprocess_env,
                                                                    kope_cmd, signum):
    run_dir = tmp_path / "run"
    path = write_pipeline({"slow": toy(1, sleep_s=60, launch=TWO_RANKS), "after": toy(2, source="@slow")})
    proc = start(kope_cmd, path, subprocess_env)
    wait_for(lambda: started_ranks(run_dir, "slow", 2), what="both ranks")
    proc.send_signal(signum)  # to kope run alone, as `timeout` or systemd would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err
    assert "interrupted" in err.splitlines()[-1] and "run the same command again" in err.splitlines()[-1]
    run = RunDir(run_dir)
    assert run.read("slow").status == "interrupted" and signum.name in run.read("slow").error
    assert run.read("after").status == "pending", "no further stage starts"
    assert stage_processes(run_dir) == []
    assert main(["run", str(path), "slow.sleep_s=0"]) == 0
    assert run.read("after").status == "done"


def test_a_second_signal_soon_after_stops_hard(write_pipeline, tmp_path, subprocess_env, kope_cmd):
    """Ranks that ignore the first signal (as if saving a checkpoint) are killed by the second."""
    run_dir = tmp_path / "run"
    path = write_pipeline({"save": toy(1, sleep_s=60, ignore_stop=True, launch=TWO_RANKS)})
    proc = start(kope_cmd, path, subprocess_env)
    wait_for(lambda: started_ranks(run_dir, "save", 2), what="both ranks")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None and len(stage_processes(run_dir)) == 2, "the first signal lets the ranks finish"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err
    assert "stopping hard" in err
    state = RunDir(run_dir).read("save")
    assert state.status == "interrupted" and "stopped hard after SIGTERM" in state.error
    assert stage_processes(run_dir) == []


def test_no_rank_outlives_a_killed_kope_run_and_the_next_run_takes_over(write_pipeline, tmp_path, subprocess_env,
                                                                        kope_cmd):
    run_dir = tmp_path / "run"
    path = write_pipeline({"slow": toy(1, sleep_s=60, ignore_stop=True, launch=TWO_RANKS)})
    proc = start(kope_cmd, path, subprocess_env)
    wait_for(lambda: started_ranks(run_dir, "slow", 2), what="both ranks")
    ranks = stage_processes(run_dir)
    assert len(ranks) == 2
    recorded = json.loads((run_dir / ".lock").read_text())["stage_processes"]
    assert sorted(entry["pid"] for entry in recorded) == sorted(ranks), "the lock names the running ranks"
    proc.kill()
    proc.communicate()
    wait_for(lambda: stage_processes(run_dir) == [], timeout_s=10, what="the ranks to die with kope run")
    assert main(["run", str(path), "slow.sleep_s=0"]) == 0


def test_a_stale_lock_is_not_taken_over_while_its_stage_processes_live(write_pipeline, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = write_pipeline({"a": toy(1)})
    (tmp_path / "run").mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start_time = Path(f"/proc/{live.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        record = {"pid": 999999, "host": os.uname().nodename, "since": "earlier",
                  "stage_processes": [{"pid": live.pid, "start": start_time}]}
        (run_dir / ".lock").write_text(json.dumps(record))
        assert main(["run", str(path)]) == 4
        err = capsys.readouterr().err
        assert f"its stage processes {live.pid} still run" in err
    finally:
        live.kill()
        live.wait()
    assert main(["run", str(path)]) == 0, "once they are gone the lock is taken over"


def test_a_failure_before_the_stage_code_runs_is_recorded(write_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(BUILTIN_KINDS, "broken", StageKind("broken", "tests.runner.toy_stage:Settings",
                                                           "tests.runner.no_such_stage_module"))
    path = write_pipeline({"a": {"kind": "broken", "value": 1}, "b": toy(2, needs=["a"])})
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("kope: failed stages: a: ModuleNotFoundError: No module named 'tests.runner.no_such_stage_module' "
                   "(b not started)")
    state = RunDir(tmp_path / "run").read("a")
    assert state.status == "failed" and state.traceback == "logs/a.traceback.txt"
    assert "no_such_stage_module" in (tmp_path / "run" / state.traceback).read_text()


@pytest.mark.slow
def test_the_same_contract_under_torchrun(write_pipeline, tmp_path, subprocess_env, kope_cmd):
    """torchrun's agent passes the signal on to its workers (SIGUSR1 too) and they die with it."""
    run_dir = tmp_path / "run"
    path = write_pipeline({"slow": toy(1, sleep_s=120, launch={"nproc": 2}), "after": toy(2, source="@slow")})
    proc = subprocess.Popen([*kope_cmd, "run", str(path), "--cluster", "torchrun"], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: started_ranks(run_dir, "slow", 2), timeout_s=120, what="both ranks under torchrun")
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err
    assert RunDir(run_dir).read("slow").status == "interrupted"
    assert RunDir(run_dir).read("after").status == "pending"
    assert stage_processes(run_dir) == []
