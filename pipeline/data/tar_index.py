"""Where each sample of a WebDataset tar lies, so a reader fetches a sample with one read of its own bytes.

A sample's members are consecutive in the tar, so the index is just each sample's key and the byte offset
where its first member header starts (plus where the last sample ends): sample ``i`` is the byte range
``[starts[i], starts[i + 1])``, read with one ``pread`` and split into members by parsing the few 512-byte
headers inside it in memory.

The shard writer knows every offset and writes the index beside the shard (``NNNNNN.idx``), bound to the
shard's sha256, so no reader ever scans a tar. Shards written before that have no index: :meth:`TarIndex.scan`
builds one from the member headers alone (the data blocks are skipped by arithmetic), the way webdataset's own
``wids`` reader does.

File format (little endian): ``KOPEIDX1``, the sample count ``n`` and the key width ``w`` (uint64 each), the
shard's sha256 (32 bytes), ``n + 1`` int64 offsets, ``n`` keys of ``w`` bytes (UTF-8, NUL-padded). Loading is
one read and two ``numpy.frombuffer`` calls.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.fsutil import atomic_write_bytes

BLOCK = 512
INDEX_SUFFIX = ".idx"
MAGIC = b"KOPEIDX1"
_HEADER = struct.Struct("<8sQQ32s")
_SPECIAL_HEADERS = (b"x", b"g", b"L", b"K")  # pax and GNU long-name headers: left to tarfile


class _NeedsFullParser(Exception):
    """A pax, GNU long-name or pre-POSIX header: let :mod:`tarfile` parse (or reject) these bytes."""


def index_path(tar_path: Path) -> Path:
    return Path(tar_path).with_suffix(INDEX_SUFFIX)


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), ext


def _parse_header(header: bytes, position: int) -> tuple[bytes, str, int] | None:
    """(type, name, size) of a plain ustar/GNU header; ``None`` at the end-of-archive marker; raises
    _NeedsFullParser for a pax or long-name header."""
    if header.count(0) == BLOCK:
        return None
    kind = header[156:157]
    if header[257:262] != b"ustar" or kind in _SPECIAL_HEADERS:
        raise _NeedsFullParser
    try:
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(f"bad tar header at byte {position}") from None
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
        name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
    return kind, name, size


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _walk_headers(read: Callable[[int], bytes]):
    """(name, header offset, data offset, size) of the regular members, reading only headers: ``read(offset)``
    returns the 512 bytes at ``offset`` (fewer at the end)."""
    offset = 0
    while len(header := read(offset)) == BLOCK:
        parsed = _parse_header(header, offset)
        if parsed is None:
            return
        kind, name, size = parsed
        if kind in (b"0", b"\0"):
            yield name, offset, offset + BLOCK, size
        offset += BLOCK + _padded(size)


def _plain_headers(data: bytes):
    """The regular members in ``data`` (one sample's bytes)."""
    return _walk_headers(lambda offset: data[offset:offset + BLOCK])


def sample_members(data: bytes, key: str) -> dict[str, bytes]:
    """The members of sample ``key`` (extension -> bytes) in ``data``, the bytes of its index range."""
    members: dict[str, bytes] = {}
    try:
        for name, _, start, size in _plain_headers(data):
            member_key, ext = split_name(name)
            if member_key == key and ext not in members:
                members[ext] = data[start:start + size]
    except _NeedsFullParser:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive:
                member_key, ext = split_name(member.name)
                if member.isreg() and member_key == key and ext not in members:
                    members[ext] = archive.extractfile(member).read()
    return members


@dataclass(frozen=True)
class TarIndex:
    """Per sample its key and where its bytes start; ``starts`` has one entry more, the end of the last."""

    keys: np.ndarray  # bytes ('S'), UTF-8
    starts: np.ndarray  # int64, len(keys) + 1

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8", "surrogateescape")

    def span(self, i: int) -> tuple[int, int]:
        return int(self.starts[i]), int(self.starts[i + 1])

    @classmethod
    def from_members(cls, members: list[tuple[str, int, int, int]]) -> TarIndex:
        """From (name, header offset, data offset, size) of every regular member, in tar order."""
        keys: list[bytes] = []
        starts: list[int] = []
        end = 0
        for name, header_offset, data_offset, size in members:
            key, _ = split_name(name)
            if key and (not keys or keys[-1] != key.encode("utf-8", "surrogateescape")):
                keys.append(key.encode("utf-8", "surrogateescape"))
                starts.append(header_offset)
            end = data_offset + _padded(size)
        return cls(np.array(keys, dtype=bytes) if keys else np.array([], dtype="S1"),
                   np.array([*starts, end] if keys else [0], dtype=np.int64))

    @classmethod
    def scan(cls, path: Path) -> TarIndex:
        """Read only the member headers of ``path`` (for shards written without an index)."""
        try:
            return cls.from_members(list(_headers_by_pread(Path(path))))
        except _NeedsFullParser:
            pass
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        try:
            with tarfile.open(path, "r:") as archive:
                return cls.from_members([(m.name, m.offset, m.offset_data, m.size) for m in archive if m.isreg()])
        except tarfile.TarError as error:
            raise ValueError(f"{path}: unreadable tar: {error}") from None

    def to_bytes(self, sha256: str) -> bytes:
        width = max(self.keys.dtype.itemsize, 1)
        keys = self.keys.astype(f"S{width}")
        return (_HEADER.pack(MAGIC, len(self), width, bytes.fromhex(sha256))
                + self.starts.astype("<i8").tobytes() + keys.tobytes())

    def save(self, path: Path, sha256: str) -> None:
        atomic_write_bytes(path, self.to_bytes(sha256))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "index") -> tuple[TarIndex, str]:
        """The index and the sha256 of the shard it describes; ValueError for anything malformed."""
        if len(data) < _HEADER.size:
            raise ValueError(f"{source}: not a tar index (too short)")
        magic, count, width, digest = _HEADER.unpack_from(data)
        expected = _HEADER.size + 8 * (count + 1) + width * count
        if magic != MAGIC or len(data) != expected:
            raise ValueError(f"{source}: not a tar index of this format ({len(data)} bytes, expected {expected})")
        starts = np.frombuffer(data, "<i8", count + 1, _HEADER.size)
        keys = np.frombuffer(data, f"S{width}", count, _HEADER.size + 8 * (count + 1))
        return cls(keys, starts), digest.hex()

    @classmethod
    def load(cls, path: Path, sha256: str) -> TarIndex | None:
        """The index at ``path`` if it exists and describes the shard with this sha256 (else ``None``: the
        shard was rewritten since, or never had one)."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        index, digest = cls.from_bytes(data, str(path))
        return index if not sha256 or digest == sha256 else None

    @classmethod
    def for_shard(cls, path: Path, sha256: str, cache_dir: Path | None = None) -> TarIndex:
        """The shard's own index; else one from ``cache_dir/<sha256>.idx``; else a header scan (kept there)."""
        index = cls.load(index_path(path), sha256)
        if index is not None:
            return index
        if cache_dir is None or not sha256:
            return cls.scan(path)
        cache_file = Path(cache_dir) / f"{sha256}{INDEX_SUFFIX}"
        index = cls.load(cache_file, sha256)
        if index is None:
            index = cls.scan(path)
            index.save(cache_file, sha256)
        return index


def _headers_by_pread(path: Path):
    """The regular members of a tar file from one ``pread`` per header (the data blocks are never read)."""
    with open(path, "rb") as stream:
        fd = stream.fileno()
        yield from _walk_headers(lambda offset: os.pread(fd, BLOCK, offset))


class HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through (for ``tarfile``: write, tell)."""

    def __init__(self, handle: io.BufferedWriter):
        self._handle = handle
        self._digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.bytes += len(data)
        return self._handle.write(data)

    def tell(self) -> int:
        return self._handle.tell()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
