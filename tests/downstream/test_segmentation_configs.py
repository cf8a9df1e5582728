"""The ADE20K pipeline validates with its paths given as settings, and the segmentation recipe holds the
paper's protocol; the rules between segmentation settings fail at config time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config.loader import load_pipeline
from pipeline.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ADE20K = REPO / "configs" / "pipelines" / "ade20k-segmentation.yaml"


def paths(tmp_path: Path) -> list[str]:
    for folder in ("ADEChallengeData2016", "export"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return [f"shard_ade20k.source={tmp_path / 'ADEChallengeData2016'}",
            f"finetune_segmentation.init={tmp_path / 'export'}"]


def test_ade20k_pipeline_validates_with_the_paths_given_and_follows_the_protocol(tmp_path):
    config = load_pipeline(ADE20K, paths(tmp_path))
    assert [(name, stage.kind.name) for name, stage in config.stages.items()] == [
        ("shard_ade20k", "shard_segmentation"), ("finetune_segmentation", "finetune_segmentation"),
        ("evaluate_segmentation", "evaluate")]
    shard = config.stages["shard_ade20k"].settings
    assert (shard.num_classes, shard.reduce_zero_label) == (150, True)
    train = config.stages["finetune_segmentation"].settings
    assert (train.steps, train.global_batch_size, train.optim.layer_decay) == (160000, 16, 0.65)
    seg = train.segmentation
    assert seg.head == "setr_pup" and seg.aux_weight == 0.4 and len(seg.out_indices) == 4
    assert (seg.aug.crop_size, seg.aug.scale, seg.aug.ratio_range, seg.aug.cat_max_ratio) == (
        512, (2048, 512), (0.5, 2.0), 0.75)
    train.check_world(8)  # 8 ranks x 2 images per step
    assert config.stages["evaluate_segmentation"].settings.segmentation.modes == ["whole", "slide"]
    result = subprocess.run([sys.executable, "-m", "pipeline.core.cli", "config", str(ADE20K), *paths(tmp_path)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_placeholder_paths_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="shard_ade20k.source"):
        load_pipeline(ADE20K)


@pytest.mark.parametrize(("stage", "block", "message"), [
    ("evaluate", {"kind": "evaluate", "model": "M", "val": "M", "protocols": ["segmentation", "top1"]},
     "protocols: segmentation evaluates a segmenter export"),
    ("seg", {"kind": "finetune_segmentation", "init": "M", "data": "M", "steps": 10,
             "segmentation": {"out_indices": []}}, "segmentation.out_indices: name at least one backbone block"),
    ("seg", {"kind": "finetune_segmentation", "init": "M", "data": "M", "steps": 10,
             "segmentation": {"aug": {"ratio_range": [2.0, 0.5]}}}, "ratio_range"),
    ("shard", {"kind": "shard_segmentation", "source": "M", "splits": {"training": "x", "validation": "x"}},
     "distinct output folders"),
])
def test_segmentation_rules_fail_at_config_time(tmp_path, stage, block, message):
    (tmp_path / "M").mkdir()
    block = {key: str(tmp_path / "M") if value == "M" else value for key, value in block.items()}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "stages": {stage: block}}))
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)
