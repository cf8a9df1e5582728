"""An ImageNet-style tree as shard jobs: list each split, label it, order it with a seed, cut it into shards.

Layout: ``train/<wnid>/*`` and, per split, either class folders or a flat folder with a label file (the
ILSVRC2012 ground-truth list with the devkit's synsets, Kaggle's ``LOC_val_solution.csv``, or ``file wnid``
lines). Class indices follow the sorted class folders (torchvision's ``ImageFolder`` order, which every
ImageNet checkpoint uses).

Every entry is accounted for, so nothing is lost silently: files in sub-folders of a class folder belong to
that class (as in ``ImageFolder``, which walks class folders recursively and follows folder links; a link
back to a parent folder is counted once as ``directory_loop`` instead of being followed forever); a
dangling link, a FIFO or device, an unreadable folder, a file outside any class folder or without a label
are counted under their reasons; a stray or broken file is counted when its shard is written. Only hidden
entries (names starting with ``.``: ``.DS_Store``, editor and tool folders) are not inputs and are ignored.

A file name that is not valid UTF-8 (a latin-1 name from an old archive) is kept: the file is read by its
real name, and the sample's ``path`` records it with each undecodable byte written as ``\\xNN``, with
``path_escaped: true``; the manifest counts it under ``renamed`` (``name_not_utf8``). Skipping such a file
would lose a good image over its name; the sample key is ours anyway.

Label lists whose line number is the image number (the ILSVRC2012 ground truth, a wnid list in class-id
order) must have exactly one non-blank line per image: a blank or malformed line, or a line count that does
not match the highest-numbered image, is an error naming the file and line, never a silent shift of every
later label. Text inputs may start with a byte order mark.

The order is a keyed hash of (seed, split, path): a fixed function of the inputs that mixes classes in every
shard and does not depend on any library's random number stream.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import canonical_json, sha256_text
from pipeline.data.images import BadImage, ImageOptions, prepare_image
from pipeline.data.manifest import ClassInfo
from pipeline.data.reasons import (
    DANGLING_LINK,
    DIRECTORY_LOOP,
    MISSING_LABEL,
    NAME_NOT_UTF8,
    NOT_A_REGULAR_FILE,
    UNKNOWN_CLASS,
    UNREADABLE_DIRECTORY,
    UNREADABLE_FILE,
)
from pipeline.data.shard_writer import Sample, Skip, key_width, sample_key
from pipeline.data.text_files import read_text

NAME_FILES = ("classes.tsv", "LOC_synset_mapping.txt", "words.txt")
VAL_IMAGE = re.compile(r"^ILSVRC2012_val_(\d{8})$")
JOB_VERSION = 2


class SourceError(KopeError):
    """The source tree or a label file is unusable as a whole (not one bad sample)."""


@dataclass(frozen=True)
class SourceFile:
    """A listed entry: path relative to the root (valid UTF-8), its class, or the reason it cannot be used;
    ``fs_path`` is the path as the file system spells it, when that is not valid UTF-8."""

    path: str
    label: int = -1
    wnid: str = ""
    problem: str = ""
    size: int = 0
    fs_path: str = ""


@dataclass(frozen=True)
class LabelList:
    """A flat split's labels: file stem -> wnid; ``numbered`` > 0 when line n labels image number n."""

    labels: dict[str, str]
    path: str
    numbered: int = 0


def readable_name(name: str) -> str:
    """``name`` itself if it is valid UTF-8, else with its undecodable bytes written as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def read_classes(root: Path, names_file: Path | None = None) -> list[ClassInfo]:
    """Classes from ``root/train``'s folders (else from the names file), named from the names file."""
    root = Path(root)
    names_file = names_file or next((root / n for n in NAME_FILES if (root / n).is_file()), None)
    names = read_class_names(names_file) if names_file else {}
    train = root / "train"
    if train.is_dir():
        wnids = [readable_name(name) for name in sorted(entry.name for entry in _visible(train) if _is_dir(entry))]
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


