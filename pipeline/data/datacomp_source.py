"""DataComp-style captioned data as shard jobs: download a metadata parquet with img2dataset, or reshard
existing img2dataset / DataComp shards, keeping a uid subset and the samples that pass basic filters.

Both paths end in the same resharding step, whose input is a folder of img2dataset shards (``*.tar`` with a
``.parquet`` beside each, or tars alone). Planning reads the per-shard parquets (the tars only when a
parquet is missing): failed downloads, uids outside the subset, repeated uids, repeated keys within a shard
and samples failing the caption or size filters are dropped and counted there, and the kept samples, sorted
by input shard and key (img2dataset writes them in download-completion order), are cut into output shards of
a fixed size. Writing a shard then reads its samples' members (holding one output shard in memory, to write
them in plan order) and checks the caption bytes and the image itself.

Before a download, rows without a url or uid, or with a url scheme outside the allowed ones (http and https
by default: a ``file://`` url would copy a file of the downloading machine into the dataset), are dropped,
counted and listed; the rest are downloaded with the limits of :mod:`pipeline.data.fetch_limits`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
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
from pipeline.data.fetch_limits import LIMIT_REASONS, FetchLimits
from pipeline.data.images import BadImage, ImageOptions, prepare_image
from pipeline.data.input_tars import BadShardError, tar_samples
from pipeline.data.reasons import (
    ASPECT_RATIO_TOO_LARGE,
    BAD_JSON,
    BAD_UID,
    BAD_URL,
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
    MISSING_URL,
    NOT_AN_IMAGE,
    NOT_IN_SUBSET,
    RESIZE_FAILED,
    TIMEOUT,
    TOO_MANY_PIXELS,
    URL_SCHEME_NOT_ALLOWED,
)
from pipeline.data.shard_writer import REPORT_SAMPLE_LIMIT, Sample, Skip, key_width, sample_key
from pipeline.data.uids import in_subset, uid_column, uid_text

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JOB_VERSION = 2
DOWNLOAD_CAPTION = "caption"
DOWNLOAD_COLUMNS = ("uid", "source_url")
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

    def __init__(self, counts: Counter | None = None, samples: list[dict[str, str]] | None = None):
        self.counts: Counter = Counter(counts or {})
        self.samples: list[dict[str, str]] = list(samples or [])

    def add(self, reason: str, source: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if reason != NOT_IN_SUBSET and len(self.samples) < REPORT_SAMPLE_LIMIT:
            self.samples.append({"reason": reason, "source": source, "detail": detail})

    def nonzero(self) -> Counter:
        return Counter({reason: n for reason, n in self.counts.items() if n})


# --- downloading with img2dataset ------------------------------------------------------------------------

@dataclass(frozen=True)
class DownloadOptions:
    """img2dataset's settings that we expose (its names, with units in ours), and our download limits."""

    image_size: int = 512
    resize_mode: str = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0
    max_pixels: int = 89_478_485
    retries: int = 0
    thread_count: int = 64
    processes: int = 1
    samples_per_shard: int = 10_000
    limits: FetchLimits = FetchLimits()


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
                        extra_columns: list[str], subset: np.ndarray | None, base_url: str | None,
                        schemes: tuple[str, ...] = ("http", "https")) -> tuple[int, DropList]:
    """Write img2dataset's input (url, caption, uid, source_url, extras) for the rows worth downloading.

    A row is left out (counted and listed) when its url is missing or its scheme is not in ``schemes``, or
    its uid is missing or outside ``subset``. With ``base_url``, urls without a scheme are resolved against it
    (a folder served by ``serve_folder``); ``source_url`` keeps the original, which is what the shards record.
    Uids are written as text (see :mod:`pipeline.data.uids`); a uid or url column of the wrong type fails
    here, before anything is downloaded. Returns the row count and the rows left out.
    """
    tables = []
    dropped = DropList()
    for path in metadata_files(source):
        columns = [url_col, caption_col, uid_col, *extra_columns]
        try:
            table = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise KopeError(f"{path}: cannot read columns {columns}: {exc}") from None
        url_type = table.schema.field(url_col).type
        if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type) or pa.types.is_null(url_type)):
            raise KopeError(f"{path}: column {url_col!r}: urls must be strings, got {url_type}")
        uids = uid_column(table.column(uid_col), path, uid_col)
        urls = table.column(url_col).to_pylist()
        served = [_resolve(url, base_url) for url in urls]
        chosen = in_subset([uid or "" for uid in uids], subset) if subset is not None else None
        keep = np.zeros(len(uids), bool)
        for row, (uid, url) in enumerate(zip(uids, served)):
            where = f"{path.name}:row {row}"
            scheme = url_scheme(url)
            if not url:
                dropped.add(MISSING_URL, where, uid or "")
            elif scheme is None:
                dropped.add(BAD_URL, where, url)
            elif scheme not in schemes:
                dropped.add(URL_SCHEME_NOT_ALLOWED, where, url)
            elif uid is None:
                dropped.add(MISSING_UID, where, url)
            elif chosen is not None and not chosen[row]:
                dropped.add(NOT_IN_SUBSET, where, uid)
            else:
                keep[row] = True
        mask = pa.array(keep)
        tables.append(pa.table({"url": pa.array(served, pa.string()).filter(mask),
                                DOWNLOAD_CAPTION: table.column(caption_col).filter(mask),
                                "uid": pa.array(uids, pa.string()).filter(mask),
                                "source_url": pa.array(urls, pa.string()).filter(mask),
                                **{name: table.column(name).filter(mask) for name in extra_columns}}))
    merged = pa.concat_tables(tables)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    pq.write_table(merged, tmp)
    os.replace(tmp, out_file)
    return merged.num_rows, dropped


