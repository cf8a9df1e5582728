"""DataComp-style captioned data resharded: a folder of img2dataset / DataComp shards (``*.tar`` with a
``.parquet`` beside each, or tars alone) to our shards, keeping a uid subset and the samples that pass basic
filters. Downloading the metadata with img2dataset is :mod:`pipeline.data.datacomp_download`; both end here.

Planning reads the per-shard parquets (the tars only when a parquet is missing), one input shard per call, in
parallel: failed downloads, uids outside the subset, repeated keys within a shard and samples failing the
caption or size filters are dropped and counted there. What a call returns is columnar: the kept rows'
positions and their uids as two uint64 (DataComp's form; other uids hashed to 128 bits). Repeated uids are
then dropped across all inputs, and the kept samples, sorted by input shard and key (img2dataset writes them in
download-completion order), are cut into output shards of a fixed size. The plan is two int32 per kept sample
(input shard, row), about 8 bytes, saved once per stage (``_plan/``) for every array task and the final job
to read: a task maps only its own shards' slices.

Writing a shard reads its input shards' rows again (only those), then its samples' members (holding one output
shard in memory, to write them in plan order), and checks the caption bytes and the image itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_write_json, canonical_json, sha256_text
from pipeline.data.fetch_limits import LIMIT_REASONS
from pipeline.data.images import BadImage, ImageOptions, prepare_image
from pipeline.data.input_tars import BadShardError, tar_samples
from pipeline.data.pool import run_all
from pipeline.data.reasons import (
    ASPECT_RATIO_TOO_LARGE,
    BAD_JSON,
    BAD_UID,
    CAPTION_NOT_UTF8,
    CAPTION_TOO_LONG,
    CAPTION_TOO_SHORT,
    CONNECTION_ERROR,
    DISALLOWED_BY_ROBOTS,
    DOWNLOAD_FAILED,
    DUPLICATE_KEY,
    DUPLICATE_UID,
    EMPTY_CAPTION,
    IMAGE_TOO_SMALL,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_UID,
    NOT_AN_IMAGE,
    NOT_IN_SUBSET,
    RESIZE_FAILED,
    TIMEOUT,
    TOO_MANY_PIXELS,
)
from pipeline.data.shard_writer import REPORT_SAMPLE_LIMIT, Sample, Skip, key_width, sample_key
from pipeline.data.uids import UID_DTYPE, in_subset, load_uid_subset, uid_column, uid_pairs, uid_text

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JOB_VERSION = 3
PLAN_VERSION = 1
LIMIT_MESSAGE = re.compile(rf"\b({'|'.join(LIMIT_REASONS)}): ")


@dataclass(frozen=True)
class SampleFilters:
    """Basic DataComp filters; 0 switches a limit off. Sizes are the original image's when known."""

    min_caption_chars: int = 1
    max_caption_chars: int = 0
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0

    def caption_problem(self, caption: str) -> str | None:
        length = len(caption.strip())
        if length == 0:
            return EMPTY_CAPTION
        if length < self.min_caption_chars:
            return CAPTION_TOO_SHORT
        if self.max_caption_chars and length > self.max_caption_chars:
            return CAPTION_TOO_LONG
        return None

    def size_problem(self, width: int | None, height: int | None) -> str | None:
        if not width or not height:
            return None
        if min(width, height) < self.min_image_size:
            return IMAGE_TOO_SMALL
        if self.max_aspect_ratio and max(width, height) / min(width, height) > self.max_aspect_ratio:
            return ASPECT_RATIO_TOO_LARGE
        return None


