"""The one file that describes a sharded dataset: every shard with its sample count, size and sha256, the
class index or caption field, what was skipped, converted or renamed and why, and the settings that made it.

Other readers' files are written from it, so they can never disagree with it: open_clip's ``sizes.json``,
timm's ``_info.json`` and, for classification, ``classes.tsv``. ``manifest.json`` is written last: a
dataset folder without it is unfinished.

timm's wds reader takes a ``root`` folder and a split name, and its scripts default to the names ``train``
and ``validation``. Each dataset folder's ``_info.json`` lists its split under its own name and, for ``val``,
also as ``validation``; :func:`save_timm_splits` writes the sharding stage's folder one ``_info.json`` with
every split (file names relative to that folder), which is the ``root`` timm expects.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_write_json, atomic_write_text

FORMAT = "kope-shards/1"
MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
INFO_FILE = "_info.json"
CLASSES_FILE = "classes.tsv"
INDEX_FILES = (MANIFEST_FILE, SIZES_FILE, INFO_FILE, CLASSES_FILE)  # the manifest and what is written from it
TIMM_SPLIT_NAMES = {"val": "validation"}  # our split folder -> the name timm's scripts use by default
KIND_FIELDS = {
    "classification": {"image": "jpg", "label": "cls"},
    "captions": {"image": "jpg", "caption": "txt"},
    "segmentation": {"image": "jpg", "mask": "seg.png"},
}
LABELLED_KINDS = ("classification", "segmentation")  # kinds whose manifest lists classes
SHARD_NAME = re.compile(r"^\d{6}\.tar$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(KopeError):
    """A manifest that cannot be read or does not describe a valid dataset."""


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass
class Manifest:
    """A dataset folder's description; ``Manifest.load(folder)`` is all a reader needs."""

    name: str
    kind: str
    shards: list[ShardInfo]
    split: str = "train"
    classes: list[ClassInfo] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    renamed: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created_by: str = f"kope {__version__}"

    @property
    def fields(self) -> dict[str, str]:
        return KIND_FIELDS[self.kind]

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def shard_paths(self, directory: Path | str) -> list[Path]:
        return [Path(directory) / shard.name for shard in self.shards]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT, "name": self.name, "kind": self.kind, "split": self.split, "fields": self.fields,
            "num_samples": self.num_samples, "shards": [asdict(shard) for shard in self.shards],
            "skipped": dict(sorted(self.skipped.items())), "converted": dict(sorted(self.converted.items())),
            "renamed": dict(sorted(self.renamed.items())), "config": self.config, "created_by": self.created_by,
        }
        if self.kind in LABELLED_KINDS:
            data["classes"] = [asdict(info) for info in self.classes]
        return data

    def sizes(self) -> dict[str, int]:
        """open_clip's ``sizes.json``: samples per shard file name."""
        return {shard.name: shard.samples for shard in self.shards}

    def timm_split(self, prefix: str = "") -> dict[str, Any]:
        """timm's description of this dataset as one split; ``prefix`` goes before each shard's file name."""
        return {"name": self.split, "num_samples": self.num_samples,
                "filenames": [f"{prefix}{shard.name}" for shard in self.shards],
                "shard_lengths": [shard.samples for shard in self.shards]}

    def timm_info(self) -> dict[str, Any]:
        """timm's ``_info.json`` (read by ``ReaderWds``) with this dataset as its one split."""
        return {"name": self.name, "num_samples": self.num_samples,
                "splits": _split_names(self.split, self.timm_split())}

    def save(self, directory: Path | str) -> Path:
        """Write the derived files, then ``manifest.json`` last, each atomically."""
        directory = Path(directory)
        if self.kind in LABELLED_KINDS:
            lines = "".join(f"{info.index}\t{info.wnid}\t{info.name}\n" for info in self.classes)
            atomic_write_text(directory / CLASSES_FILE, lines)
        atomic_write_json(directory / SIZES_FILE, self.sizes())
        atomic_write_json(directory / INFO_FILE, self.timm_info())
        path = directory / MANIFEST_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: Path | str) -> Manifest:
        """Read a dataset folder's ``manifest.json`` (or the file itself); errors name the file and key."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{path}: no manifest (is the dataset finished?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: unreadable manifest: {exc}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> Manifest:
        check = _Checker(source)
        check.that(isinstance(data, dict), "", "expected a JSON object")
        check.that(data.get("format") == FORMAT, "format", f"expected {FORMAT!r}, got {data.get('format')!r}")
        kind = data.get("kind")
        check.that(kind in KIND_FIELDS, "kind", f"expected one of {sorted(KIND_FIELDS)}, got {kind!r}")
        check.that(data.get("fields") == KIND_FIELDS[kind], "fields", f"expected {KIND_FIELDS[kind]}")
        shards = [check.shard(item, f"shards.{i}") for i, item in enumerate(check.list(data, "shards"))]
        names = [shard.name for shard in shards]
        check.that(len(set(names)) == len(names), "shards", "shard names repeat")
        total = sum(shard.samples for shard in shards)
        check.that(data.get("num_samples") == total, "num_samples",
                   f"{data.get('num_samples')!r} differs from the shards' total {total}")
        classes = []
        if kind in LABELLED_KINDS:
            classes = [check.class_info(item, f"classes.{i}") for i, item in enumerate(check.list(data, "classes"))]
            check.that([info.index for info in classes] == list(range(len(classes))), "classes",
                       "class indices must be 0..n-1 in order")
        return cls(
            name=check.typed(data, "name", str), kind=kind, shards=shards, split=check.typed(data, "split", str),
            classes=classes, skipped=check.counts(data, "skipped"), converted=check.counts(data, "converted"),
            renamed=check.counts(data, "renamed") if "renamed" in data else {},
            config=check.typed(data, "config", dict), created_by=check.typed(data, "created_by", str),
        )


def save_timm_splits(directory: Path | str, name: str, splits: dict[str, Manifest]) -> Path:
    """The ``_info.json`` of a folder holding one dataset folder per split (``splits``: folder -> manifest)."""
    entries: dict[str, Any] = {}
    for folder, manifest in splits.items():
        entries.update(_split_names(folder, manifest.timm_split(prefix=f"{folder}/")))
    path = Path(directory) / INFO_FILE
    atomic_write_json(path, {"name": name, "splits": entries})
    return path


def _split_names(split: str, info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``info`` under the split's own name and under timm's name for it, when that differs."""
    return {name: {**info, "name": name} for name in dict.fromkeys([split, TIMM_SPLIT_NAMES.get(split, split)])}


