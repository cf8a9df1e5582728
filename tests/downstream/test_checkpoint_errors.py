"""A damaged checkpoint fails the export with one line naming the file; pickled objects are refused, never run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint.files import CheckpointError
from pipeline.export.exporter import load_trained_model
from pipeline.export.recipe import ModelRecipe
from tests.train.helpers import REPO, train_env

pytestmark = pytest.mark.slow


@pytest.fixture
def source(downstream_run, tmp_path) -> Path:
    """A copy of the supervised ZeRO-1 training folder (model.json and checkpoints/) to damage."""
    copy = tmp_path / "pretrain"
    copy.mkdir()
    shutil.copy(downstream_run / "pretrain_sup" / "model.json", copy)
    shutil.copytree(downstream_run / "pretrain_sup" / "checkpoints", copy / "checkpoints")
    return copy


def latest_dir(source: Path) -> Path:
    checkpoints = source / "checkpoints"
    return checkpoints / (checkpoints / "latest").read_text().strip()


def export_error(source: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_trained_model(source / "checkpoints", ModelRecipe.load(source))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_truncated_file_is_named(source):
    states = latest_dir(source) / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[: len(data) // 2])
    message = export_error(source)
    assert message.startswith(f"{states}: truncated or corrupted")


def test_flipped_byte_in_an_optimizer_shard_is_named(source):
    shard = latest_dir(source) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    message = export_error(source)
    assert message.startswith(f"{shard}: corrupted checkpoint file")


def test_missing_latest_is_named(source):
    (source / "checkpoints" / "latest").unlink()
    assert export_error(source).startswith(f"{source / 'checkpoints' / 'latest'}: no checkpoint recorded")


class Payload:
    """Unpickling this would create the marker file: what an attacker's checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_objects_are_refused_and_never_executed(source, tmp_path):
    states = latest_dir(source) / "mp_rank_00_model_states.pt"
    marker = tmp_path / "executed"
    content = torch.load(states, weights_only=False)  # our own test file: trusted here
    content["payload"] = Payload(marker)
    torch.save(content, states)
    message = export_error(source)
    assert message.startswith(f"{states}: cannot load with weights_only=True")
    assert not marker.exists()


def test_export_stage_fails_with_the_file_in_its_error_line(source, tmp_path):
    states = latest_dir(source) / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    pipeline = tmp_path / "export.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "export", "run_dir": str(tmp_path / "run"),
                                        "stages": {"export": {"kind": "export", "source": str(source)}}}))
    result = subprocess.run([sys.executable, "-m", "pipeline.core.cli", "run", str(pipeline)],
                            cwd=REPO, env=train_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"CheckpointError: {states}: truncated or corrupted" in last
