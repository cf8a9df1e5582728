"""File helpers that keep the run directory consistent when a process dies at any moment."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    and modification time.
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    entries: list[str] = []

    def visit(current: Path, depth: int) -> None:
        stat = current.stat()
        entries.append(f"{current.relative_to(path)}|{stat.st_size if current.is_file() else 'd'}|"
                       f"{stat.st_mtime_ns}")
        if current.is_dir() and depth < max_depth:
            for child in sorted(current.iterdir()):
                visit(child, depth + 1)

    visit(path, 0)
    return sha256_text("\n".join(entries))
