"""Input shards made by other tools, read as webdataset groups them: consecutive members with the same key
(the file name up to its first dot) form one sample.

Two things Python's ``tarfile`` lets pass silently are refused or counted here:

* A tar must end with its end-of-archive marker (a zero block). ``tarfile`` stops quietly at the end of the
  file, or at a header it cannot parse, so a shard cut at a member boundary (a copy or download that
  stopped) would lose its tail unnoticed; such a shard fails with :class:`BadShardError` naming it.
* A key that comes back after other keys, or a member extension repeated within one sample, starts a later
  sample with a key already seen: it is yielded with ``duplicate=True`` so the caller counts and drops it
  instead of merging two samples into one.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import KopeError

BLOCK = 512


class BadShardError(KopeError):
    """An input shard (or its parquet) that cannot be read; fails the stage with the shard's name."""


@dataclass
class TarSample:
    key: str
    parts: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes, for the members read
    duplicate: bool = False  # an earlier sample of this tar has the same key


def member_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as img2dataset writes them (the folder part is ignored)."""
    key, _, extension = name.rpartition("/")[2].partition(".")
    return key, extension


def tar_samples(path: Path, wanted: Callable[[str, str], bool]) -> Iterator[TarSample]:
    """The samples of ``path`` in tar order, with the members for which ``wanted(key, extension)`` holds."""
    path = Path(path)
    seen: set[str] = set()
    current: TarSample | None = None
    extensions: set[str] = set()
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = member_key(member.name)
                if current is None or key != current.key or extension in extensions:
                    if current is not None:
                        yield current
                    current, extensions = TarSample(key, duplicate=key in seen), set()
                    seen.add(key)
                extensions.add(extension)
                if wanted(key, extension):
                    current.parts[extension] = archive.extractfile(member).read()
            end = archive.offset
            handle.seek(end)
            marker = handle.read(BLOCK)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadShardError(f"{path}: unreadable shard: {exc}") from None
    if len(marker) < BLOCK:
        raise BadShardError(f"{path}: truncated shard: it ends at byte {end} without the tar end-of-archive marker")
    if marker.count(0) != BLOCK:
        raise BadShardError(f"{path}: unreadable shard: no valid tar header at byte {end}")
    if current is not None:
        yield current
