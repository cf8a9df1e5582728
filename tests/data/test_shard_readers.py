"""Other readers consume our shards as they are: webdataset, open_clip's sizes.json, timm's _info.json (per
split folder, and the stage folder's with every split under timm's default names)."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from pipeline.data.manifest import Manifest
from pipeline.data.settings import ImageNetShardSettings
from stages import shard_imagenet
from tests.data.shard_fixtures import make_imagenet_tree, stage_context


@pytest.fixture(scope="module")
def stage_folder(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("readers")
    make_imagenet_tree(tmp_path / "imagenet", train_per_class=9, val_per_class=4)
    ctx = stage_context(tmp_path, "shard_imagenet")
    settings = ImageNetShardSettings(source=str(tmp_path / "imagenet"), samples_per_shard=8, workers=1)
    shard_imagenet.run(settings, ctx)
    return ctx.out_dir


@pytest.fixture(scope="module")
def dataset(stage_folder):
    return stage_folder / "train"


def labels_in(folder) -> list[int]:
    manifest = Manifest.load(folder)
    return sorted(int(s["cls"]) for s in wds.WebDataset([str(p) for p in manifest.shard_paths(folder)],
                                                        shardshuffle=False))


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


@pytest.mark.parametrize("split, folder", [("train", "train"), ("validation", "val"), ("val", "val")])
def test_timm_reads_every_split_from_the_stage_folder(stage_folder, split, folder):
    from timm.data import create_dataset

    reader = create_dataset("wds/imagenet", root=str(stage_folder), split=split, is_training=False)
    assert sorted(int(target) for _, target in reader) == labels_in(stage_folder / folder)
    info = json.loads((stage_folder / "_info.json").read_text())
    assert sorted(info["splits"]) == ["train", "val", "validation"]


def test_timm_validate_defaults_work_on_a_split_folder_and_the_stage_folder(stage_folder):
    """What timm's validate.py does with its defaults (``--split validation``): create_dataset + create_loader."""
    from timm.data import create_dataset, create_loader

    for root in (stage_folder, stage_folder / "val"):
        dataset = create_dataset("wds/imagenet", root=str(root), split="validation", is_training=False)
        loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=4, use_prefetcher=False, num_workers=0,
                               crop_pct=0.875)
        targets = [int(t) for _, batch in loader for t in batch]
        assert sorted(targets) == labels_in(stage_folder / "val") and len(targets) == 3 * 4
