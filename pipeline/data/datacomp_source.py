"""DataComp-style captioned data as shard jobs: download a metadata parquet with img2dataset, or reshard
existing img2dataset / DataComp shards, keeping a uid subset and the samples that pass basic filters.

Both paths end in the same resharding step, whose input is a folder of img2dataset shards (``*.tar`` with a
``.parquet`` beside each, or tars alone). Planning reads the per-shard parquets (the tars only when a
parquet is missing): failed downloads, uids outside the subset, repeated uids and samples failing the
caption or size filters are dropped and counted there, and the kept samples, sorted by input shard and key
(img2dataset writes them in download-completion order), are cut into output shards of a fixed size. Writing
a shard then reads its samples' members (holding one output shard in memory, to write them in plan order)
and checks the caption bytes and the image itself.

The uid subset file is DataComp's: a sorted numpy array of dtype ``u8,u8`` (the 128-bit hex uid's high and
low halves), as ``.npy`` or raw memory-mapped; an ``(n, 2)`` uint64 array works too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import signal
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import canonical_json, sha256_text
from pipeline.data.images import IMAGE_TOO_SMALL, BadImage, ImageOptions, prepare_image
from pipeline.data.shard_writer import REPORT_SAMPLE_LIMIT, Sample, Skip, key_width, sample_key

NOT_IN_SUBSET = "not_in_uid_subset"
DUPLICATE_UID = "duplicate_uid"
MISSING_UID = "missing_uid"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
ASPECT_RATIO_TOO_LARGE = "aspect_ratio_too_large"
BAD_JSON = "bad_json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
UID_HEX = re.compile(r"^[0-9a-fA-F]{32}$")
UID_DTYPE = np.dtype("u8,u8")
JOB_VERSION = 1
DOWNLOAD_CAPTION = "caption"
DOWNLOAD_COLUMNS = ("uid", "source_url")


class BadShardError(KopeError):
    """An input shard (or its parquet) that cannot be read; fails the stage with the shard's name."""


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


# --- uids and the subset file ---------------------------------------------------------------------------

def uid_pair(uid: str) -> tuple[int, int]:
    """A uid as DataComp's (high, low) uint64 pair; a uid that is not 32 hex digits is hashed to one."""
    value = int(uid, 16) if UID_HEX.match(uid) else int.from_bytes(
        hashlib.blake2b(uid.encode("utf-8"), digest_size=16).digest(), "big")
    return value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF


def load_uid_subset(path: Path) -> np.ndarray:
    """DataComp's sorted ``u8,u8`` uid array from ``.npy`` or a raw memory-mapped file."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r") if path.suffix == ".npy" else np.memmap(path, UID_DTYPE, mode="r")
    except (OSError, ValueError) as exc:
        raise KopeError(f"{path}: unreadable uid subset: {exc}") from None
    if array.dtype != UID_DTYPE:
        if array.ndim != 2 or array.shape[1] != 2 or array.dtype != np.uint64:
            raise KopeError(f"{path}: expected a u8,u8 structured array or (n, 2) uint64, got {array.dtype} "
                            f"{array.shape}")
        array = np.ascontiguousarray(array).view(UID_DTYPE).reshape(-1)
    high, low = (array[name] for name in UID_DTYPE.names)
    if not np.all((high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] >= low[:-1]))):
        raise KopeError(f"{path}: uid subset is not sorted (sort it as DataComp's resharder requires)")
    return array


def in_subset(uids: list[str], subset: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``uids`` are in the sorted ``subset``."""
    if not uids or not len(subset):
        return np.zeros(len(uids), bool)
    pairs = np.array([uid_pair(uid) for uid in uids], dtype=UID_DTYPE)
    where = np.minimum(np.searchsorted(subset, pairs), len(subset) - 1)
    return subset[where] == pairs


# --- downloading with img2dataset ------------------------------------------------------------------------

@dataclass(frozen=True)
class DownloadOptions:
    """img2dataset's settings that we expose (its names, with units in ours)."""

    image_size: int = 512
    resize_mode: str = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0
    max_pixels: int = 89_478_485
    timeout_s: float = 10.0
    retries: int = 0
    thread_count: int = 64
    processes: int = 1
    samples_per_shard: int = 10_000


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