class DropList:
    """Dropped samples: counts by reason, and the samples themselves (up to the report's limit) except subset
    misses, which are a selection rather than a failure and would crowd out everything else."""

    limit = REPORT_SAMPLE_LIMIT

    def __init__(self, counts: Counter | None = None, samples: list[dict[str, str]] | None = None):
        self.counts: Counter = Counter(counts or {})
        self.samples: list[dict[str, str]] = list(samples or [])

    def add(self, reason: str, source: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if reason != NOT_IN_SUBSET and len(self.samples) < self.limit:
            self.samples.append({"reason": reason, "source": source, "detail": detail})

    def extend(self, other: DropList) -> None:
        self.counts.update(other.counts)
        self.samples.extend(other.samples[: max(0, self.limit - len(self.samples))])

    def nonzero(self) -> Counter:
        return Counter({reason: n for reason, n in self.counts.items() if n})


def download_problem(status: str | None, error: str | None) -> str:
    """A counter name for a failed img2dataset row."""
    error = error or ""
    if limit := LIMIT_MESSAGE.search(error):
        return limit.group(1)
    error = error.lower()
    if code := re.search(r"http error (\d{3})", error):
        return f"http_{code.group(1)}"
    if "timed out" in error or "timeout" in error:
        return TIMEOUT
    if "image too small" in error:
        return IMAGE_TOO_SMALL
    if "area too large" in error:
        return TOO_MANY_PIXELS
    if "aspect ratio" in error:
        return ASPECT_RATIO_TOO_LARGE
    if "decoding error" in error:
        return NOT_AN_IMAGE
    if "x-robots-tag" in error:
        return DISALLOWED_BY_ROBOTS
    if "urlopen error" in error or "connection" in error:
        return CONNECTION_ERROR
    return RESIZE_FAILED if status == "failed_to_resize" else DOWNLOAD_FAILED


@dataclass(frozen=True)
class InputRow:
    """What planning needs of one input sample; ``problem`` is a reason found while reading it."""

    key: str
    status: str = "success"
    error: str = ""
    uid: str = ""
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    problem: str = ""


def list_input_shards(folder: Path) -> list[str]:
    names = sorted(path.name for path in Path(folder).glob("*.tar"))
    if not names:
        raise KopeError(f"{folder}: no .tar shards to reshard")
    return names


def read_input_rows(folder: Path, name: str) -> list[InputRow]:
    """The rows of input shard ``name``: from its parquet when there is one, else from the tar itself. A key
    repeated within the shard keeps its first row; the later ones carry the problem ``duplicate_key``."""
    tar = Path(folder) / name
    parquet = tar.with_suffix(".parquet")
    rows = _rows_from_parquet(parquet) if parquet.is_file() else _rows_from_tar(tar)
    seen: set[str] = set()
    for position, row in enumerate(rows):
        if row.key in seen and not row.problem:
            rows[position] = InputRow(row.key, row.status, row.error, row.uid, problem=DUPLICATE_KEY)
        seen.add(row.key)
    return rows


def sorted_rows(folder: Path, name: str) -> list[InputRow]:
    """The rows of an input shard in plan order: by key, a repeated key's later rows after its first."""
    return sorted(read_input_rows(folder, name), key=lambda row: row.key)


@dataclass(frozen=True)
class InputSelection:
    """What planning keeps of one input shard: positions in :func:`sorted_rows` and their uids as DataComp's
    two uint64, plus what it drops."""

    positions: np.ndarray  # int32
    uids: np.ndarray  # UID_DTYPE
    dropped: DropList


def select_rows(folder: str, name: str, filters: SampleFilters, subset_path: str | None) -> InputSelection:
    """Plan one input shard (first failing reason counts); runs in a worker process."""
    rows = sorted_rows(Path(folder), name)
    subset = load_uid_subset(Path(subset_path), check_sorted=False) if subset_path else None
    chosen = in_subset([row.uid for row in rows], subset) if subset is not None else None
    dropped = DropList()
    kept: list[int] = []
    for position, row in enumerate(rows):
        problem = row.problem
        if problem:
            pass
        elif row.status != "success":
            problem = download_problem(row.status, row.error)
        elif not row.uid:
            problem = MISSING_UID
        elif chosen is not None and not chosen[position]:
            problem = NOT_IN_SUBSET
        elif row.caption is not None and (caption_problem := filters.caption_problem(row.caption)):
            problem = caption_problem
        else:
            problem = filters.size_problem(row.width, row.height)
        if problem:
            dropped.add(problem, f"{name}/{row.key}", row.error or row.uid)
        else:
            kept.append(position)
    return InputSelection(np.asarray(kept, np.int32), uid_pairs([rows[i].uid for i in kept]), dropped)


@dataclass(frozen=True, eq=False)
class ReshardJob:
    """One output shard: which input rows (an input shard of ``inputs`` and a position in its
    :func:`sorted_rows`), in order, and how to check them."""

    index: int
    root: str
    inputs: tuple[str, ...]
    shard_ids: np.ndarray  # int32, into inputs
    rows: np.ndarray  # int32
    key_width: int
    image: ImageOptions
    filters: SampleFilters
    source: str
    extra_fields: tuple[str, ...]
    kind: str = "captions"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(canonical_json([JOB_VERSION, self.index, self.inputs, self.key_width,
                                                asdict(self.image), asdict(self.filters), self.source,
                                                self.extra_fields]).encode())
        digest.update(np.ascontiguousarray(self.shard_ids, "<i4").tobytes())
        digest.update(np.ascontiguousarray(self.rows, "<i4").tobytes())
        return digest.hexdigest()

    def items(self) -> Iterator[Sample | Skip]:
        rows = {name: sorted_rows(Path(self.root), name) for name in self.inputs}
        refs = [(self.inputs[shard], rows[self.inputs[shard]][row])
                for shard, row in zip(self.shard_ids.tolist(), self.rows.tolist())]
        members = {}
        for name in self.inputs:
            wanted = {row.key for ref_name, row in refs if ref_name == name}
            counted = Counter(row.key for row in rows[name] if row.problem == DUPLICATE_KEY and row.key in wanted)
            members[name], repeated = read_members(Path(self.root) / name, wanted)
            for key, n in Counter(repeated).items():  # later tar samples that planning did not see as rows
                for _ in range(n - counted[key]):
                    yield Skip(DUPLICATE_KEY, f"{name}/{key}", "a later sample of the tar with this key")
        for position, (name, row) in enumerate(refs):
            yield self._sample(sample_key(self.index, position, self.key_width), name, row.key, row.uid,
                               members[name].pop(row.key))

    def _sample(self, out_key: str, name: str, key: str, uid: str, parts: dict[str, bytes]) -> Sample | Skip:
        source = f"{name}/{key}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image_ext is None:
            return Skip(MISSING_IMAGE, source, uid)
        if "txt" not in parts:
            return Skip(MISSING_CAPTION, source, uid)
        try:
            caption = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            return Skip(CAPTION_NOT_UTF8, source, str(exc))
        if problem := self.filters.caption_problem(caption):
            return Skip(problem, source, uid)
        try:
            meta = json.loads(parts.get("json", b"{}"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return Skip(BAD_JSON, source, str(exc))
        try:
            image = prepare_image(parts[image_ext], self.image)
        except BadImage as exc:
            return Skip(exc.reason, source, exc.detail)
        out = {"source": self.source, "url": meta.get("source_url") or meta.get("url"), "caption": caption,
               "original_width": meta.get("original_width") or image.original_width,
               "original_height": meta.get("original_height") or image.original_height}
        out.update({name: meta[name] for name in self.extra_fields if name in meta})
        return Sample(out_key, image.data, caption, uid, image.width, image.height, out, image.converted_from)


@dataclass
class ReshardPlan:
    """Kept input samples in output order (two int32 each), cut into shards of ``samples_per_shard``."""

    root: str
    inputs: list[str]
    shard_ids: np.ndarray  # int32 per kept sample, into inputs
    rows: np.ndarray  # int32 per kept sample, into the input's sorted rows
    samples_per_shard: int
    image: ImageOptions
    filters: SampleFilters
    source: str
    extra_fields: tuple[str, ...]
    skipped: Counter = field(default_factory=Counter)
    skipped_samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.samples_per_shard)

    def job(self, index: int) -> ReshardJob:
        start = index * self.samples_per_shard
        end = min(start + self.samples_per_shard, self.num_samples)
        ids = np.asarray(self.shard_ids[start:end]).tolist()
        used = list(dict.fromkeys(ids))  # the input shards it reads, in order of first use
        local = {shard: i for i, shard in enumerate(used)}
        return ReshardJob(index, self.root, tuple(self.inputs[i] for i in used),
                          np.fromiter((local[shard] for shard in ids), np.int32, len(ids)),
                          np.asarray(self.rows[start:end], np.int32), key_width(self.samples_per_shard),
                          self.image, self.filters, self.source, self.extra_fields)

    def save(self, folder: Path) -> None:
        """The plan as files (``.npy`` arrays and JSON), readable by :meth:`load` with the arrays mapped."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("shard_ids", "rows"):
            with open(folder / f"{name}.npy", "wb") as handle:
                np.save(handle, np.asarray(getattr(self, name), np.int32))
        atomic_write_json(folder / "plan.json", {
            "root": self.root, "inputs": self.inputs, "samples_per_shard": self.samples_per_shard,
            "image": asdict(self.image), "filters": asdict(self.filters), "source": self.source,
            "extra_fields": list(self.extra_fields), "skipped": dict(self.skipped),
            "skipped_samples": self.skipped_samples})

    @classmethod
    def load(cls, folder: Path) -> ReshardPlan:
        meta = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
        return cls(meta["root"], meta["inputs"], np.load(folder / "shard_ids.npy", mmap_mode="r"),
                   np.load(folder / "rows.npy", mmap_mode="r"), meta["samples_per_shard"],
                   ImageOptions(**meta["image"]), SampleFilters(**meta["filters"]), meta["source"],
                   tuple(meta["extra_fields"]), Counter(meta["skipped"]), meta["skipped_samples"])


def plan_reshard(folder: Path, *, samples_per_shard: int, filters: SampleFilters, image: ImageOptions,
                 source: str, extra_fields: tuple[str, ...] = (), subset: Path | str | None = None,
                 dropped_before: DropList | None = None, inputs: list[str] | None = None,
                 workers: int = 1) -> ReshardPlan:
    """Decide which input samples are kept (first failing reason counts) and in which order, planning the
    input shards (``inputs``, relative to ``folder``; default its ``*.tar``) in ``workers`` processes; what
    ``dropped_before`` holds (rows left out of a download) is counted and listed with the rest."""
    inputs = list_input_shards(folder) if inputs is None else inputs
    if subset is not None:
        load_uid_subset(Path(subset))  # checked once here; the workers map it unchecked
    calls = ((shard, (str(folder), name, filters, str(subset) if subset else None))
             for shard, name in enumerate(inputs))
    selections = dict(run_all(select_rows, calls, workers if len(inputs) > 1 else 1))
    dropped = DropList()
    if dropped_before:
        dropped.extend(dropped_before)
    for shard in range(len(inputs)):
        dropped.extend(selections[shard].dropped)
    shard_ids = np.concatenate([np.full(len(selections[i].positions), i, np.int32) for i in range(len(inputs))])
    rows = np.concatenate([selections[i].positions for i in range(len(inputs))])
    uids = np.concatenate([selections[i].uids for i in range(len(inputs))]) if inputs else np.empty(0, UID_DTYPE)
    selections.clear()
    repeated = _later_occurrences(uids)
    del uids
    _list_repeats(dropped, Path(folder), inputs, shard_ids[repeated], rows[repeated])
    keep = ~repeated
    return ReshardPlan(str(folder), inputs, shard_ids[keep], rows[keep], samples_per_shard, image, filters,
                       source, tuple(extra_fields), dropped.nonzero(), dropped.samples)


def plan_key(folder: Path, inputs: list[str], settings: dict, files: tuple[Path, ...] = ()) -> str:
    """What a saved plan depends on: its settings, and the name, size and time of every input shard, its
    parquet, and the other ``files`` it reads (a uid subset)."""
    paths = [path for name in inputs for path in (Path(folder) / name, (Path(folder) / name).with_suffix(".parquet"))]
    listing = []
    for path in [*paths, *files]:
        try:
            stat = path.stat()
            listing.append([str(path), stat.st_size, stat.st_mtime_ns])
        except FileNotFoundError:
            pass
    return sha256_text(canonical_json([PLAN_VERSION, listing, settings]))[:16]


def _later_occurrences(uids: np.ndarray) -> np.ndarray:
    """Mask of the entries whose uid occurs earlier in the array (a stable sort of the pairs)."""
    if not len(uids):
        return np.zeros(0, bool)
    order = np.lexsort((uids["f1"], uids["f0"]))
    ordered = uids[order]
    same = np.zeros(len(uids), bool)
    same[1:] = (ordered["f0"][1:] == ordered["f0"][:-1]) & (ordered["f1"][1:] == ordered["f1"][:-1])
    repeated = np.zeros(len(uids), bool)
    repeated[order[same]] = True
    return repeated


def _list_repeats(dropped: DropList, folder: Path, inputs: list[str], shard_ids: np.ndarray,
                  rows: np.ndarray) -> None:
    """Count every repeated uid and list the first ones, reading the rows of the shards they are in."""
    room = max(0, dropped.limit - len(dropped.samples))
    listed = {}
    for shard in dict.fromkeys(shard_ids[:room].tolist()):
        listed[shard] = sorted_rows(folder, inputs[shard])
    for position, (shard, row) in enumerate(zip(shard_ids.tolist(), rows.tolist())):
        if position < room:
            found = listed[shard][row]
            dropped.add(DUPLICATE_UID, f"{inputs[shard]}/{found.key}", found.uid)
        else:
            dropped.counts[DUPLICATE_UID] += 1


def read_members(tar: Path, keys: set[str]) -> tuple[dict[str, dict[str, bytes]], list[str]]:
    """The members (by extension) of the samples ``keys`` in ``tar``, each key's first sample; and the keys of
    ``keys`` that come back in a later sample (dropped). Every key must be there."""
    found: dict[str, dict[str, bytes]] = {}
    repeated: list[str] = []
    for sample in tar_samples(tar, lambda key, _: key in keys):
        if sample.key not in keys:
            continue
        if sample.duplicate:
            repeated.append(sample.key)
        else:
            found[sample.key] = sample.parts
    missing = keys - found.keys()
    if missing:
        raise BadShardError(f"{tar}: {len(missing)} samples listed in its parquet are missing from the tar "
                            f"(first: {sorted(missing)[0]}); is the shard truncated?")
    return found, repeated


def _rows_from_parquet(path: Path) -> list[InputRow]:
    try:
        names = set(pq.read_schema(path).names)
        if "key" not in names:
            raise BadShardError(f"{path}: no 'key' column: not an img2dataset shard parquet")
        wanted = [c for c in ("key", "status", "error_message", "uid", "caption", "width", "height",
                              "original_width", "original_height") if c in names]
        table = pq.read_table(path, columns=wanted)
    except (OSError, pa.ArrowException) as exc:
        raise BadShardError(f"{path}: unreadable parquet: {exc}") from None
    count = table.num_rows
    uids = uid_column(table.column("uid"), path, "uid") if "uid" in names else [None] * count
    data = table.drop_columns(["uid"] if "uid" in names else []).to_pydict()

    def column(name: str, fallback: str = "") -> list:
        return data.get(name) or data.get(fallback) or [None] * count

    return [InputRow(key=str(key), status=status or "success", error=error or "", uid=uid or "", caption=caption,
                     width=width, height=height)
            for key, status, error, uid, caption, width, height in zip(
                data["key"], column("status"), column("error_message"), uids, column("caption"),
                column("original_width", "width"), column("original_height", "height"))]


def _rows_from_tar(tar: Path) -> list[InputRow]:
    """Rows from the ``.json`` and ``.txt`` members, for shards that came without a parquet; in tar order."""
    rows = []
    for sample in tar_samples(tar, lambda _, extension: extension in ("json", "txt")):
        if sample.duplicate:
            rows.append(InputRow(key=sample.key, problem=DUPLICATE_KEY))
            continue
        try:
            meta = json.loads(sample.parts.get("json", b"{}"))
        except ValueError:
            meta = {}  # counted when the shard is written
        meta = meta if isinstance(meta, dict) else {}
        try:
            caption = sample.parts["txt"].decode("utf-8") if "txt" in sample.parts else None
        except UnicodeDecodeError:
            caption = None  # counted when the shard is written
        try:
            uid, problem = uid_text(meta.get("uid")) or "", ""
        except TypeError:
            uid, problem = "", BAD_UID
        rows.append(InputRow(key=sample.key, uid=uid, caption=caption, problem=problem,
                             width=meta.get("original_width") or meta.get("width"),
                             height=meta.get("original_height") or meta.get("height")))
    return rows
