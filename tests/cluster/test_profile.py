"""Cluster profiles: the shipped ones load, per-stage overrides apply, mistakes are named, torchrun settings
come from the profile or torchrun's own variables."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.cli import main
from pipeline.core.cluster_profile import PROFILE_DIR, load_profile, resolve_torchrun
from pipeline.core.errors import ConfigError


def write(tmp_path: Path, doc: dict, name: str = "mine.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_shipped_profiles_load_by_name():
    names = sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))
    assert {"local", "torchrun", "slurm-example", "local-slurm"} <= set(names)
    assert {name: load_profile(name).executor for name in ("local", "torchrun", "slurm-example")} == {
        "local": "local", "torchrun": "torchrun", "slurm-example": "slurm"}


def test_stage_overrides_by_kind_then_name(tmp_path):
    path = write(tmp_path, {"executor": "slurm", "slurm": {
        "partition": "gpu", "cpus_per_task": 4, "extra_sbatch": {"mail-type": "FAIL"},
        "stages": {"pretrain": {"nodes": 4, "extra_sbatch": {"exclusive": True}},
                   "warmup": {"nodes": 1, "time_min": 30}}}})
    profile = load_profile(path)
    train = profile.slurm_resources("warmup", "pretrain")
    assert (train.nodes, train.time_min, train.partition, train.cpus_per_task) == (1, 30, "gpu", 4)
    assert train.extra_sbatch == {"mail-type": "FAIL", "exclusive": True}
    other = profile.slurm_resources("eval", "evaluate")
    assert (other.nodes, other.time_min, other.extra_sbatch) == (1, 60, {"mail-type": "FAIL"})


def test_include_a_base_profile(tmp_path):
    base = write(tmp_path, {"executor": "slurm", "slurm": {"partition": "gpu", "account": "team"}}, "base.yaml")
    profile = load_profile(write(tmp_path, {"include": base, "slurm": {"account": "other"}}))
    resources = profile.slurm_resources("a", "a")
    assert (resources.partition, resources.account) == ("gpu", "other")


@pytest.mark.parametrize("doc, key, message", [
    ({"executor": "slurm", "slurm": {"nodez": 2}}, "slurm.nodez", "did you mean 'nodes'"),
    ({"executor": "slurm", "slurm": {"stages": {"pretrain": {"gpus_per_nod": 8}}}},
     "slurm.stages.pretrain.gpus_per_nod", "did you mean 'gpus_per_node'"),
    ({"executor": "slurm", "slurm": {"time_min": 0}}, "slurm.time_min", "must be >= 1"),
    ({"executor": "slurmm"}, "executor", "did you mean 'slurm'"),
])
def test_mistakes_name_file_and_key(tmp_path, doc, key, message):
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert caught.value.file == path and caught.value.key == key and message in str(caught.value)


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown cluster profile 'nope' .*local-slurm"):
        load_profile("nope")


def test_torchrun_settings_from_profile_or_environment():
    profile = load_profile("torchrun").torchrun
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_RDZV_ENDPOINT": "n0:29400", "PET_NODE_RANK": "1"}
    settings = resolve_torchrun(profile, env)
    assert (settings.nnodes, settings.nproc_per_node, settings.rdzv_endpoint, settings.node_rank) == (
        2, 4, "n0:29400", 1)
    assert not settings.leads
    assert resolve_torchrun(profile, {"MASTER_ADDR": "n0", "MASTER_PORT": "1234"}).rdzv_endpoint == "n0:1234"
    single = resolve_torchrun(profile, {})
    assert (single.nnodes, single.nproc_per_node, single.rdzv_endpoint, single.leads) == (1, None, None, True)
    with pytest.raises(ConfigError, match="2 nodes need node_rank"):
        resolve_torchrun(profile, {"PET_NNODES": "2", "PET_RDZV_ENDPOINT": "n0:1"})


def test_wait_needs_a_slurm_profile(tmp_path, capsys):
    pipeline = write(tmp_path, {"name": "t", "run_dir": str(tmp_path / "run"),
                                "stages": {"a": {"kind": "tests.runner.toy_stage", "value": 1}}}, "p.yaml")
    assert main(["run", pipeline, "--cluster", "local", "--wait"]) == 2
    assert "--wait follows Slurm jobs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing started"
