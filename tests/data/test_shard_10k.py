"""A 10,000-image tree with planted bad files: every bad file is counted by reason, the rest are kept."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.data.manifest import Manifest
from pipeline.data.settings import ImageNetShardSettings
from stages import shard_imagenet
from tests.data.shard_fixtures import make_imagenet_tree, stage_context


@pytest.mark.slow
def test_ten_thousand_images_with_planted_bad_files(tmp_path):
    expected = make_imagenet_tree(tmp_path / "imagenet", classes=100, train_per_class=100, val_per_class=1, plant=8)
    ctx = stage_context(tmp_path, "shard_imagenet")
    settings = ImageNetShardSettings(source=str(tmp_path / "imagenet"), samples_per_shard=500, workers=2)
    outputs = shard_imagenet.run(settings, ctx)
    report = json.loads((ctx.out_dir / "report.json").read_text())
    for split in ("train", "val"):
        outcomes = expected[split].values()
        manifest = Manifest.load(ctx.out_dir / split)
        assert manifest.skipped == dict(Counter(o[1] for o in outcomes if o[0] == "skipped"))
        assert manifest.converted == dict(Counter(o[2] for o in outcomes if o[0] == "kept" and o[2]))
        assert outputs[f"{split}_samples"] == sum(o[0] == "kept" for o in outcomes)
        listed = {(s["source"], s["reason"]) for s in report[split]["skipped_samples"]}
        assert listed == {(path, o[1]) for path, o in expected[split].items() if o[0] == "skipped"}
    print(json.dumps({split: {k: report[split][k] for k in ("samples", "shards", "skipped", "converted")}
                      for split in report}))
    assert outputs["train_samples"] >= 10_000
