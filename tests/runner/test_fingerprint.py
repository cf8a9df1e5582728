"""The input fingerprint: names, sizes and mtimes down to two levels, one stat per entry, never failing on a
dangling link."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.core.fsutil import fingerprint_path


def spelled_out(root: Path, max_depth: int = 2) -> str:
    """The fingerprint's definition, entry by entry, with os.stat (links followed)."""
    lines = []

    def visit(path: Path, relative: str, depth: int) -> None:
        stat = os.stat(path)
        lines.append(f"{relative}|{stat.st_size if path.is_file() else 'd'}|{stat.st_mtime_ns}")
        if path.is_dir() and depth < max_depth:
            for name in sorted(os.listdir(path)):
                visit(path / name, name if relative == "." else f"{relative}/{name}", depth + 1)

    visit(root, ".", 0)
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def tree(root: Path) -> Path:
    for wnid in ("n01", "n02"):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"{i}.JPEG").write_bytes(b"x" * (i + 1))
        (folder / "deeper").mkdir()
        (folder / "deeper" / "ignored.JPEG").write_bytes(b"below two levels")
    (root / "val").mkdir()
    (root / "labels.txt").write_text("a\n")
    (root / "train" / "linked").symlink_to(root / "val")
    return root


def test_names_sizes_and_mtimes_to_two_levels(tmp_path):
    root = tree(tmp_path / "data")
    assert fingerprint_path(root) == spelled_out(root)
    for depth in (0, 1, 3):
        assert fingerprint_path(root, depth) == spelled_out(root, depth)
    assert fingerprint_path(root / "labels.txt") == spelled_out(root / "labels.txt")
    assert fingerprint_path(tmp_path / "absent") == "missing"


def test_changes_below_two_levels_are_not_seen_and_above_are(tmp_path):
    root = tree(tmp_path / "data")
    before = fingerprint_path(root)
    (root / "train" / "n01" / "deeper" / "ignored.JPEG").write_bytes(b"changed below two levels")
    assert fingerprint_path(root) == before
    (root / "train" / "n03").mkdir()
    assert fingerprint_path(root) != before


def test_a_dangling_link_is_an_entry_not_an_error(tmp_path):
    root = tree(tmp_path / "data")
    before = fingerprint_path(root)
    (root / "train" / "gone").symlink_to(tmp_path / "nowhere")
    assert fingerprint_path(root) != before