def read_val_labels(path: Path, synsets: Path | None = None) -> LabelList:
    """A flat split's labels, from any of the three label file formats."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return LabelList(_read_loc_solution(path), str(path))
    lines = read_text(path).splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if _is_number(first):
        if synsets is None:
            raise SourceError(f"{path}: ILSVRC2012 class ids need val_synsets (the devkit's meta.mat or a wnid list)")
        ids = _read_synset_ids(Path(synsets))
        labels = {}
        for number, line in enumerate(_numbered_lines(path, lines), start=1):
            if not _is_number(line):
                raise SourceError(f"{path}: line {number}: expected a class id (a whole number), got {line!r}")
            if int(line) not in ids:
                raise SourceError(f"{path}: line {number}: class id {line} not in {synsets}")
            labels[f"ILSVRC2012_val_{number:08d}"] = ids[int(line)]
        return LabelList(labels, str(path), numbered=len(labels))
    labels = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 2:
            raise SourceError(f"{path}: line {number}: expected 'file wnid', got {line!r}")
        stem, wnid = Path(fields[0]).stem, fields[1]
        if labels.get(stem, wnid) != wnid:
            raise SourceError(f"{path}: line {number}: {fields[0]} labelled {wnid}, but {labels[stem]} earlier")
        labels[stem] = wnid
    return LabelList(labels, str(path))


def list_split(root: Path, split: str, classes: list[ClassInfo], labels: LabelList | None = None,
               with_sizes: bool = False) -> list[SourceFile]:
    """Every entry of ``root/split``, labelled or with its problem, sorted by path."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise SourceError(f"{folder}: split folder not found")
    index = {info.wnid: info.index for info in classes}
    try:
        entries = sorted(_visible(folder), key=lambda entry: entry.name)
    except OSError as exc:
        raise SourceError(f"{folder}: cannot list: {exc.strerror or exc}") from None
    class_dirs = [entry for entry in entries if _is_dir(entry)]
    files: list[SourceFile] = []
    if class_dirs:
        for directory in class_dirs:
            wnid = readable_name(directory.name)
            ancestors = frozenset({_identity(folder), _identity(directory.path)})
            for found in _walk(Path(directory.path), f"{split}/{wnid}", f"{split}/{directory.name}", ancestors,
                               with_sizes):
                files.append(_labelled(found, wnid, index))
        for entry in entries:
            if not _is_dir(entry):
                found = _found(entry, split, split, with_sizes)
                files.append(_labelled(found, "", index))
    else:
        if labels is None:
            raise SourceError(f"{folder}: flat split folder (no class folders): set val_labels to its label file")
        for entry in entries:
            found = _found(entry, split, split, with_sizes)
            files.append(_labelled(found, labels.labels.get(Path(found.path).stem, ""), index))
        if labels.numbered:
            _check_numbered(labels, folder, [Path(entry.name).stem for entry in entries])
    return sorted(files, key=lambda item: item.path)


def shuffled(files: list[SourceFile], seed: int, split: str) -> list[SourceFile]:
    """``files`` in the order of a keyed hash of (seed, split, path as the file system spells it)."""
    def order(item: SourceFile) -> bytes:
        return hashlib.blake2b(f"{seed}\0{split}\0".encode() + os.fsencode(item.fs_path or item.path),
                               digest_size=16).digest()

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
        files = [(item.path, item.label, item.wnid, item.problem, item.fs_path) for item in self.files]
        return sha256_text(canonical_json([JOB_VERSION, self.index, files, self.key_width, asdict(self.image),
                                           self.source]))

    def items(self) -> Iterator[Sample | Skip]:
        for position, item in enumerate(self.files):
            if item.problem:
                yield Skip(item.problem, item.path, item.wnid)
                continue
            try:
                data = (Path(self.root) / (item.fs_path or item.path)).read_bytes()
                image = prepare_image(data, self.image)
            except OSError as exc:
                yield Skip(UNREADABLE_FILE, item.path, str(exc))
                continue
            except BadImage as exc:
                yield Skip(exc.reason, item.path, exc.detail)
                continue
            meta = {"source": self.source, "wnid": item.wnid, "path": item.path}
            if item.fs_path:
                meta["path_escaped"] = True
            if (image.width, image.height) != (image.original_width, image.original_height):
                meta.update(original_width=image.original_width, original_height=image.original_height)
            yield Sample(sample_key(self.index, position, self.key_width), image.data, item.label,
                         uid=Path(item.path).stem, width=image.width, height=image.height, meta=meta,
                         converted_from=image.converted_from, renamed=NAME_NOT_UTF8 if item.fs_path else None)


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
               labels: LabelList | None = None) -> ImageNetPlan:
    files = shuffled(list_split(root, split, classes, labels, with_sizes=bool(shard_bytes)), seed, split)
    bounds = cut(files, samples_per_shard, shard_bytes)
    width = key_width(max((end - start for start, end in bounds), default=1))
    return ImageNetPlan(str(root), files, bounds, image, source, width)




@dataclass(frozen=True)
class _Found:
    """An entry found while listing: its path (valid UTF-8), its path on disk, and its problem if any."""

    path: str
    fs_path: str
    problem: str = ""
    size: int = 0