def metadata_files(source: Path) -> list[Path]:
    """A metadata parquet, or every ``*.parquet`` in a folder, sorted."""
    source = Path(source)
    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    if not files:
        raise KopeError(f"{source}: no metadata parquet files")
    return files


def write_download_list(source: Path, out_file: Path, *, url_col: str, caption_col: str, uid_col: str,
                        extra_columns: list[str], subset: np.ndarray | None, base_url: str | None
                        ) -> tuple[int, Counter]:
    """Write img2dataset's input (url, caption, uid, source_url, extras) for the rows in ``subset``.

    With ``base_url``, urls without a scheme are resolved against it (a folder served by ``serve_folder``);
    ``source_url`` keeps the original, which is what the shards record. Returns the row count and the
    samples left out before downloading, by reason.
    """
    tables = []
    skipped: Counter = Counter()
    for path in metadata_files(source):
        columns = [url_col, caption_col, uid_col, *extra_columns]
        try:
            table = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise KopeError(f"{path}: cannot read columns {columns}: {exc}") from None
        uids = [uid or "" for uid in table.column(uid_col).to_pylist()]
        keep = np.array([bool(uid) for uid in uids], bool)
        skipped[MISSING_UID] += int((~keep).sum())
        if subset is not None:
            chosen = in_subset(uids, subset) & keep
            skipped[NOT_IN_SUBSET] += int((keep & ~chosen).sum())
            keep = chosen
        table = table.filter(pa.array(keep))
        urls = table.column(url_col).to_pylist()
        served = [_resolve(url, base_url) for url in urls]
        tables.append(pa.table({"url": served, DOWNLOAD_CAPTION: table.column(caption_col),
                                "uid": table.column(uid_col), "source_url": urls,
                                **{name: table.column(name) for name in extra_columns}}))
    merged = pa.concat_tables(tables)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    pq.write_table(merged, tmp)
    os.replace(tmp, out_file)
    return merged.num_rows, Counter({reason: n for reason, n in skipped.items() if n})