class _Checker:
    """Raises ManifestError naming the file and the key path of the first problem."""

    def __init__(self, source: str):
        self.source = source

    def that(self, condition: bool, key: str, message: str) -> None:
        if not condition:
            where = f"{self.source}: {key}" if key else self.source
            raise ManifestError(f"{where}: {message}")

    def typed(self, data: dict, key: str, kind: type, prefix: str = "") -> Any:
        value = data.get(key)
        self.that(isinstance(value, kind) and not (kind is int and isinstance(value, bool)),
                  f"{prefix}{key}", f"expected {kind.__name__}, got {value!r}")
        return value

    def list(self, data: dict, key: str) -> list:
        return self.typed(data, key, list)

    def counts(self, data: dict, key: str) -> dict[str, int]:
        value = self.typed(data, key, dict)
        for reason, count in value.items():
            self.that(isinstance(count, int) and count >= 0, f"{key}.{reason}", f"expected a count, got {count!r}")
        return value

    def shard(self, item: Any, key: str) -> ShardInfo:
        self.that(isinstance(item, dict), key, "expected an object")
        name = self.typed(item, "name", str, f"{key}.")
        self.that(bool(SHARD_NAME.match(name)), f"{key}.name", f"expected NNNNNN.tar, got {name!r}")
        samples = self.typed(item, "samples", int, f"{key}.")
        size = self.typed(item, "bytes", int, f"{key}.")
        self.that(samples >= 0 and size >= 0, key, "negative samples or bytes")
        digest = self.typed(item, "sha256", str, f"{key}.")
        self.that(bool(SHA256.match(digest)), f"{key}.sha256", f"expected 64 hex digits, got {digest!r}")
        return ShardInfo(name, samples, size, digest)

    def class_info(self, item: Any, key: str) -> ClassInfo:
        self.that(isinstance(item, dict), key, "expected an object")
        return ClassInfo(self.typed(item, "index", int, f"{key}."), self.typed(item, "wnid", str, f"{key}."),
                         self.typed(item, "name", str, f"{key}."))