def _walk(directory: Path, shown: str, on_disk: str, ancestors: frozenset, with_sizes: bool) -> Iterator[_Found]:
    """Every entry under a class folder, recursively, following folder links except back to a parent."""
    try:
        entries = sorted(_visible(directory), key=lambda entry: entry.name)
    except OSError:
        yield _Found(shown, on_disk, UNREADABLE_DIRECTORY)
        return
    for entry in entries:
        path, fs_path = f"{shown}/{readable_name(entry.name)}", f"{on_disk}/{entry.name}"
        if not _is_dir(entry):
            yield _found(entry, shown, on_disk, with_sizes)
        elif (identity := _identity(entry.path)) in ancestors:
            yield _Found(path, fs_path, DIRECTORY_LOOP)
        else:
            yield from _walk(Path(entry.path), path, fs_path, ancestors | {identity}, with_sizes)


def _found(entry: os.DirEntry, shown: str, on_disk: str, with_sizes: bool) -> _Found:
    """A non-folder entry: a file (with its size when asked), or the reason it is not one."""
    path, fs_path = f"{shown}/{readable_name(entry.name)}", f"{on_disk}/{entry.name}"
    try:
        if entry.is_file():
            return _Found(path, fs_path, size=entry.stat().st_size if with_sizes else 0)
        if entry.is_symlink() and not os.path.exists(entry.path):
            return _Found(path, fs_path, DANGLING_LINK)
    except OSError:
        return _Found(path, fs_path, UNREADABLE_FILE)
    return _Found(path, fs_path, NOT_A_REGULAR_FILE)


def _labelled(found: _Found, wnid: str, index: dict[str, int]) -> SourceFile:
    fs_path = found.fs_path if found.fs_path != found.path else ""
    if found.problem:
        return SourceFile(found.path, wnid=wnid, problem=found.problem, fs_path=fs_path)
    if not wnid:
        return SourceFile(found.path, problem=MISSING_LABEL, size=found.size, fs_path=fs_path)
    if wnid not in index:
        return SourceFile(found.path, wnid=wnid, problem=UNKNOWN_CLASS, size=found.size, fs_path=fs_path)
    return SourceFile(found.path, index[wnid], wnid, size=found.size, fs_path=fs_path)


def _check_numbered(labels: LabelList, folder: Path, stems: list[str]) -> None:
    """A list whose line n labels image n must have exactly as many lines as the highest image number."""
    numbers = sorted(int(match.group(1)) for stem in stems if (match := VAL_IMAGE.match(stem)))
    highest = numbers[-1] if numbers else 0
    if highest > labels.numbered:
        raise SourceError(f"{labels.path}: {labels.numbered} lines, but {folder}/ILSVRC2012_val_{highest:08d} needs "
                          f"line {highest}: lines are missing, so the labels after them would be shifted")
    if highest < labels.numbered:
        raise SourceError(f"{labels.path}: line {highest + 1}: labels image {highest + 1}, but the highest-numbered "
                          f"image in {folder} is {highest}: the list does not match the images (an extra line "
                          f"shifts every later label)")


def _visible(folder: Path | str) -> Iterator[os.DirEntry]:
    with os.scandir(folder) as entries:
        yield from (entry for entry in entries if not entry.name.startswith("."))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _identity(path: Path | str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-empty lines with their 1-based numbers (for lists keyed by name, where a blank line means nothing)."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            yield number, line


def _numbered_lines(path: Path, lines: list[str]) -> list[str]:
    """The stripped lines of a list whose line number means something; trailing blank lines are dropped, any
    other blank line is an error (skipping it would shift every later entry)."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise SourceError(f"{path}: line {number}: blank line in a list whose line number is the image or class "
                              f"number: every later entry would be shifted; remove it or fill it in")
    return [line.strip() for line in lines]


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
    labels: dict[str, str] = {}
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{path}: line 1: expected the header ImageId,PredictionString, got "
                              f"{','.join(reader.fieldnames or ())!r}")
        for row in reader:
            prediction = (row.get("PredictionString") or "").split()
            if not row.get("ImageId") or not prediction:
                raise SourceError(f"{path}: line {reader.line_num}: expected ImageId,PredictionString values")
            image, wnid = row["ImageId"], prediction[0]
            if labels.get(image, wnid) != wnid:
                raise SourceError(f"{path}: line {reader.line_num}: {image} labelled {wnid}, but {labels[image]} "
                                  f"earlier")
            labels[image] = wnid
    except csv.Error as exc:
        raise SourceError(f"{path}: line {reader.line_num}: {exc}") from None
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
    lines = _numbered_lines(path, read_text(path).splitlines())
    return {number: line.split()[0] for number, line in enumerate(lines, start=1)}
