"""A sharding run killed at any moment re-runs to shards byte-identical to an uninterrupted run's; a
process pool writes the same bytes as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.data.settings import ImageNetShardSettings
from stages import shard_imagenet
from tests.data.shard_fixtures import make_imagenet_tree, stage_context

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"splits": ["train"], "samples_per_shard": 5, "resize_shorter": 96, "workers": 1}


def run_inline(tmp_path: Path, source: Path, **extra) -> Path:
    ctx = stage_context(tmp_path, "shard_imagenet")
    shard_imagenet.run(ImageNetShardSettings(source=str(source), **{**SETTINGS, **extra}), ctx)
    return ctx.out_dir


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet_tree(root, classes=4, train_per_class=40, val_per_class=1, size=(480, 360))
    return root


@pytest.mark.slow
def test_killed_run_reruns_to_identical_shards(tmp_path, source):
    reference = run_inline(tmp_path / "reference", source)
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pipeline.data.settings import ImageNetShardSettings
        from stages import shard_imagenet
        from tests.data.shard_fixtures import stage_context
        ctx = stage_context(Path({str(killed)!r}), "shard_imagenet")
        shard_imagenet.run(ImageNetShardSettings(source={str(source)!r}, **{SETTINGS!r}), ctx)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    train = killed / "run" / "shard_imagenet" / "train"
    deadline = time.monotonic() + 120
    while len(list(train.glob("*_stats.json"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    total = len(list((reference / "train").glob("*.tar")))
    assert len(list(train.glob("*_stats.json"))) < total
    assert not (train / "manifest.json").exists()
    for path in train.glob("*.tar"):  # a shard under its final name is always complete
        with tarfile.open(path) as archive:
            assert len(archive.getmembers()) % 3 == 0

    resumed = run_inline(killed, source)
    assert files(resumed / "train") == files(reference / "train")
    assert (resumed / "report.json").read_bytes() == (reference / "report.json").read_bytes()


@pytest.mark.slow
def test_process_pool_writes_the_same_bytes(tmp_path, source):
    alone = run_inline(tmp_path / "alone", source)
    pooled = run_inline(tmp_path / "pooled", source, workers=2)
    manifests = [json.loads(files(out / "train").pop("manifest.json")) for out in (alone, pooled)]
    assert [manifest["config"].pop("workers") for manifest in manifests] == [1, 2]
    assert manifests[0] == manifests[1]
    shards = [{name: data for name, data in files(out / "train").items() if name != "manifest.json"}
              for out in (alone, pooled)]
    assert shards[0] == shards[1] and len(shards[0]) > 3 * 10
