"""Random access to the samples of a WebDataset tar by byte offset, from an index of its headers.

The index is built by reading only the 512-byte member headers (the data blocks are skipped by
arithmetic), the way webdataset's own ``wids`` reader works; reading a sample is then one ``pread`` per
member. Optionally the index is kept in a cache folder under the shard's sha256, so every worker on every
node that shares the folder builds it once.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.fsutil import atomic_write_bytes

_BLOCK = 512


class _NeedsFullParser(Exception):
    """A pax, GNU long-name or pre-POSIX header: let :mod:`tarfile` parse (or reject) this shard."""


def _scan_ustar(path: Path) -> list[tuple[str, int, int]]:
    """Members (name, data offset, size) from plain ustar headers, parsed by field offsets: about ten times
    quicker than ``tarfile`` (a 1,250-sample shard in milliseconds), which matters when every worker
    indexes every shard it reads."""
    members = []
    with open(path, "rb") as stream:
        fd = stream.fileno()
        offset = 0
        while True:
            header = os.pread(fd, _BLOCK, offset)
            if len(header) < _BLOCK or header.count(0) == _BLOCK:
                return members
            kind = header[156:157]
            if header[257:262] != b"ustar" or kind in (b"x", b"g", b"L"):
                raise _NeedsFullParser
            try:
                size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            except ValueError:
                raise ValueError(f"{path}: bad tar header at byte {offset}") from None
            if kind in (b"0", b"\0"):
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
                members.append((name, offset + _BLOCK, size))
            offset += _BLOCK + -(-size // _BLOCK) * _BLOCK


def _scan_tarfile(path: Path) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(path, "r:") as archive:
            return [(m.name, m.offset_data, m.size) for m in archive if m.isreg()]
    except tarfile.TarError as error:
        raise ValueError(f"{path}: unreadable tar: {error}") from None


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), ext


@dataclass(frozen=True)
class TarIndex:
    """Per sample: its key, and the byte offset and size of each member extension (-1: absent)."""

    keys: np.ndarray
    extensions: tuple[str, ...]
    offsets: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def scan(cls, path: Path) -> TarIndex:
        try:
            members = _scan_ustar(path)
        except _NeedsFullParser:
            members = _scan_tarfile(path)
        keys: list[str] = []
        rows: list[dict[str, tuple[int, int]]] = []
        for name, offset, size in members:
            key, ext = _split_name(name)
            if not key:
                continue
            if not keys or keys[-1] != key:
                keys.append(key)
                rows.append({})
            rows[-1][ext] = (offset, size)
        extensions = tuple(sorted({ext for row in rows for ext in row}))
        table = np.full((len(rows), len(extensions), 2), -1, dtype=np.int64)
        for i, row in enumerate(rows):
            for j, ext in enumerate(extensions):
                if ext in row:
                    table[i, j] = row[ext]
        return cls(np.array(keys, dtype=str), extensions, table[..., 0], table[..., 1])

    @classmethod
    def cached(cls, path: Path, sha256: str, cache_dir: Path | None) -> TarIndex:
        """Load the index from ``cache_dir/<sha256>.npz``, or scan the shard and store it there."""
        if cache_dir is None or not sha256:
            return cls.scan(path)
        cache_file = cache_dir / f"{sha256}.npz"
        if cache_file.exists():
            with np.load(cache_file) as data:
                return cls(data["keys"], tuple(data["extensions"].tolist()), data["offsets"], data["sizes"])
        index = cls.scan(path)
        buffer = io.BytesIO()
        np.savez(buffer, keys=index.keys, extensions=np.array(index.extensions, dtype=str),
                 offsets=index.offsets, sizes=index.sizes)
        atomic_write_bytes(cache_file, buffer.getvalue())
        return index


class ShardReader:
    """Reads samples of one shard by index; checks the shard against its manifest entry once."""

    def __init__(self, path: Path, expected_samples: int, sha256: str = "", cache_dir: Path | None = None):
        self.path = path
        if not path.is_file():
            raise ValueError(f"{path.name}: shard file is missing from {path.parent}")
        self.index = TarIndex.cached(path, sha256, cache_dir)
        if len(self.index) != expected_samples:
            raise ValueError(
                f"{path.name}: holds {len(self.index)} samples but the manifest says {expected_samples}"
            )
        self._columns = {ext: j for j, ext in enumerate(self.index.extensions)}
        self._fd = os.open(path, os.O_RDONLY)

    def key(self, i: int) -> str:
        return str(self.index.keys[i])

    def read(self, i: int, extensions: tuple[str, ...]) -> dict[str, bytes]:
        """The members ``extensions`` of sample ``i``, as raw bytes (nothing is decoded here)."""
        members = {}
        for ext in extensions:
            column = self._columns.get(ext)
            offset = -1 if column is None else self.index.offsets[i, column]
            if offset < 0:
                raise ValueError(f"{self.path.name}: sample {self.key(i)} has no .{ext} member")
            size = int(self.index.sizes[i, column])
            data = os.pread(self._fd, size, int(offset))
            if len(data) != size:
                raise ValueError(f"{self.path.name}: sample {self.key(i)}.{ext} is truncated")
            members[ext] = data
        return members

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
