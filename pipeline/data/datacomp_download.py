"""DataComp-style metadata downloaded with img2dataset, in chunks that any number of array tasks share out.

The metadata (one parquet, or a folder of them in name order, rows in file order) is cut into *chunks* of
``chunk_rows`` consecutive rows: a pure function of the files' row counts, read from their footers, and of
the setting, never of the number of tasks. Chunk ``c`` has its own download list (``lists/CCCCC.parquet``: the
rows worth downloading, with what was left out in ``lists/CCCCC.json``) and its own img2dataset output folder
(``shards/CCCCC/``). Array task ``part`` of ``parts`` downloads the chunks with ``c % parts == part``, reading
only those rows of the metadata. img2dataset runs in incremental mode, so a requeued task keeps the
img2dataset shards it finished and downloads the rest; a chunk whose shards all finished is skipped without
starting img2dataset. So a rerun or a requeue never downloads a chunk twice, and what the chunks hold does not
depend on how many tasks downloaded them.

img2dataset itself spreads each chunk over ``processes`` x ``thread_count`` (its multiprocessing
distributor), or over a Spark or Ray cluster the user runs (its ``pyspark`` and ``ray`` distributors: then
one job runs the stage and the cluster does the downloading).

Before a download, rows without a url or uid, or with a url scheme outside the allowed ones (http and https
by default: a ``file://`` url would copy a file of the downloading machine into the dataset), are dropped,
counted and listed; the rest are downloaded with the limits of :mod:`pipeline.data.fetch_limits`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_write_json, canonical_json, sha256_text
from pipeline.data.datacomp_source import DropList
from pipeline.data.fetch_limits import FetchLimits
from pipeline.data.reasons import BAD_URL, MISSING_UID, MISSING_URL, NOT_IN_SUBSET, URL_SCHEME_NOT_ALLOWED
from pipeline.data.uids import in_subset, uid_column

DOWNLOAD_CAPTION = "caption"
DOWNLOAD_COLUMNS = ("uid", "source_url")
DISTRIBUTORS = {"multiprocessing": None, "pyspark": "pyspark", "ray": "ray"}  # distributor -> module it needs
LIST_VERSION = 1


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
    distributor: str = "multiprocessing"
    limits: FetchLimits = FetchLimits()


@dataclass(frozen=True)
class ListOptions:
    """Which metadata columns are read, and which rows are worth downloading."""

    url_col: str = "url"
    caption_col: str = "text"
    uid_col: str = "uid"
    extra_columns: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ("http", "https")


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one metadata file."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class DownloadPlan:
    """The metadata files, their row counts, and the chunks they are cut into."""

    files: tuple[str, ...]
    rows: tuple[int, ...]
    chunk_rows: int

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.total_rows / self.chunk_rows)

    def pieces(self, chunk: int) -> list[Piece]:
        """The rows of chunk ``chunk``, as a run of file pieces."""
        start, stop = chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.total_rows)
        pieces, offset = [], 0
        for path, count in zip(self.files, self.rows):
            low, high = max(start - offset, 0), min(stop - offset, count)
            if low < high:
                pieces.append(Piece(path, low, high))
            offset += count
        return pieces

    def chunks_of_part(self, part: int, parts: int) -> range:
        return range(part, self.num_chunks, parts)


def metadata_files(source: Path) -> list[Path]:
    """A metadata parquet, or every ``*.parquet`` in a folder, sorted."""
    source = Path(source)
    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    if not files:
        raise KopeError(f"{source}: no metadata parquet files")
    return files


def plan_download(source: Path, chunk_rows: int) -> DownloadPlan:
    """The chunks of the metadata at ``source``, from the files' footers alone."""
    files = metadata_files(source)
    rows = []
    for path in files:
        try:
            rows.append(pq.ParquetFile(path).metadata.num_rows)
        except (OSError, pa.ArrowException) as exc:
            raise KopeError(f"{path}: unreadable metadata parquet: {exc}") from None
    return DownloadPlan(tuple(str(path) for path in files), tuple(rows), chunk_rows)


def read_piece(piece: Piece, columns: list[str]) -> pa.Table:
    """The columns of rows ``[start, stop)`` of a metadata file, reading only the row groups they lie in."""
    try:
        parquet = pq.ParquetFile(piece.path)
        groups, first, offset = [], None, 0
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            if offset < piece.stop and offset + count > piece.start:
                groups.append(group)
                first = offset if first is None else first
            offset += count
        table = parquet.read_row_groups(groups, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise KopeError(f"{piece.path}: cannot read columns {columns}: {exc}") from None
    return table.slice(piece.start - (first or 0), piece.stop - piece.start)


def write_download_list(source: Path | list[Piece], out_file: Path, *, url_col: str, caption_col: str,
                        uid_col: str, extra_columns: list[str] | tuple[str, ...], subset: np.ndarray | None,
                        base_url: str | None, schemes: tuple[str, ...] = ("http", "https")) -> tuple[int, DropList]:
    """Write img2dataset's input (url, caption, uid, source_url, extras) for the rows worth downloading, of a
    metadata file or folder, or of the given pieces of files.

    A row is left out (counted and listed) when its url is missing or its scheme is not in ``schemes``, or
    its uid is missing or outside ``subset``. With ``base_url``, urls without a scheme are resolved against it
    (a folder served by ``serve_folder``); ``source_url`` keeps the original, which is what the shards record.
    Uids are written as text (see :mod:`pipeline.data.uids`); a uid or url column of the wrong type fails
    here, before anything is downloaded. Returns the row count and the rows left out.
    """
    pieces = source if isinstance(source, list) else [
        Piece(str(path), 0, pq.ParquetFile(path).metadata.num_rows) for path in metadata_files(source)]
    columns = [url_col, caption_col, uid_col, *extra_columns]
    tables, dropped = [], DropList()
    for piece in pieces:
        path = Path(piece.path)
        table = read_piece(piece, columns)
        url_type = table.schema.field(url_col).type
        if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type) or pa.types.is_null(url_type)):
            raise KopeError(f"{path}: column {url_col!r}: urls must be strings, got {url_type}")
        uids = uid_column(table.column(uid_col), path, uid_col)
        urls = table.column(url_col).to_pylist()
        served = [_resolve(url, base_url) for url in urls]
        chosen = in_subset([uid or "" for uid in uids], subset) if subset is not None else None
        keep = np.zeros(len(uids), bool)
        for offset, (uid, url) in enumerate(zip(uids, served)):
            where = f"{path.name}:row {piece.start + offset}"
            scheme = url_scheme(url)
            if not url:
                dropped.add(MISSING_URL, where, uid or "")
            elif scheme is None:
                dropped.add(BAD_URL, where, url)
            elif scheme not in schemes:
                dropped.add(URL_SCHEME_NOT_ALLOWED, where, url)
            elif uid is None:
                dropped.add(MISSING_UID, where, url)
            elif chosen is not None and not chosen[offset]:
                dropped.add(NOT_IN_SUBSET, where, uid)
            else:
                keep[offset] = True
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


