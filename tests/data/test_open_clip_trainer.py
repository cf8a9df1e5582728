"""open_clip's own trainer (``open_clip_train``) consumes our CLIP shards, through the loader path README
recommends (:mod:`pipeline.data.open_clip_wds`); without it, open_clip's training loader stops at
webdataset's end-of-shard record, on our shards as on any."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision.transforms as T

from pipeline.data.manifest import Manifest
from pipeline.data.open_clip_wds import read_end_of_shard_records
from pipeline.data.settings import DataCompShardSettings
from stages import shard_datacomp
from tests.data.shard_fixtures import jpeg, stage_context, write_img2dataset_shard

SAMPLES = 14


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("clip")
    rows = [{"key": f"{n:09d}", "status": "success", "error_message": None,
             "uid": hashlib.md5(str(n).encode()).hexdigest(), "caption": f"a photo of thing {n}",
             "image": jpeg(n, (40, 40)), "width": 40, "height": 40} for n in range(SAMPLES)]
    write_img2dataset_shard(tmp_path / "input", 0, rows)
    ctx = stage_context(tmp_path, "shard_datacomp")
    shard_datacomp.run(DataCompShardSettings(source=str(tmp_path / "input"), mode="reshard", samples_per_shard=3,
                                               workers=1), ctx)
    return ctx.out_dir / "train"


def train_args(folder: Path, **overrides) -> argparse.Namespace:
    manifest = Manifest.load(folder)
    pattern = str(folder / f"{{000000..{len(manifest.shards) - 1:06d}}}.tar")
    return argparse.Namespace(**{"train_data": pattern, "val_data": None, "dataset_resampled": False,
                                 "train_num_samples": None, "train_data_upsampling_factors": None, "seed": 0,
                                 "batch_size": 2, "world_size": 1, "workers": 0, **overrides})


def token_rows(dataloader) -> list[tuple[int, ...]]:
    rows = []
    for images, tokens in dataloader:
        assert images.shape[1:] == (3, 32, 32)
        rows += [tuple(row.tolist()) for row in tokens]
    return rows


def test_open_clip_training_loader_reads_every_sample_with_the_end_of_shard_fix(clip_shards, monkeypatch):
    import open_clip
    from open_clip_train import data

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    preprocess = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    with pytest.raises(KeyError, match="fname"):  # the cause: open_clip's grouping meets webdataset's {} record
        for _ in data.get_wds_dataset(train_args(clip_shards), preprocess, is_train=True,
                                      tokenizer=tokenizer).dataloader:
            pass
    monkeypatch.setattr(data, "tarfile_to_samples_nothrow", data.tarfile_to_samples_nothrow)  # restored after
    read_end_of_shard_records()
    for overrides in ({}, {"workers": 1}, {"dataset_resampled": True}):
        info = data.get_wds_dataset(train_args(clip_shards, **overrides), preprocess, is_train=True,
                                    tokenizer=tokenizer)
        rows = token_rows(info.dataloader)
        assert len(rows) == info.dataloader.num_samples == SAMPLES
        if not overrides.get("dataset_resampled"):  # without replacement: each sample once
            expected = tokenizer([f"a photo of thing {n}" for n in range(SAMPLES)])
            assert sorted(rows) == sorted(tuple(row.tolist()) for row in expected)


@pytest.mark.slow
def test_open_clip_trainer_runs_an_epoch_on_our_shards(clip_shards, tmp_path):
    """``python -m pipeline.data.open_clip_wds`` with open_clip's usual arguments and a tiny model."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}}))
    manifest = Manifest.load(clip_shards)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.data.open_clip_wds", "--dataset-type", "webdataset",
         "--train-data", str(clip_shards / f"{{000000..{len(manifest.shards) - 1:06d}}}.tar"),
         "--model", f"local-dir:{model}", "--batch-size", "2", "--epochs", "1", "--workers", "1", "--device", "cpu",
         "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", "epoch", "--save-frequency", "0",
         "--report-to", "", "--warmup", "0", "--lr", "1e-4"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Train Epoch: 0 [{SAMPLES}/{SAMPLES} (100%)]" in result.stdout + result.stderr
