"""``SHA256SUMS`` in the format ``sha256sum -c`` checks: one ``<hex>  <name>`` line per file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_write_text, sha256_file

SUMS_FILE = "SHA256SUMS"


def write_checksums(directory: Path, files: Iterable[Path]) -> dict[str, str]:
    """Hash ``files`` (inside ``directory``) and write ``directory/SHA256SUMS``; returns name -> sha256."""
    directory = Path(directory)
    sums = {str(Path(path).relative_to(directory)): sha256_file(path) for path in sorted(files)}
    atomic_write_text(directory / SUMS_FILE, "".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def read_checksums(directory: Path) -> dict[str, str]:
    path = Path(directory) / SUMS_FILE
    if not path.is_file():
        raise KopeError(f"{path}: missing")
    sums = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise KopeError(f"{path}: line {number} is not '<sha256>  <file>'")
        sums[name] = digest
    return sums


def verify_checksums(directory: Path) -> None:
    """Raise KopeError naming the first file whose content no longer matches ``SHA256SUMS``."""
    directory = Path(directory)
    for name, digest in read_checksums(directory).items():
        path = directory / name
        if not path.is_file():
            raise KopeError(f"{path}: listed in {SUMS_FILE} but missing")
        if sha256_file(path) != digest:
            raise KopeError(f"{path}: sha256 differs from {SUMS_FILE} (file changed or corrupted)")
