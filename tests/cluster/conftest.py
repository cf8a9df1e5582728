"""A real Slurm for the cluster tests: cluster/slurm/local-slurm.sh starts it once per session (or finds it
running, as in CI). When it cannot start, the Slurm tests are skipped with the reason, except under CI=true,
where that is a failure."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline.core.run_dir import RunDir

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "slurm" / "local-slurm.sh"
STAGES = "tests.cluster.stages"


@pytest.fixture(scope="session")
def local_slurm() -> str:
    """SLURM_CONF of the running local Slurm (also set in os.environ for the whole session)."""
    running_before = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True).stdout
    started = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no output"])[-1]
        message = f"local Slurm could not start: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    conf = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    slurm_conf = conf.strip().split("=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_conf
    yield slurm_conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if "slurmctld stopped" in running_before and not os.environ.get("KOPE_SLURM_KEEP"):
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def pretrain_stage(tmp_path_factory) -> dict:
    """A tiny supervised pretrain stage (ZeRO-2, 16 steps, a checkpoint every 2) on the demo shards."""
    from tests.train.helpers import demo_shards, pretrain_block

    shards = demo_shards(tmp_path_factory.mktemp("shards"))
    return pretrain_block(data=str(shards["train"]), steps=16, zero_stage=2)


@pytest.fixture(scope="session")
def pretrain_reference(pretrain_stage, tmp_path_factory) -> Path:
    """The run directory of that stage trained uninterrupted by two local processes."""
    from tests.train.helpers import run_pipeline_file

    return run_pipeline_file(tmp_path_factory.mktemp("reference"), {"pretrain": pretrain_stage})


@pytest.fixture
def kope_env() -> dict[str, str]:
    """Environment of ``kope`` subprocesses (and of their Slurm jobs): the test stages must import."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


@pytest.fixture
def write_pipeline(tmp_path: Path) -> Callable[..., Path]:
    def write(stages: dict, name: str = "t", **top) -> Path:
        doc = {"name": name, "run_dir": str(tmp_path / "run"), **top, "stages": stages}
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


def stage(kind: str, **settings) -> dict:
    return {"kind": f"{STAGES}.{kind}", **settings}


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def read_state(run_dir: Path, name: str):
    return RunDir(run_dir).read(name)


def requeue_count(job_id: str) -> int:
    """How often Slurm requeued the job (the controller's ``Restarts``). The log line of submitit's own requeue is
    no proof: the requeue may kill submitit's ``scontrol requeue`` before it returns and logs."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60,
                           check=True).stdout
    return int(shown.split("Restarts=", 1)[1].split()[0])
