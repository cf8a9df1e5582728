"""File helpers that keep the run directory consistent when a process dies at any moment."""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_module
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def umask_file_mode() -> int:
    """The mode a normal ``open(path, "w")`` would give a new file under the current umask (0644 under 022).

    ``tempfile.mkstemp`` creates its files 0600 whatever the umask (and some writers keep that mode), so a file
    written through a temporary name would stay private on shared storage: colleagues, evaluation accounts and
    downstream teams could not read shards, manifests or exports.
    """
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer that takes a file name: renamed over ``path`` when the
    block ends, removed when it raises, so ``path`` is always either the old file or the whole new one. The
    file gets the mode the user's umask gives a normal new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file written beside ``path``, fsynced and renamed over it when the block ends."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def canonical_json(obj: Any) -> str:
    """The one serialisation hashed for config and fingerprint comparisons."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_path(path: Path, max_depth: int = 2) -> str:
    """A cheap fingerprint of an external input: names, sizes and mtimes down to ``max_depth`` levels.

    Hashing every byte of ImageNet on each ``kope run`` would take minutes; folder mtimes change when
    entries are added or removed, which is what re-organising a dataset does. Files are compared by size
    and modification time. One ``os.scandir`` pass with one ``stat`` per entry (links followed, as for the
    top path): on a network file system every extra ``stat`` of 1.3 M entries costs minutes. A dangling link
    is recorded by the link's own time instead of failing.
    """
    path = Path(path)
    try:
        top = path.stat()
    except FileNotFoundError:
        return "missing"
    entries = [_fingerprint_entry(".", top)]
    if stat_module.S_ISDIR(top.st_mode) and max_depth > 0:
        _fingerprint_folder(os.fspath(path), "", 1, max_depth, entries)
    # names that are not valid UTF-8 (surrogate-escaped by os) hash as their bytes instead of failing
    return hashlib.sha256("\n".join(entries).encode("utf-8", "surrogateescape")).hexdigest()


def _fingerprint_entry(relative: str, stat: os.stat_result) -> str:
    size = stat.st_size if stat_module.S_ISREG(stat.st_mode) else "d"
    return f"{relative}|{size}|{stat.st_mtime_ns}"


def _fingerprint_folder(folder: str, prefix: str, depth: int, max_depth: int, entries: list[str]) -> None:
    with os.scandir(folder) as listing:
        children = sorted(listing, key=lambda entry: entry.name)
    for entry in children:
        relative = f"{prefix}{entry.name}"
        try:
            stat = entry.stat()
        except FileNotFoundError:  # a link whose target is gone
            entries.append(f"{relative}|link|{entry.stat(follow_symlinks=False).st_mtime_ns}")
            continue
        entries.append(_fingerprint_entry(relative, stat))
        if stat_module.S_ISDIR(stat.st_mode) and depth < max_depth:
            _fingerprint_folder(entry.path, f"{relative}/", depth + 1, max_depth, entries)