def download(url_list: Path, folder: Path, rows: int, options: DownloadOptions, extra_columns: list[str]) -> None:
    """Run img2dataset into ``folder`` (finished shards from an earlier attempt are kept) and check that
    every shard finished; failed samples are recorded in its parquets, which planning reads."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check when img2dataset imports it
    from img2dataset import download as img2dataset_download

    from pipeline.data.img2dataset_fetch import limits_applied

    sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs its own handler and leaves it behind
    try:
        with limits_applied(options.limits):
            img2dataset_download(
                url_list=str(url_list), input_format="parquet", url_col="url", caption_col=DOWNLOAD_CAPTION,
                save_additional_columns=[*DOWNLOAD_COLUMNS, *extra_columns], output_folder=str(folder),
                output_format="webdataset", processes_count=options.processes, thread_count=options.thread_count,
                image_size=options.image_size, resize_mode=options.resize_mode,
                resize_only_if_bigger=options.resize_only_if_bigger, encode_quality=options.encode_quality,
                skip_reencode=True, min_image_size=options.min_image_size,
                max_aspect_ratio=options.max_aspect_ratio or float("inf"), max_image_area=options.max_pixels,
                timeout=options.limits.deadline_s, retries=options.retries,
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


def url_scheme(url: str | None) -> str | None:
    """The scheme of ``url`` in lower case ('' for none); ``None`` when the url cannot be parsed."""
    try:
        return urlparse(url or "").scheme
    except ValueError:  # e.g. an unclosed [ in the host
        return None


def _resolve(url: str | None, base_url: str | None) -> str | None:
    if not url or base_url is None or url_scheme(url) != "":
        return url
    return urljoin(base_url, url)


# --- resharding ------------------------------------------------------------------------------------------

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
    counted_repeats: tuple[tuple[str, str, int], ...] = ()  # (input shard, key, repeats counted by planning)
    kind: str = "captions"

    def fingerprint(self) -> str:
        return sha256_text(canonical_json([JOB_VERSION, self.index, self.refs, self.key_width, asdict(self.image),
                                           asdict(self.filters), self.source, self.extra_fields,
                                           self.counted_repeats]))

    def items(self) -> Iterator[Sample | Skip]:
        wanted: dict[str, set[str]] = {}
        for name, key, _ in self.refs:
            wanted.setdefault(name, set()).add(key)
        members = {}
        counted = Counter({(name, key): n for name, key, n in self.counted_repeats})
        for name, keys in wanted.items():
            members[name], repeated = read_members(Path(self.root) / name, keys)
            for key, n in Counter(repeated).items():  # later tar samples that planning did not see as rows
                for _ in range(n - counted[name, key]):
                    yield Skip(DUPLICATE_KEY, f"{name}/{key}", "a later sample of the tar with this key")
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
    key_repeats: Counter = field(default_factory=Counter)  # (input shard, key) -> later rows dropped

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.keys) / self.samples_per_shard)

    def job(self, index: int) -> ReshardJob:
        start = index * self.samples_per_shard
        end = min(start + self.samples_per_shard, len(self.keys))
        refs = tuple((self.inputs[self.shard_ids[i]], self.keys[i], self.uids[i]) for i in range(start, end))
        repeats = tuple((name, key, self.key_repeats[name, key]) for name, key, _ in refs
                        if (name, key) in self.key_repeats)
        return ReshardJob(index, self.root, refs, key_width(self.samples_per_shard), self.image, self.filters,
                          self.source, self.extra_fields, repeats)


def plan_reshard(folder: Path, *, samples_per_shard: int, filters: SampleFilters, image: ImageOptions,
                 source: str, extra_fields: tuple[str, ...] = (), subset: np.ndarray | None = None,
                 dropped_before: DropList | None = None) -> ReshardPlan:
    """Decide which input samples are kept (first failing reason counts) and in which order; what
    ``dropped_before`` holds (rows left out of a download) is counted and listed with the rest."""
    inputs = list_input_shards(folder)
    dropped = DropList(dropped_before.counts, dropped_before.samples) if dropped_before else DropList()
    shard_ids: list[int] = []
    keys: list[str] = []
    uids: list[str] = []
    repeats: Counter = Counter()
    for shard_id, name in enumerate(inputs):
        rows = sorted(read_input_rows(folder, name), key=lambda row: row.key)  # stable: duplicates stay later
        chosen = in_subset([row.uid for row in rows], subset) if subset is not None else None
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
                if problem == DUPLICATE_KEY:
                    repeats[name, row.key] += 1
                continue
            shard_ids.append(shard_id)
            keys.append(row.key)
            uids.append(row.uid)
    keep = _first_occurrences(uids)
    for i in np.flatnonzero(~keep):
        dropped.add(DUPLICATE_UID, f"{inputs[shard_ids[i]]}/{keys[i]}", uids[i])
    kept = np.flatnonzero(keep)
    return ReshardPlan(str(folder), inputs, np.asarray(shard_ids, np.int32)[kept], [keys[i] for i in kept],
                       [uids[i] for i in kept], samples_per_shard, image, filters, source, tuple(extra_fields),
                       dropped.nonzero(), dropped.samples, repeats)


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
