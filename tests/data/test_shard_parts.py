"""Sharding as Slurm array tasks: the parts together write the same shards as one run."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.stage import StageContext
from pipeline.data.demo_data import DemoSpec, make_demo_data
from pipeline.data.settings import ImageNetShardSettings
from stages import shard_imagenet


def context(run_dir: Path, source_root: Path) -> StageContext:
    out = run_dir / "shard"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(name="shard", run_dir=run_dir, out_dir=out, seed=0, log=logging.getLogger("test"),
                        stage_dirs={"demo": source_root})


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*.tar"))}


def test_array_parts_then_run_equal_a_single_run(tmp_path):
    root = make_demo_data(tmp_path / "demo", DemoSpec(seed=1, train_per_class=1, val_per_class=1, captioned=1))
    settings = ImageNetShardSettings(source="@demo/imagenet", samples_per_shard=20, workers=1)
    whole = context(tmp_path / "whole", root)
    shard_imagenet.run(settings, whole)
    parted = context(tmp_path / "parted", root)
    for part in range(3):
        shard_imagenet.run_part(settings, parted, part, 3)
    written_by_parts = shard_bytes(parted.out_dir)
    assert len(written_by_parts) == len(shard_bytes(whole.out_dir)) > 3
    shard_imagenet.run(settings, parted)
    assert shard_bytes(parted.out_dir) == written_by_parts == shard_bytes(whole.out_dir)
    manifest = Path("train") / "manifest.json"
    assert (parted.out_dir / manifest).read_bytes() == (whole.out_dir / manifest).read_bytes()
