"""An ImageNet-style tree as shard jobs: list each split, label it, order it with a seed, cut it into shards.

Layout: ``train/<wnid>/*`` and, per split, either class folders or a flat folder with a label file (the
ILSVRC2012 ground-truth list with the devkit's synsets, Kaggle's ``LOC_val_solution.csv``, or ``file wnid``
lines). Class indices follow the sorted class folders (torchvision's ``ImageFolder`` order, which every
ImageNet checkpoint uses). Every non-hidden file is listed, so a stray or broken file is counted when its
shard is written rather than silently ignored; a file that cannot be labelled is counted too.

The order is a keyed hash of (seed, split, path): a fixed function of the inputs that mixes classes in every
shard and does not depend on any library's random number stream.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import canonical_json, sha256_text
from pipeline.data.images import BadImage, ImageOptions, prepare_image
from pipeline.data.manifest import ClassInfo
from pipeline.data.shard_writer import Sample, Skip, key_width, sample_key

NAME_FILES = ("classes.tsv", "LOC_synset_mapping.txt", "words.txt")
MISSING_LABEL = "missing_label"
UNKNOWN_CLASS = "unknown_class"
UNREADABLE_FILE = "unreadable_file"
JOB_VERSION = 1


class SourceError(KopeError):
    """The source tree or a label file is unusable as a whole (not one bad sample)."""


@dataclass(frozen=True)
class SourceFile:
    """A listed file: path relative to the root, its class, or the reason it cannot be labelled."""

    path: str
    label: int = -1
    wnid: str = ""
    problem: str = ""
    size: int = 0


def read_classes(root: Path, names_file: Path | None = None) -> list[ClassInfo]:
    """Classes from ``root/train``'s folders (else from the names file), named from the names file."""
    root = Path(root)
    names_file = names_file or next((root / n for n in NAME_FILES if (root / n).is_file()), None)
    names = read_class_names(names_file) if names_file else {}
    train = root / "train"
    if train.is_dir():
        wnids = sorted(entry.name for entry in os.scandir(train) if entry.is_dir() and not entry.name.startswith("."))
    else:
        wnids = sorted(names)
    if not wnids:
        raise SourceError(f"{root}: no classes: expected train/<wnid>/ folders or a class names file")
    if names_file and names_file.name == "classes.tsv":
        _check_tsv_indices(names_file, wnids)
    return [ClassInfo(index, wnid, names.get(wnid, wnid)) for index, wnid in enumerate(wnids)]


def read_class_names(path: Path) -> dict[str, str]:
    """wnid -> name from ``classes.tsv`` (index, wnid, name), ``LOC_synset_mapping.txt`` or ``words.txt``."""
    names = {}
    for number, line in _lines(path):
        fields = line.split("\t")
        if len(fields) == 3 and fields[0].strip().isdigit():
            wnid, name = fields[1].strip(), fields[2].strip()
        else:
            wnid, _, name = line.replace("\t", " ").partition(" ")
        if not wnid.startswith("n"):
            raise SourceError(f"{path}: line {number}: expected a wnid such as n01440764, got {wnid!r}")
        names[wnid] = name.strip() or wnid
    return names


def read_val_labels(path: Path, synsets: Path | None = None) -> dict[str, str]:
    """File stem -> wnid for a flat split, from any of the three label file formats."""
    path = Path(path)
    if path.suffix == ".csv":
        return _read_loc_solution(path)
    lines = list(_lines(path))
    if lines and all(line.strip().isdigit() for _, line in lines):
        if synsets is None:
            raise SourceError(f"{path}: ILSVRC2012 class ids need val_synsets (the devkit's meta.mat or a wnid list)")
        ids = _read_synset_ids(Path(synsets))
        labels = {}
        for position, (number, line) in enumerate(lines, start=1):
            if int(line) not in ids:
                raise SourceError(f"{path}: line {number}: class id {line} not in {synsets}")
            labels[f"ILSVRC2012_val_{position:08d}"] = ids[int(line)]
        return labels
    labels = {}
    for number, line in lines:
        fields = line.replace(",", " ").split()
        if len(fields) != 2:
            raise SourceError(f"{path}: line {number}: expected 'file wnid', got {line!r}")
        labels[Path(fields[0]).stem] = fields[1]
    return labels


def list_split(root: Path, split: str, classes: list[ClassInfo], labels: dict[str, str] | None = None,
               with_sizes: bool = False) -> list[SourceFile]:
    """Every file of ``root/split``, labelled, sorted by path."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise SourceError(f"{folder}: split folder not found")
    index = {info.wnid: info.index for info in classes}
    entries = sorted(_visible(folder), key=lambda entry: entry.name)
    class_dirs = [entry for entry in entries if entry.is_dir()]
    files: list[SourceFile] = []
    if class_dirs:
        for directory in class_dirs:
            wnid = directory.name
            for entry in sorted(_visible(Path(directory.path)), key=lambda e: e.name):
                if entry.is_file():
                    files.append(_labelled(f"{split}/{wnid}/{entry.name}", wnid, index, entry, with_sizes))
        files.extend(SourceFile(f"{split}/{entry.name}", problem=MISSING_LABEL)
                     for entry in entries if entry.is_file())
    else:
        if labels is None:
            raise SourceError(f"{folder}: flat split folder (no class folders): set val_labels to its label file")
        for entry in entries:
            if entry.is_file():
                wnid = labels.get(Path(entry.name).stem, "")
                files.append(_labelled(f"{split}/{entry.name}", wnid, index, entry, with_sizes))
    return sorted(files, key=lambda item: item.path)


def shuffled(files: list[SourceFile], seed: int, split: str) -> list[SourceFile]:
    """``files`` in the order of a keyed hash of (seed, split, path)."""
    def order(item: SourceFile) -> bytes:
        return hashlib.blake2b(f"{seed}\0{split}\0{item.path}".encode(), digest_size=16).digest()

    return sorted(files, key=order)


def cut(files: list[SourceFile], samples_per_shard: int, shard_bytes: int = 0) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive files: ``samples_per_shard`` each, or up to ``shard_bytes`` of
    source bytes each when that is set (a file larger than the limit gets a shard of its own)."""
    if not shard_bytes:
        return [(start, min(start + samples_per_shard, len(files)))
                for start in range(0, len(files), samples_per_shard)]
    bounds, start, total = [], 0, 0
    for position, item in enumerate(files):
        if position > start and total + item.size > shard_bytes:
            bounds.append((start, position))
            start, total = position, 0
        total += item.size
    if start < len(files):
        bounds.append((start, len(files)))
    return bounds


