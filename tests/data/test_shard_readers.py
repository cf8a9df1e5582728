"""Other readers consume our shards as they are: webdataset, open_clip's sizes.json, timm's _info.json."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from pipeline.data.manifest import Manifest
from pipeline.data.settings import ImageNetShardSettings
from stages import shard_imagenet
from tests.data.shard_fixtures import make_imagenet_tree, stage_context


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("readers")
    make_imagenet_tree(tmp_path / "imagenet", train_per_class=9)
    ctx = stage_context(tmp_path, "shard_imagenet")
    settings = ImageNetShardSettings(source=str(tmp_path / "imagenet"), splits=["train"], samples_per_shard=8,
                                       workers=1)
    shard_imagenet.run(settings, ctx)
    return ctx.out_dir / "train"


def test_webdataset_reads_every_sample(dataset):
    manifest = Manifest.load(dataset)
    urls = [str(path) for path in manifest.shard_paths(dataset)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json"))
    assert len(samples) == manifest.num_samples == 9 * 3 + 5
    for image, label, meta in samples:
        assert image.mode == "RGB" and image.size == (meta["width"], meta["height"])
        assert manifest.classes[label].wnid == meta["wnid"]


def test_open_clip_sizes_reader_counts_our_shards(dataset):
    from open_clip_train import data

    manifest = Manifest.load(dataset)
    pattern = str(dataset / f"{{000000..{len(manifest.shards) - 1:06d}}}.tar")
    assert data.get_dataset_size(pattern) == (manifest.num_samples, len(manifest.shards))
    assert json.loads((dataset / "sizes.json").read_text()) == manifest.sizes()


def test_timm_reads_our_shards_through_info_json(dataset):
    from timm.data import create_dataset

    manifest = Manifest.load(dataset)
    reader = create_dataset("wds/imagenet", root=str(dataset), split="train", is_training=False)
    labels = [int(target) for _, target in reader]
    assert len(labels) == manifest.num_samples
    expected = []
    for path in manifest.shard_paths(dataset):
        expected += [int(s["cls"]) for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert sorted(labels) == sorted(expected)
