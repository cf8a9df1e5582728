"""The tar index written at shard time: it matches the tar, readers use it for one read per sample, shards
without one still read (by a header scan), and re-runs trust a finished shard's size and recorded digest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.core.fsutil import sha256_file
from pipeline.data.loaders_tar import ShardReader
from pipeline.data.manifest import Manifest
from pipeline.data.settings import ImageNetShardSettings
from pipeline.data.shard_writer import finished_shard, stats_path
from pipeline.data.tar_index import TarIndex, index_path
from stages import shard_imagenet
from tests.data.shard_fixtures import make_imagenet_tree, stage_context


class ReadCounter:
    """Read system calls of this process (Linux's per-process I/O accounting), less this counter's own."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/io", os.O_RDONLY)
        first = self._raw()
        self._own = self._raw() - first

    def _raw(self) -> int:
        text = os.pread(self._fd, 4096, 0).decode()
        return int(next(line for line in text.splitlines() if line.startswith("syscr:")).split()[1])

    def since(self, start: int) -> int:
        return self._raw() - start - self._own

    def now(self) -> int:
        return self._raw()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    make_imagenet_tree(root, classes=3, train_per_class=12, val_per_class=1, plant=0)
    ctx = stage_context(tmp_path_factory.mktemp("run"), "shard_imagenet")
    shard_imagenet.run(ImageNetShardSettings(source=str(root), splits=["train"], samples_per_shard=10, workers=1), ctx)
    return ctx.out_dir / "train"


def test_the_index_written_with_the_shard_equals_a_scan_of_it(sharded):
    manifest = Manifest.load(sharded)
    for path, info in zip(manifest.shard_paths(sharded), manifest.shards):
        written = TarIndex.load(index_path(path), info.sha256)
        scanned = TarIndex.scan(path)
        assert written is not None and len(written) == info.samples
        assert written.keys.tolist() == scanned.keys.tolist()
        assert np.array_equal(written.starts, scanned.starts)
        assert info.sha256 == sha256_file(path) and info.bytes == path.stat().st_size


def test_a_sample_costs_one_read_of_its_own_bytes(sharded):
    manifest = Manifest.load(sharded)
    path, info = manifest.shard_paths(sharded)[0], manifest.shards[0]
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    reads = ReadCounter()
    before = reads.now()
    reader = ShardReader(path, info.samples, info.sha256)
    opened = reads.since(before)
    before = reads.now()
    got = [reader.read(i, ("jpg", "cls")) for i in range(info.samples)]
    per_sample = reads.since(before) / info.samples
    reader.close()
    assert opened <= 2, "opening reads the small index file, not the tar's headers"
    assert per_sample == 1
    assert got == [{"jpg": sample["jpg"], "cls": sample["cls"]} for sample in theirs]
    assert [reader.key(i) for i in range(info.samples)] == [sample["__key__"] for sample in theirs]


def test_shards_without_an_index_or_with_a_stale_one_are_scanned(sharded, tmp_path):
    manifest = Manifest.load(sharded)
    path, info = manifest.shard_paths(sharded)[1], manifest.shards[1]
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    reference = ShardReader(path, info.samples, info.sha256)
    expected = [reference.read(i, ("jpg", "cls", "json")) for i in range(info.samples)]

    reads = ReadCounter()
    before = reads.now()
    unindexed = ShardReader(copy, info.samples, info.sha256)
    assert reads.since(before) >= 3 * info.samples, "a shard without an index is scanned header by header"
    assert [unindexed.read(i, ("jpg", "cls", "json")) for i in range(info.samples)] == expected

    TarIndex(np.array([b"other"] * info.samples), np.arange(info.samples + 1, dtype=np.int64)).save(
        index_path(copy), hashlib.sha256(b"another shard").hexdigest())
    stale = ShardReader(copy, info.samples, info.sha256)
    assert [stale.read(i, ("jpg", "cls", "json")) for i in range(info.samples)] == expected


def train_plan(sharded: Path):
    settings = ImageNetShardSettings(**Manifest.load(sharded).config)
    return shard_imagenet.plans(settings, stage_context(sharded.parent, "again"))[1]["train"]


def test_rerun_trusts_size_and_digest_and_verify_rehashes(sharded):
    job = train_plan(sharded).job(0)
    tar = sharded / "000000.tar"
    assert finished_shard(sharded, job) is not None
    original = tar.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    try:
        tar.write_bytes(bytes(flipped))
        assert finished_shard(sharded, job) is not None, "same size and recorded digest: trusted"
        assert finished_shard(sharded, job, verify=True) is None, "verify hashes the bytes"
        tar.write_bytes(original[:-512])
        assert finished_shard(sharded, job) is None, "a different size is never trusted"
    finally:
        tar.write_bytes(original)


def test_a_finished_shard_from_before_indexes_gets_its_index_without_being_rewritten(sharded):
    plan = train_plan(sharded)
    tar, index = sharded / "000002.tar", index_path(sharded / "000002.tar")
    written = index.read_bytes()
    index.unlink()
    modified = tar.stat().st_mtime_ns
    stats = finished_shard(sharded, plan.job(2))
    assert stats is not None and stats_path(sharded, 2).exists()
    assert index.read_bytes() == written and tar.stat().st_mtime_ns == modified
