"""The same stage under two torchrun "nodes" on 127.0.0.1 (each machine runs the same `kope run`) and as local
processes: one process group over gloo, and rank 0 alone writes the run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.ranks import free_port
from tests.cluster.conftest import read_state, stage
from tests.train.helpers import assert_same_tensors, exported_weights, train_env
from tests.train.helpers import write_pipeline as write_training_pipeline

TIMEOUT_S = 300


def reports(folder: Path, world: int) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]


def run_dir_files(run_dir: Path) -> set[str]:
    """The run directory's files, its one config snapshot (written by node 0, read by both) as ``SNAPSHOT``."""
    files = {str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()}
    snapshots = {name for name in files if name.startswith("snapshots/")}
    assert len(snapshots) == 1, snapshots
    return (files - snapshots) | {"SNAPSHOT"}


def run_on_two_nodes(pipeline: Path, env: dict[str, str], expected_code: int = 0) -> list[str]:
    """``kope run PIPELINE --cluster torchrun`` as node 0 and node 1, meeting at a rendezvous on 127.0.0.1."""
    common = {**env, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    cmd = [sys.executable, "-m", "pipeline.core.cli", "run", str(pipeline), "--cluster", "torchrun"]
    nodes = [subprocess.Popen(cmd, env={**common, "PET_NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (1, 0)]
    outputs = [node.communicate(timeout=TIMEOUT_S)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [expected_code] * 2, outputs
    return outputs


@pytest.mark.slow
def test_two_torchrun_nodes_run_a_stage_and_only_rank_0_writes(write_pipeline, kope_env, tmp_path):
    report_dir = tmp_path / "reports"
    run_on_two_nodes(write_pipeline({"probe": stage("probe", report_dir=str(report_dir))}), kope_env)
    run_dir = tmp_path / "run"
    ranks = reports(report_dir, 2)
    assert [(r["rank"], r["world_size"], r["all_reduce"]) for r in ranks] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert read_state(run_dir, "probe").status == "done"
    assert read_state(run_dir, "probe").pid == ranks[0]["pid"]
    assert run_dir_files(run_dir) == {".lock", "config.yaml", "SNAPSHOT", "state/probe.json", "logs/kope.log",
                                      "logs/probe.log",
                                      "logs/probe.rank1.log", "probe/result.json"}


@pytest.mark.slow
def test_a_failing_stage_fails_on_every_node(write_pipeline, kope_env, tmp_path):
    path = write_pipeline({"bad": {"kind": "tests.runner.toy_stage", "value": 1, "fail": True},
                           "after": {"kind": "tests.runner.toy_stage", "value": 2, "source": "@bad"}})
    outputs = run_on_two_nodes(path, kope_env, expected_code=1)
    assert all("failed stages: bad: RuntimeError: planted failure in bad (after not started)" in out
               for out in outputs)
    assert read_state(tmp_path / "run", "bad").status == "failed"


@pytest.mark.slow
def test_pretrain_on_two_torchrun_nodes_trains_like_two_local_processes(pretrain_stage, pretrain_reference, tmp_path):
    """Both nodes read their share of the one global sample order: the weights are those of the local run."""
    run_on_two_nodes(write_training_pipeline(tmp_path, {"pretrain": pretrain_stage}), train_env())
    run_dir = tmp_path / "run"
    assert_same_tensors(exported_weights(pretrain_reference), exported_weights(run_dir))
    outside_checkpoints = {name for name in run_dir_files(run_dir) if not name.startswith("pretrain/checkpoints/")}
    events = {name for name in outside_checkpoints if name.startswith("pretrain/tensorboard/")}
    assert len(events) == 1, "one TensorBoard writer"
    assert outside_checkpoints - events == {
        ".lock", "config.yaml", "SNAPSHOT", "state/pretrain.json", "logs/kope.log", "logs/pretrain.log",
        "logs/pretrain.rank1.log",
        "pretrain/model.json", "pretrain/model.safetensors"}


def test_local_profile_runs_each_stage_as_its_processes(write_pipeline, kope_env, tmp_path):
    report_dir = tmp_path / "reports"
    path = write_pipeline({"probe": {**stage("probe", report_dir=str(report_dir)), "launch": {"nproc": 2}}})
    done = subprocess.run([sys.executable, "-m", "pipeline.core.cli", "run", str(path), "--cluster", "local"],
                          env=kope_env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert [(r["rank"], r["world_size"], r["all_reduce"]) for r in reports(report_dir, 2)] == [(0, 2, 3.0),
                                                                                               (1, 2, 3.0)]
