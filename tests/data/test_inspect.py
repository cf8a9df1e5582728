"""tools/inspect_shards.py: the summary matches the manifest, the grid shows the samples, damage is found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.manifest import Manifest
from pipeline.data.settings import ImageNetShardSettings
from stages import shard_imagenet
from tests.data.shard_fixtures import make_imagenet_tree, stage_context
from tests.tools import load_tool

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "inspect_shards.py"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("inspect")
    make_imagenet_tree(tmp_path / "imagenet", train_per_class=6, size=(96, 64))
    ctx = stage_context(tmp_path, "shard_imagenet")
    settings = ImageNetShardSettings(source=str(tmp_path / "imagenet"), splits=["train"], samples_per_shard=5,
                                       workers=1)
    shard_imagenet.run(settings, ctx)
    return ctx.out_dir / "train"


def test_cli_prints_summary_and_writes_a_png_grid(dataset, tmp_path):
    grid = tmp_path / "grid.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(TOOL), str(dataset), "--grid", str(grid), "--count", "6",
                             "--verify"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    manifest = Manifest.load(dataset)
    assert summary["samples"] == manifest.num_samples == 6 * 3 + 5
    assert summary["skipped"] == manifest.skipped and sum(summary["skipped"].values()) == 6
    assert summary["classes"] == 3 and summary["corrupt_shards"] == []
    image = Image.open(grid)
    assert image.format == "PNG" and image.width == 4 * 160
    pixels = np.asarray(image.convert("L"))
    tiles = [pixels[row * 203: row * 203 + 160, col * 160:(col + 1) * 160] for row in range(2) for col in range(4)]
    filled = [bool((tile < 250).mean() > 0.3) for tile in tiles]
    assert filled == [True] * 6 + [False] * 2


def test_verify_names_a_damaged_shard_and_bad_folders_fail_in_one_line(dataset, tmp_path):
    tool = load_tool("inspect_shards")
    damaged = tmp_path / "copy"
    damaged.mkdir()
    for path in dataset.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    data = bytearray((damaged / "000001.tar").read_bytes())
    data[600] ^= 1
    (damaged / "000001.tar").write_bytes(bytes(data))
    assert tool.summarize(damaged, verify=True)["corrupt_shards"] == ["000001.tar"]
    labels = [text for _, text in tool.pick_samples(dataset, 4, seed=1)]
    assert len(labels) == 4 and all(text.split(": ")[1] == f"class {text.split(':')[0]}" for text in labels)
    sys.argv = ["inspect_shards.py", str(tmp_path / "nowhere")]
    with pytest.raises(SystemExit, match=r"^error: .*nowhere/manifest.json: no manifest"):
        tool.main()
