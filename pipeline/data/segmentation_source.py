"""An ADE20K-style segmentation tree as shard jobs: pair each image with its annotation, check the pair, order
it with a seed, cut it into shards of ``<key>.jpg`` + ``<key>.seg.png`` + ``<key>.json``.

Layout (ADEChallengeData2016): ``images/<split>/<name>.jpg`` and ``annotations/<split>/<name>.png``, paired by
file stem. An annotation is a single-channel PNG (mode ``L``, or ``P`` whose indices are the classes) of the
image's size. With ``reduce_zero_label`` (mmsegmentation's ADE20K convention) the annotation's 0 means "other"
and is ignored, class ``c`` is stored as ``c - 1``; without it values are stored as given. Either way the
stored mask holds class indices ``0..num_classes-1`` and 255 for pixels to ignore, so readers need no
convention of their own.

A pair that cannot be used is counted under its reason and left out: an image without an annotation
(``missing_mask``), an annotation without an image (``orphan_mask``), an annotation that is not a PNG or does
not decode (``corrupt_mask``), one that is not single-channel (``unsupported_mask``, e.g. the full ADE20K
release's RGB-coded masks), a size that differs from the image's (``mask_size_mismatch``), values that are no
class (``label_out_of_range``), and every reason an image has (:mod:`pipeline.data.images`).

The order is a keyed hash of (seed, split, stem), a fixed function of the inputs; the mask bytes are a pure
function of the annotation, so shard ``i`` is byte-identical on a re-run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.fsutil import canonical_json, sha256_text
from pipeline.data.imagenet_source import SourceError, cut, readable_name
from pipeline.data.images import BadImage, ImageOptions, prepare_image
from pipeline.data.manifest import ClassInfo
from pipeline.data.reasons import (
    CORRUPT_MASK,
    DANGLING_LINK,
    LABEL_OUT_OF_RANGE,
    MASK_SIZE_MISMATCH,
    MISSING_MASK,
    NAME_NOT_UTF8,
    NOT_A_REGULAR_FILE,
    ORPHAN_MASK,
    UNREADABLE_FILE,
    UNSUPPORTED_MASK,
)
from pipeline.data.shard_writer import Sample, Skip, key_width, sample_key
from pipeline.data.text_files import read_text

IGNORE_INDEX = 255
"""The stored mask value of pixels that belong to no class (mmseg's ``ignore_index``)."""
NAME_FILES = ("objectInfo150.csv", "objectInfo150.txt", "classes.txt")
MASK_MODES = ("L", "P")
JOB_VERSION = 1


@dataclass(frozen=True)
class Pair:
    """An image and its annotation by file stem (names as the file system spells them; '' when absent)."""

    stem: str
    image: str = ""
    mask: str = ""
    problem: str = ""


def read_segmentation_classes(root: Path, names_file: Path | None, num_classes: int) -> list[ClassInfo]:
    """``num_classes`` classes named from ``names_file`` (or one found in ``root``), else ``class_<i>``.

    A names file is either ADE20K's ``objectInfo150`` table (a header with ``Idx`` and ``Name``, comma or tab
    separated, rows in class order) or one name per line; its count must be ``num_classes``.
    """
    names_file = names_file or next((Path(root) / n for n in NAME_FILES if (Path(root) / n).is_file()), None)
    if names_file is None:
        names = [f"class_{index}" for index in range(num_classes)]
    else:
        names = _read_names(Path(names_file))
        if len(names) != num_classes:
            raise SourceError(f"{names_file}: {len(names)} class names, but num_classes is {num_classes}")
    return [ClassInfo(index, name.split(",")[0].strip() or f"class_{index}", name) for index, name in
            enumerate(names)]


def _read_names(path: Path) -> list[str]:
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise SourceError(f"{path}: no class names")
    delimiter = "\t" if "\t" in lines[0] else ","
    header = [cell.strip() for cell in lines[0].split(delimiter)]
    if "Name" not in header or "Idx" not in header:
        return [line.strip() for line in lines]
    rows = list(csv.reader(io.StringIO("\n".join(lines[1:])), delimiter=delimiter))
    name_at, index_at = header.index("Name"), header.index("Idx")
    for number, row in enumerate(rows, start=2):
        if len(row) <= max(name_at, index_at) or row[index_at].strip() != str(number - 1):
            raise SourceError(f"{path}: line {number}: expected class {number - 1} with a name, got {row!r}")
    return [row[name_at].strip() for row in rows]


def list_pairs(root: Path, split: str) -> list[Pair]:
    """Every entry of ``images/<split>`` and ``annotations/<split>``, paired by stem or with its problem."""
    images, image_problems = _files(Path(root) / "images" / split)
    masks, mask_problems = _files(Path(root) / "annotations" / split)
    pairs = [Pair(Path(name).stem, image=name, problem=problem) for name, problem in image_problems]
    pairs += [Pair(Path(name).stem, mask=name, problem=problem) for name, problem in mask_problems]
    by_stem = {Path(name).stem: name for name in masks}
    for name in images:
        mask = by_stem.pop(Path(name).stem, "")
        pairs.append(Pair(Path(name).stem, name, mask, "" if mask else MISSING_MASK))
    pairs += [Pair(stem, mask=name, problem=ORPHAN_MASK) for stem, name in by_stem.items()]
    return sorted(pairs, key=lambda pair: (pair.stem, pair.image, pair.mask))


def _files(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(regular file names, (name, problem) of the other entries) of a flat folder; hidden entries ignored."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: split folder not found")
    names, problems = [], []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                names.append(entry.name)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                problems.append((entry.name, DANGLING_LINK))
            else:
                problems.append((entry.name, NOT_A_REGULAR_FILE))
    return names, problems


def shuffled(pairs: list[Pair], seed: int, split: str) -> list[Pair]:
    """``pairs`` in the order of a keyed hash of (seed, split, stem and names)."""
    def order(pair: Pair) -> bytes:
        text = f"{seed}\0{split}\0{pair.stem}\0{pair.image}\0{pair.mask}"
        return hashlib.blake2b(os.fsencode(text), digest_size=16).digest()

    return sorted(pairs, key=order)


def stored_mask(data: bytes, size: tuple[int, int], num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """The class-index mask to store (uint8, 255 = ignore) from an annotation's bytes; ``BadImage`` with the
    reason when it cannot be one for an image of ``size`` (width, height)."""
    if not data:
        raise BadImage(CORRUPT_MASK, "empty file")
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except Exception as exc:  # PIL raises many types for broken files
        raise BadImage(CORRUPT_MASK, f"{type(exc).__name__}: {exc}") from None
    if mask.format != "PNG":
        raise BadImage(CORRUPT_MASK, f"a {mask.format} file, not a PNG")
    if mask.mode not in MASK_MODES:
        raise BadImage(UNSUPPORTED_MASK, f"mode {mask.mode}: expected a single-channel PNG of class indices")
    if mask.size != size:
        raise BadImage(MASK_SIZE_MISMATCH, f"mask {mask.size[0]}x{mask.size[1]}, image {size[0]}x{size[1]}")
    values = np.asarray(mask, dtype=np.uint8)
    highest = num_classes if reduce_zero_label else num_classes - 1
    bad = np.unique(values[(values > highest) & (values != IGNORE_INDEX)])
    if bad.size:
        raise BadImage(LABEL_OUT_OF_RANGE, f"values {bad[:5].tolist()} (classes 0..{highest}, ignore 255)")
    if not reduce_zero_label:
        return values
    reduced = values.astype(np.int16) - 1
    reduced[(values == 0) | (values == IGNORE_INDEX)] = IGNORE_INDEX
    return reduced.astype(np.uint8)


def png_bytes(mask: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(mask, "L").save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class SegmentationShardJob:
    """One shard of a segmentation split: which pairs, in which order, stored how."""

    index: int
    root: str
    split: str
    pairs: tuple[Pair, ...]
    key_width: int
    image: ImageOptions
    num_classes: int
    reduce_zero_label: bool
    source: str
    kind: str = "segmentation"

    def fingerprint(self) -> str:
        return sha256_text(canonical_json([JOB_VERSION, self.index, self.split, [asdict(p) for p in self.pairs],
                                           self.key_width, asdict(self.image), self.num_classes,
                                           self.reduce_zero_label, self.source]))

    def items(self) -> Iterator[Sample | Skip]:
        for position, pair in enumerate(self.pairs):
            image, mask = (f"{folder}/{self.split}/{readable_name(name)}" for folder, name in
                           (("images", pair.image), ("annotations", pair.mask)))
            if pair.problem:
                yield Skip(pair.problem, image if pair.image else mask)
                continue
            try:
                yield self._sample(position, pair)
            except OSError as exc:
                yield Skip(UNREADABLE_FILE, f"{image} or {mask}", str(exc))
            except BadImage as exc:
                yield Skip(exc.reason, mask if exc.reason in MASK_REASONS else image, exc.detail)

    def _sample(self, position: int, pair: Pair) -> Sample:
        root = Path(self.root)
        image = prepare_image((root / "images" / self.split / pair.image).read_bytes(), self.image)
        mask = stored_mask((root / "annotations" / self.split / pair.mask).read_bytes(),
                           (image.original_width, image.original_height), self.num_classes, self.reduce_zero_label)
        path, mask_path = (f"{self.split}/{readable_name(name)}" for name in (pair.image, pair.mask))
        present = np.unique(mask)
        meta = {"source": self.source, "path": f"images/{path}", "mask_path": f"annotations/{mask_path}",
                "classes": present[present != IGNORE_INDEX].tolist()}
        renamed = None
        if readable_name(pair.image) != pair.image or readable_name(pair.mask) != pair.mask:
            meta["path_escaped"] = True
            renamed = NAME_NOT_UTF8
        return Sample(sample_key(self.index, position, self.key_width), image.data, png_bytes(mask),
                      uid=readable_name(pair.stem), width=image.width, height=image.height, meta=meta,
                      converted_from=image.converted_from, renamed=renamed)


MASK_REASONS = frozenset({CORRUPT_MASK, UNSUPPORTED_MASK, MASK_SIZE_MISMATCH, LABEL_OUT_OF_RANGE})


@dataclass
class SegmentationPlan:
    """A split's pairs in shard order and the shard boundaries."""

    root: str
    split: str
    pairs: list[Pair]
    bounds: list[tuple[int, int]]
    image: ImageOptions
    num_classes: int
    reduce_zero_label: bool
    source: str
    key_width: int
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    def job(self, index: int) -> SegmentationShardJob:
        start, end = self.bounds[index]
        return SegmentationShardJob(index, self.root, self.split, tuple(self.pairs[start:end]), self.key_width,
                                    self.image, self.num_classes, self.reduce_zero_label, self.source)


def plan_segmentation_split(root: Path, split: str, *, seed: int, samples_per_shard: int, image: ImageOptions,
                            num_classes: int, reduce_zero_label: bool, source: str) -> SegmentationPlan:
    pairs = shuffled(list_pairs(root, split), seed, split)
    bounds = cut(pairs, samples_per_shard)  # type: ignore[arg-type]
    width = key_width(max((end - start for start, end in bounds), default=1))
    return SegmentationPlan(str(root), split, pairs, bounds, image, num_classes, reduce_zero_label, source, width)
