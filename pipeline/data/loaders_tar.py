"""Random access to the samples of a WebDataset tar by byte offset, from its index (:mod:`pipeline.data.tar_index`).

A reader loads the shard's own index, written beside it at shard time (one small read per shard), so a sample
costs exactly one ``pread`` of its own bytes: nothing else of the tar is ever read. A shard written before
indexes existed (or by another tool) is indexed by scanning its member headers, optionally kept in
``index_cache_dir`` under the shard's sha256, so every worker on every node sharing the folder scans it once.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from pipeline.data.tar_index import TarIndex, sample_members


class ShardReader:
    """Reads samples of one shard by index; checks the shard against its manifest entry once."""

    def __init__(self, path: Path, expected_samples: int, sha256: str = "", cache_dir: Path | None = None):
        self.path = path
        if not path.is_file():
            raise ValueError(f"{path.name}: shard file is missing from {path.parent}")
        self.index = TarIndex.for_shard(path, sha256, cache_dir)
        if len(self.index) != expected_samples:
            raise ValueError(
                f"{path.name}: holds {len(self.index)} samples but the manifest says {expected_samples}"
            )
        self._fd = os.open(path, os.O_RDONLY)

    def key(self, i: int) -> str:
        return self.index.key(i)

    def read(self, i: int, extensions: tuple[str, ...]) -> dict[str, bytes]:
        """The members ``extensions`` of sample ``i``, as raw bytes (nothing is decoded here): one read."""
        start, end = self.index.span(i)
        data = os.pread(self._fd, end - start, start)
        if len(data) != end - start:
            raise ValueError(f"{self.path.name}: sample {self.key(i)} is truncated")
        found = sample_members(data, self.key(i))
        missing = [ext for ext in extensions if ext not in found]
        if missing:
            raise ValueError(f"{self.path.name}: sample {self.key(i)} has no .{missing[0]} member")
        return {ext: found[ext] for ext in extensions}

    def extensions(self, i: int = 0) -> tuple[str, ...]:
        """The member extensions of sample ``i``, in tar order."""
        start, end = self.index.span(i)
        return tuple(sample_members(os.pread(self._fd, end - start, start), self.key(i)))

    def close(self) -> None:
        os.close(self._fd)


class ShardReaders:
    """Open readers for the shards in use, least recently used closed first."""

    def __init__(self, paths: list[Path], sizes: list[int], sha256s: list[str],
                 cache_dir: Path | None, max_open: int):
        self._paths = paths
        self._sizes = sizes
        self._sha256s = sha256s
        self._cache_dir = cache_dir
        self._max_open = max_open
        self._open: OrderedDict[int, ShardReader] = OrderedDict()

    def __getitem__(self, shard: int) -> ShardReader:
        if shard not in self._open:
            self._open[shard] = ShardReader(
                self._paths[shard], self._sizes[shard], self._sha256s[shard], self._cache_dir
            )
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(shard)
        return self._open[shard]

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()
