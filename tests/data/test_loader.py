"""The loader's epoch semantics, seeking without decoding, reading tars by offset, and its errors."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.loaders import LoaderSettings, ResumableLoader
from pipeline.data.loaders_samples import supervised_samples
from pipeline.data.loaders_tar import ShardReader
from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.data.tar_index import TarIndex, index_path
from pipeline.data.transforms import SupervisedAugSettings
from tests.data.loader_fixtures import write_dataset

N = 35


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("loader") / "cls")


def loader(dataset: Path, rank: int = 0, world: int = 1, seed: int = 3, **settings) -> ResumableLoader:
    settings = {"batch_size": 4, "num_workers": 0, "window_shards": 2, **settings}
    samples = supervised_samples(SupervisedAugSettings(image_size=16))
    return ResumableLoader(dataset, samples, LoaderSettings(**settings), seed=seed, rank=rank, world_size=world)


def epoch_keys(dataset: Path, world: int = 2, **settings) -> list[list[list[str]]]:
    """Per rank, the keys of each step of one epoch."""
    return [[b["key"] for b in loader(dataset, rank, world, **settings)] for rank in range(world)]


def test_every_sample_once_per_epoch_but_the_dropped_last_partial_batch(dataset):
    per_rank = epoch_keys(dataset, num_workers=2)
    seen = [k for steps in per_rank for batch in steps for k in batch]
    assert [len(steps) for steps in per_rank] == [4, 4]
    assert len(seen) == len(set(seen)) == 32, "35 // 8 full global batches; 3 samples skipped"


def test_without_drop_last_every_sample_exactly_once(dataset):
    per_rank = epoch_keys(dataset, drop_last=False)
    seen = [k for steps in per_rank for batch in steps for k in batch]
    assert len(seen) == len(set(seen)) == N
    assert [len(steps[-1]) for steps in per_rank] == [2, 1], "the last 3 samples split 2 + 1"


def test_orders_repeat_for_the_same_seed_and_epoch_only(dataset):
    first = loader(dataset)
    epoch0, epoch1 = [b["key"] for b in first], [b["key"] for b in first]
    assert epoch0 == [b["key"] for b in loader(dataset)]
    assert epoch0 != epoch1
    assert epoch0 != [b["key"] for b in loader(dataset, seed=4)]


def test_repeated_augmentation_puts_copies_on_different_ranks(dataset):
    per_rank = epoch_keys(dataset, repeats=2)
    for batch0, batch1 in zip(*per_rank):
        assert batch0 == batch1, "position 2m goes to rank 0, its copy 2m + 1 to rank 1"
    images = [next(iter(loader(dataset, rank, 2, repeats=2)))["image"] for rank in range(2)]
    assert not torch.equal(*images), "each copy is augmented differently"


def test_samples_per_epoch_sets_the_epoch_length(dataset):
    short = loader(dataset, samples_per_epoch=16)
    assert len(short) == 4 and len(list(short)) == 4 and short.epoch == 1


def test_seeking_decodes_nothing_before_the_position(dataset, monkeypatch):
    opened = Counter()
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened["images"] += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    full = loader(dataset, batch_size=2)
    batches = iter(full)
    for _ in range(6):
        next(batches)
    assert opened["images"] == 12
    state = full.state_dict()
    assert state["samples_consumed"] == 12

    opened.clear()
    resumed = loader(dataset, batch_size=2)
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    assert opened["images"] == 2
    assert batch["key"] == next(batches)["key"]


def test_a_state_from_another_order_or_out_of_range_is_refused(dataset):
    state = loader(dataset).state_dict()
    with pytest.raises(ValueError, match="another sample order"):
        loader(dataset, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="another sample order"):
        loader(dataset, window_shards=3).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        loader(dataset).load_state_dict({**state, "samples_consumed": N + 1})
    with pytest.raises(ValueError, match="lacks"):
        loader(dataset).load_state_dict({"epoch": 0})
    loader(dataset, batch_size=7, num_workers=1).load_state_dict(state)


def test_our_reader_and_webdataset_agree_on_every_sample(dataset):
    manifest = Manifest.load(dataset)
    for path, info in zip(manifest.shard_paths(dataset), manifest.shards):
        reader = ShardReader(path, info.samples)
        theirs = list(wds.WebDataset(str(path), shardshuffle=False))
        assert len(theirs) == info.samples
        for i, sample in enumerate(theirs):
            assert reader.key(i) == sample["__key__"]
            assert reader.read(i, ("jpg", "cls", "json")) == {e: sample[e] for e in ("jpg", "cls", "json")}
        reader.close()


def test_pax_headers_fall_back_to_the_full_parser(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for key, data in [("é1", b"one"), ("x" * 120, b"two!")]:
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    index = TarIndex.scan(path)
    assert [index.key(i) for i in range(len(index))] == ["é1", "x" * 120]
    reader = ShardReader(path, 2)
    assert reader.read(1, ("txt",)) == {"txt": b"two!"}
    assert reader.read(0, ("txt",)) == {"txt": b"one"}


def test_index_cache_is_keyed_by_the_shard_digest(dataset, tmp_path):
    """Shards written without an index (as these are) are scanned once, into the cache."""
    info = Manifest.load(dataset).shards[0]
    assert not index_path(dataset / info.name).exists()
    built = TarIndex.for_shard(dataset / info.name, info.sha256, tmp_path)
    assert (tmp_path / f"{info.sha256}.idx").exists()
    cached = TarIndex.for_shard(tmp_path / "absent.tar", info.sha256, tmp_path)
    assert cached.keys.tolist() == built.keys.tolist() and np.array_equal(cached.starts, built.starts)
    keys = [b["key"] for b in loader(dataset, index_cache_dir=str(tmp_path))]
    assert keys == [b["key"] for b in loader(dataset)]


def _rewrite_shard(dataset: Path, shard: int, change) -> None:
    """Apply ``change(name, data) -> data | None`` (None drops the member) and update the manifest."""
    manifest = Manifest.load(dataset)
    path = manifest.shard_paths(dataset)[shard]
    with tarfile.open(path) as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as target:
        for member, data in members:
            data = change(member.name, data)
            if data is not None:
                member.size = len(data)
                target.addfile(member, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    old = manifest.shards[shard]
    manifest.shards[shard] = ShardInfo(old.name, old.samples, len(buffer.getvalue()), old.sha256)
    manifest.save(dataset)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_names_its_shard_and_key_in_one_line(tmp_path, workers):
    dataset = write_dataset(tmp_path / "bad")
    _rewrite_shard(dataset, 2, lambda name, data: b"not a jpeg" if name == "000020003.jpg" else data)
    with pytest.raises(ValueError, match=r"^000002\.tar: sample 000020003: UnidentifiedImageError: ") as error:
        list(loader(dataset, shuffle=False, num_workers=workers))
    assert "\n" not in str(error.value)


def test_a_missing_member_names_its_shard_and_key(tmp_path):
    dataset = write_dataset(tmp_path / "bad")
    _rewrite_shard(dataset, 1, lambda name, data: None if name == "000010002.cls" else data)
    with pytest.raises(ValueError, match=r"000001\.tar: sample 000010002 has no \.cls member"):
        list(loader(dataset, shuffle=False))


def test_a_shard_that_disagrees_with_the_manifest_is_named(tmp_path):
    dataset = write_dataset(tmp_path / "bad")
    _rewrite_shard(dataset, 3, lambda name, data: None if name.startswith("000030005.") else data)
    with pytest.raises(ValueError, match=r"000003\.tar: holds 5 samples but the manifest says 6"):
        list(loader(dataset, shuffle=False))


def test_a_garbled_tar_header_is_named(tmp_path):
    dataset = write_dataset(tmp_path / "bad")
    path = dataset / "000001.tar"
    data = bytearray(path.read_bytes())
    second = data.index(b"000010001.jpg")
    data[second:second + 512] = b"\xff" * 512
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"000001\.tar: holds 1 samples but the manifest says 5"):
        list(loader(dataset, shuffle=False))


def test_a_missing_shard_file_is_named(tmp_path):
    dataset = write_dataset(tmp_path / "bad")
    (dataset / "000004.tar").unlink()
    with pytest.raises(ValueError, match=r"^000004\.tar: shard file is missing"):
        list(loader(dataset, num_workers=2))
