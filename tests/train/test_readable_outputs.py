"""Outputs colleagues can read: under umask 022 every file the pipeline writes (shards, manifests, checkpoints,
`latest`, exports, state) is readable by group and others, and another user reads the shards, a manifest and the
export with ordinary tools."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.train.helpers import TINY_KOPE, kope_run, write_pipeline

pytestmark = pytest.mark.slow
OTHER_USER = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")  # nobody:nogroup


def can_switch_users() -> str | None:
    if os.geteuid() != 0:
        return "switching to another user needs root"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


@pytest.fixture
def shared_folder():
    """A folder other users may enter, as a project folder on shared storage is (pytest's own is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="kope-shared-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_every_output_is_readable_by_others_under_umask_022(shared_folder):
    stages = {
        "demo_data": {"kind": "make_demo_data", "digits": 3, "train_per_class": 4, "val_per_class": 1,
                      "captioned": 8},
        "shard": {"kind": "shard_imagenet", "source": "@demo_data/imagenet", "samples_per_shard": 8, "workers": 1},
        "pretrain": {"kind": "pretrain", "data": "@shard/train", "model": TINY_KOPE, "steps": 2,
                     "global_batch_size": 4, "loader": {"batch_size": 4, "num_workers": 0},
                     "schedule": {"warmup_steps": 1}, "checkpoint": {"every_steps": 1, "keep": 2},
                     "supervised": {"ema_decay": 0.0, "aug": {"image_size": 64}}},
        "export": {"kind": "export", "source": "@pretrain"},
    }
    pipeline = write_pipeline(shared_folder, stages, executor="inline")
    old = os.umask(0o022)
    try:
        result = kope_run(pipeline)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = shared_folder / "run"
    private = [str(path.relative_to(run_dir)) for path in run_dir.rglob("*")
               if path.name != ".lock" and (path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH)) !=
               (stat.S_IRGRP | stat.S_IROTH)]
    assert not private, f"not readable by group and others: {private[:10]}"
    for name in ("pretrain/checkpoints/latest", "export/model.safetensors", "shard/train/manifest.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name

    reason = can_switch_users()
    if reason:
        pytest.skip(reason)
    shards = sorted((run_dir / "shard" / "train").glob("*.tar"))
    export = run_dir / "export"
    files = [*shards, run_dir / "shard" / "train" / "manifest.json", export / "model.safetensors",
             export / "config.json", export / "README.md"]
    read = subprocess.run([*OTHER_USER, "sha256sum", *map(str, files)], capture_output=True, text=True)
    assert read.returncode == 0, read.stderr
    listed = subprocess.run([*OTHER_USER, "tar", "-tf", str(shards[0])], capture_output=True, text=True)
    assert listed.returncode == 0 and ".jpg" in listed.stdout, listed.stderr
    checked = subprocess.run([*OTHER_USER, "sha256sum", "-c", "SHA256SUMS"], cwd=export, capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