@dataclass(frozen=True)
class ImageNetShardJob:
    """One shard of an ImageNet split: which files, in which order, stored how."""

    index: int
    root: str
    files: tuple[SourceFile, ...]
    key_width: int
    image: ImageOptions
    source: str
    kind: str = "classification"

    def fingerprint(self) -> str:
        files = [(item.path, item.label, item.wnid, item.problem) for item in self.files]
        return sha256_text(canonical_json([JOB_VERSION, self.index, files, self.key_width, asdict(self.image),
                                           self.source]))

    def items(self) -> Iterator[Sample | Skip]:
        for position, item in enumerate(self.files):
            if item.problem:
                yield Skip(item.problem, item.path, item.wnid)
                continue
            try:
                data = (Path(self.root) / item.path).read_bytes()
                image = prepare_image(data, self.image)
            except OSError as exc:
                yield Skip(UNREADABLE_FILE, item.path, str(exc))
                continue
            except BadImage as exc:
                yield Skip(exc.reason, item.path, exc.detail)
                continue
            meta = {"source": self.source, "wnid": item.wnid, "path": item.path}
            if (image.width, image.height) != (image.original_width, image.original_height):
                meta.update(original_width=image.original_width, original_height=image.original_height)
            yield Sample(sample_key(self.index, position, self.key_width), image.data, item.label,
                         uid=Path(item.path).stem, width=image.width, height=image.height, meta=meta,
                         converted_from=image.converted_from)


@dataclass
class ImageNetPlan:
    """A split's files in shard order and the shard boundaries."""

    root: str
    files: list[SourceFile]
    bounds: list[tuple[int, int]]
    image: ImageOptions
    source: str
    key_width: int
    skipped: Counter = field(default_factory=Counter)
    skipped_samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    def job(self, index: int) -> ImageNetShardJob:
        start, end = self.bounds[index]
        return ImageNetShardJob(index, self.root, tuple(self.files[start:end]), self.key_width, self.image,
                                self.source)


def plan_split(root: Path, split: str, classes: list[ClassInfo], *, seed: int, samples_per_shard: int,
               image: ImageOptions, shard_bytes: int = 0, source: str = "imagenet",
               labels: dict[str, str] | None = None) -> ImageNetPlan:
    files = shuffled(list_split(root, split, classes, labels, with_sizes=bool(shard_bytes)), seed, split)
    bounds = cut(files, samples_per_shard, shard_bytes)
    width = key_width(max((end - start for start, end in bounds), default=1))
    return ImageNetPlan(str(root), files, bounds, image, source, width)


def _labelled(path: str, wnid: str, index: dict[str, int], entry: os.DirEntry, with_sizes: bool) -> SourceFile:
    size = entry.stat().st_size if with_sizes else 0
    if not wnid:
        return SourceFile(path, problem=MISSING_LABEL, size=size)
    if wnid not in index:
        return SourceFile(path, wnid=wnid, problem=UNKNOWN_CLASS, size=size)
    return SourceFile(path, index[wnid], wnid, size=size)


def _visible(folder: Path) -> Iterator[os.DirEntry]:
    with os.scandir(folder) as entries:
        yield from (entry for entry in entries if not entry.name.startswith("."))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-empty lines with their 1-based numbers; a missing or undecodable file raises SourceError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line.rstrip("\n")


def _check_tsv_indices(path: Path, wnids: list[str]) -> None:
    """A ``classes.tsv`` that numbers classes differently from the sorted folders would mislabel everything."""
    position = {wnid: i for i, wnid in enumerate(wnids)}
    for number, line in _lines(path):
        fields = line.split("\t")
        if len(fields) == 3 and fields[0].strip().isdigit() and fields[1].strip() in position:
            if int(fields[0]) != position[fields[1].strip()]:
                raise SourceError(f"{path}: line {number}: index {fields[0]} for {fields[1]}, but the sorted "
                                  f"class folders give {position[fields[1].strip()]}")


def _read_loc_solution(path: Path) -> dict[str, str]:
    labels = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                prediction = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not prediction:
                    raise SourceError(f"{path}: line {number}: expected ImageId,PredictionString")
                labels[row["ImageId"]] = prediction[0]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from None
    return labels


def _read_synset_ids(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's ``meta.mat`` or a list of wnids in id order."""
    if path.suffix == ".mat":
        from scipy.io import loadmat

        try:
            synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        except (OSError, ValueError, KeyError) as exc:
            raise SourceError(f"{path}: not a devkit meta.mat with 'synsets': {exc}") from None
        return {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets}
    return {position: line.split()[0] for position, (_, line) in enumerate(_lines(path), start=1)}