def download(url_list: Path, folder: Path, rows: int, options: DownloadOptions, extra_columns: list[str]) -> None:
    """Run img2dataset into ``folder`` (finished shards from an earlier attempt are kept) and check that
    every shard finished; failed samples are recorded in its parquets, which planning reads."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check when img2dataset imports it
    from img2dataset import download as img2dataset_download

    sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs its own handler and leaves it behind
    try:
        img2dataset_download(
            url_list=str(url_list), input_format="parquet", url_col="url", caption_col=DOWNLOAD_CAPTION,
            save_additional_columns=[*DOWNLOAD_COLUMNS, *extra_columns], output_folder=str(folder),
            output_format="webdataset", processes_count=options.processes, thread_count=options.thread_count,
            image_size=options.image_size, resize_mode=options.resize_mode,
            resize_only_if_bigger=options.resize_only_if_bigger, encode_quality=options.encode_quality,
            skip_reencode=True, min_image_size=options.min_image_size,
            max_aspect_ratio=options.max_aspect_ratio or float("inf"), max_image_area=options.max_pixels,
            timeout=options.timeout_s, retries=options.retries,
            number_sample_per_shard=options.samples_per_shard, extract_exif=False, compute_hash=None,
            incremental_mode="incremental", enable_wandb=False, disallowed_header_directives=[],
        )
    finally:
        signal.signal(signal.SIGINT, sigint)
    expected = math.ceil(rows / options.samples_per_shard)
    unfinished = [f"{i:05d}" for i in range(expected) if not (folder / f"{i:05d}_stats.json").is_file()]
    if unfinished:
        raise KopeError(f"{folder}: img2dataset did not finish shards {', '.join(unfinished[:5])} "
                        f"({len(unfinished)} of {expected}); re-run to retry them")


def download_problem(status: str | None, error: str | None) -> str:
    """A counter name for a failed img2dataset row."""
    error = (error or "").lower()
    if code := re.search(r"http error (\d{3})", error):
        return f"http_{code.group(1)}"
    if "timed out" in error or "timeout" in error:
        return "timeout"
    if "image too small" in error:
        return IMAGE_TOO_SMALL
    if "area too large" in error:
        return "too_many_pixels"
    if "aspect ratio" in error:
        return ASPECT_RATIO_TOO_LARGE
    if "decoding error" in error:
        return "not_an_image"
    if "x-robots-tag" in error:
        return "disallowed_by_robots"
    if "urlopen error" in error or "connection" in error:
        return "connection_error"
    return "resize_failed" if status == "failed_to_resize" else "download_failed"


def _resolve(url: str | None, base_url: str | None) -> str | None:
    if url is None or base_url is None or urlparse(url).scheme:
        return url
    return urljoin(base_url, url)


# --- resharding ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputRow:
    """What planning needs of one input sample."""

    key: str
    status: str = "success"
    error: str = ""
    uid: str = ""
    caption: str | None = None
    width: int | None = None
    height: int | None = None


def list_input_shards(folder: Path) -> list[str]:
    names = sorted(path.name for path in Path(folder).glob("*.tar"))
    if not names:
        raise KopeError(f"{folder}: no .tar shards to reshard")
    return names


def read_input_rows(folder: Path, name: str) -> list[InputRow]:
    """The rows of input shard ``name``: from its parquet when there is one, else from the tar itself."""
    tar = Path(folder) / name
    parquet = tar.with_suffix(".parquet")
    if parquet.is_file():
        return _rows_from_parquet(parquet)
    return _rows_from_tar(tar)


@dataclass(frozen=True)
class ReshardJob:
    """One output shard: which input samples (input shard name, key, uid), in order, and how to check them."""

    index: int
    root: str
    refs: tuple[tuple[str, str, str], ...]
    key_width: int
    image: ImageOptions
    filters: SampleFilters
    source: str
    extra_fields: tuple[str, ...]
    kind: str = "captions"

    def fingerprint(self) -> str:
        return sha256_text(canonical_json([JOB_VERSION, self.index, self.refs, self.key_width, asdict(self.image),
                                           asdict(self.filters), self.source, self.extra_fields]))

    def items(self) -> Iterator[Sample | Skip]:
        wanted: dict[str, set[str]] = {}
        for name, key, _ in self.refs:
            wanted.setdefault(name, set()).add(key)
        members = {name: read_members(Path(self.root) / name, keys) for name, keys in wanted.items()}
        for position, (name, key, uid) in enumerate(self.refs):
            yield self._sample(sample_key(self.index, position, self.key_width), name, key, uid,
                               members[name].pop(key))

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
    """Kept input samples in output order, cut into shards of ``samples_per_shard``."""

    root: str
    inputs: list[str]
    shard_ids: np.ndarray
    keys: list[str]
    uids: list[str]
    samples_per_shard: int
    image: ImageOptions
    filters: SampleFilters
    source: str
    extra_fields: tuple[str, ...]
    skipped: Counter = field(default_factory=Counter)
    skipped_samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.keys) / self.samples_per_shard)

    def job(self, index: int) -> ReshardJob:
        start = index * self.samples_per_shard
        end = min(start + self.samples_per_shard, len(self.keys))
        refs = tuple((self.inputs[self.shard_ids[i]], self.keys[i], self.uids[i]) for i in range(start, end))
        return ReshardJob(index, self.root, refs, key_width(self.samples_per_shard), self.image, self.filters,
                          self.source, self.extra_fields)


def plan_reshard(folder: Path, *, samples_per_shard: int, filters: SampleFilters, image: ImageOptions,
                 source: str, extra_fields: tuple[str, ...] = (), subset: np.ndarray | None = None,
                 skipped_before: Counter | None = None) -> ReshardPlan:
    """Decide which input samples are kept (first failing reason counts) and in which order."""
    inputs = list_input_shards(folder)
    skipped = Counter(skipped_before or {})
    examples: list[dict[str, str]] = []
    shard_ids: list[int] = []
    keys: list[str] = []
    uids: list[str] = []

    def drop(reason: str, where: str, detail: str = "") -> None:
        skipped[reason] += 1
        if reason != NOT_IN_SUBSET and len(examples) < REPORT_SAMPLE_LIMIT:
            examples.append({"reason": reason, "source": where, "detail": detail})

    for shard_id, name in enumerate(inputs):
        rows = sorted(read_input_rows(folder, name), key=lambda row: row.key)
        chosen = in_subset([row.uid for row in rows], subset) if subset is not None else None
        for position, row in enumerate(rows):
            where = f"{name}/{row.key}"
            problem = None
            if row.status != "success":
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
                drop(problem, where, row.error or row.uid)
                continue
            shard_ids.append(shard_id)
            keys.append(row.key)
            uids.append(row.uid)
    keep = _first_occurrences(uids)
    for i in np.flatnonzero(~keep):
        drop(DUPLICATE_UID, f"{inputs[shard_ids[i]]}/{keys[i]}", uids[i])
    kept = np.flatnonzero(keep)
    return ReshardPlan(str(folder), inputs, np.asarray(shard_ids, np.int32)[kept], [keys[i] for i in kept],
                       [uids[i] for i in kept], samples_per_shard, image, filters, source, tuple(extra_fields),
                       Counter({reason: n for reason, n in skipped.items() if n}), examples)


def read_members(tar: Path, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """The members (by extension) of the samples ``keys`` in ``tar``; every key must be there."""
    found: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if member.isfile() and key in keys:
                    found.setdefault(key, {})[ext] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadShardError(f"{tar}: unreadable shard: {exc}") from None
    missing = keys - found.keys()
    if missing:
        raise BadShardError(f"{tar}: {len(missing)} samples listed in its parquet are missing from the tar "
                            f"(first: {sorted(missing)[0]}); is the shard truncated?")
    return found


def _first_occurrences(uids: list[str]) -> np.ndarray:
    """Mask of the entries whose uid did not occur earlier in the list."""
    seen: set[str] = set()
    keep = np.ones(len(uids), bool)
    for i, uid in enumerate(uids):
        if uid in seen:
            keep[i] = False
        seen.add(uid)
    return keep


def _rows_from_parquet(path: Path) -> list[InputRow]:
    try:
        names = set(pq.read_schema(path).names)
        if "key" not in names:
            raise BadShardError(f"{path}: no 'key' column: not an img2dataset shard parquet")
        wanted = [c for c in ("key", "status", "error_message", "uid", "caption", "width", "height",
                              "original_width", "original_height") if c in names]
        data = pq.read_table(path, columns=wanted).to_pydict()
    except (OSError, pa.ArrowException) as exc:
        raise BadShardError(f"{path}: unreadable parquet: {exc}") from None
    count = len(data["key"])

    def column(name: str, fallback: str = "") -> list:
        return data.get(name) or data.get(fallback) or [None] * count

    return [InputRow(key=str(key), status=status or "success", error=error or "", uid=uid or "", caption=caption,
                     width=width, height=height)
            for key, status, error, uid, caption, width, height in zip(
                data["key"], column("status"), column("error_message"), column("uid"), column("caption"),
                column("original_width", "width"), column("original_height", "height"))]


def _rows_from_tar(tar: Path) -> list[InputRow]:
    """Rows from the ``.json`` and ``.txt`` members, for shards that came without a parquet."""
    metas: dict[str, dict] = {}
    captions: dict[str, str | None] = {}
    keys: set[str] = set()
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if not member.isfile():
                    continue
                keys.add(key)
                if ext not in ("json", "txt"):
                    continue
                data = archive.extractfile(member).read()
                if ext == "json":
                    try:
                        meta = json.loads(data)
                    except ValueError:
                        meta = {}
                    metas[key] = meta if isinstance(meta, dict) else {}
                else:
                    try:
                        captions[key] = data.decode("utf-8")
                    except UnicodeDecodeError:
                        captions[key] = None  # counted when the shard is written
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadShardError(f"{tar}: unreadable shard: {exc}") from None
    rows = []
    for key in sorted(keys):
        meta = metas.get(key, {})
        rows.append(InputRow(key=key, uid=str(meta.get("uid") or ""), caption=captions.get(key),
                             width=meta.get("original_width") or meta.get("width"),
                             height=meta.get("original_height") or meta.get("height")))
    return rows