class ChunkFolders:
    """Where chunk ``c``'s download list, its record of left-out rows, and its img2dataset shards live."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def list_file(self, chunk: int) -> Path:
        return self.root / "lists" / f"{chunk:05d}.parquet"

    def record_file(self, chunk: int) -> Path:
        return self.root / "lists" / f"{chunk:05d}.json"

    def shards(self, chunk: int) -> Path:
        return self.root / "shards" / f"{chunk:05d}"

    @property
    def shards_root(self) -> Path:
        return self.root / "shards"

    def record(self, chunk: int) -> dict | None:
        try:
            return json.loads(self.record_file(chunk).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def finished(self, chunk: int, samples_per_shard: int) -> bool:
        """Its list is written and img2dataset finished every shard of it."""
        record = self.record(chunk)
        if record is None:
            return False
        expected = math.ceil(record["rows"] / samples_per_shard)
        folder = self.shards(chunk)
        return all((folder / f"{i:05d}_stats.json").is_file() for i in range(expected))

    def input_shards(self, plan: DownloadPlan) -> list[str]:
        """Every chunk's img2dataset tars, relative to :attr:`shards_root`, in chunk then shard order."""
        return [f"{chunk:05d}/{path.name}" for chunk in range(plan.num_chunks)
                for path in sorted(self.shards(chunk).glob("*.tar"))]

    def dropped(self, plan: DownloadPlan) -> DropList:
        """What every chunk left out of its download, in chunk order."""
        merged = DropList()
        for chunk in range(plan.num_chunks):
            record = self.record(chunk)
            if record is None:
                raise KopeError(f"{self.record_file(chunk)}: missing: chunk {chunk} was never listed")
            merged.counts.update(record["dropped"])
            merged.samples.extend(record["samples"][: max(0, DropList.limit - len(merged.samples))])
        return merged


def fetch_chunk(plan: DownloadPlan, chunk: int, folders: ChunkFolders, lists: ListOptions,
                options: DownloadOptions, subset: np.ndarray | None, base_url: str | None,
                subset_id: str = "") -> None:
    """Download chunk ``chunk`` unless it is finished: write its list (again only if its settings changed,
    e.g. the port of a served folder), then run img2dataset on it into its own folder, incrementally."""
    if folders.finished(chunk, options.samples_per_shard):
        return
    pieces = plan.pieces(chunk)
    identity = sha256_text(canonical_json([LIST_VERSION, [asdict(piece) for piece in pieces], asdict(lists),
                                           subset_id, base_url]))
    record = folders.record(chunk)
    if record is None or record.get("identity") != identity or not folders.list_file(chunk).is_file():
        rows, dropped = write_download_list(
            pieces, folders.list_file(chunk), url_col=lists.url_col, caption_col=lists.caption_col,
            uid_col=lists.uid_col, extra_columns=lists.extra_columns, subset=subset, base_url=base_url,
            schemes=lists.schemes)
        record = {"identity": identity, "rows": rows, "dropped": dict(dropped.counts), "samples": dropped.samples}
        atomic_write_json(folders.record_file(chunk), record)
    if record["rows"]:
        download(folders.list_file(chunk), folders.shards(chunk), record["rows"], options, list(lists.extra_columns))


def check_distributor(name: str) -> None:
    """img2dataset's ray distributor silently does nothing without ray: refuse that up front."""
    module = DISTRIBUTORS[name]
    if module and importlib.util.find_spec(module) is None:
        raise KopeError(f"distributor {name!r} needs the {module} package (pip install {module}) and a running "
                        f"{'Spark session' if module == 'pyspark' else 'Ray cluster'}")


def download(url_list: Path, folder: Path, rows: int, options: DownloadOptions, extra_columns: list[str]) -> None:
    """Run img2dataset into ``folder`` (finished shards from an earlier attempt are kept) and check that
    every shard finished; failed samples are recorded in its parquets, which planning reads."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check when img2dataset imports it
    check_distributor(options.distributor)
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
                distributor=options.distributor,
            )
    finally:
        signal.signal(signal.SIGINT, sigint)
    expected = math.ceil(rows / options.samples_per_shard)
    unfinished = [f"{i:05d}" for i in range(expected) if not (folder / f"{i:05d}_stats.json").is_file()]
    if unfinished:
        raise KopeError(f"{folder}: img2dataset did not finish shards {', '.join(unfinished[:5])} "
                        f"({len(unfinished)} of {expected}); re-run to retry them")


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
