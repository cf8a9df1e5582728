"""Write shards deterministically and atomically, keep finished ones on a re-run, and finish a dataset.

A shard's bytes depend only on its job, so shards can be written by any number of processes or Slurm array
tasks without coordination: members come in a fixed order (``.jpg``, ``.cls``/``.txt``/``.seg.png``, ``.json``)
with mtime 0, uid/gid 0, empty owner names and mode 0444. The tar is written under a temporary name and renamed
when complete, then its index (``NNNNNN.idx``, where each sample's bytes lie: readers never scan the tar, see
:mod:`pipeline.data.tar_index`), the shard's parquet, then ``NNNNNN_stats.json``, which marks the shard finished
and records its sha256 and the fingerprint of its job. A re-run keeps a shard whose stats match its job and
whose tar has the recorded size and digest (re-hashed only when asked), and rewrites anything else.

Writers run in a pool of light processes (:mod:`pipeline.data.pool`): they never import the parent's
``__main__``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.fsutil import atomic_file, atomic_write_bytes, atomic_write_json, sha256_file
from pipeline.core.progress import progress
from pipeline.data.manifest import INDEX_FILES, ClassInfo, Manifest, ShardInfo, shard_name
from pipeline.data.pool import run_all
from pipeline.data.tar_index import HashingWriter, TarIndex, index_path

STATS_SUFFIX = "_stats.json"
TARGETS = {"classification": ("cls", "label"), "captions": ("txt", "caption"), "segmentation": ("seg.png", "mask")}
SHARD_FILE = re.compile(r"^(\d{6})(\.tar|\.idx|\.parquet|_stats\.json)$")
REPORT_SAMPLE_LIMIT = 10_000


@dataclass(frozen=True)
class Sample:
    """One sample ready to store; ``target`` is the class index (``.cls``), the caption (``.txt``) or the PNG
    bytes of a class-index mask (``.seg.png``)."""

    key: str
    image: bytes
    target: int | str | bytes
    uid: str
    width: int
    height: int
    meta: dict[str, Any] = field(default_factory=dict)
    converted_from: str | None = None
    renamed: str | None = None  # the reason its recorded name differs from its file's, e.g. name_not_utf8


@dataclass(frozen=True)
class Skip:
    """An input left out of its shard, counted under ``reason``; ``source`` names the file or sample."""

    reason: str
    source: str
    detail: str = ""


class ShardJob(Protocol):
    """Everything one shard's content depends on; picklable, so a worker process can write it."""

    index: int
    kind: str  # a key of TARGETS

    def fingerprint(self) -> str: ...

    def items(self) -> Iterator[Sample | Skip]: ...


class DatasetPlan(Protocol):
    """A dataset cut into shard jobs, plus what was dropped before sharding (filters, failed downloads)."""

    num_shards: int
    skipped: Counter
    skipped_samples: list[dict[str, str]]

    def job(self, index: int) -> ShardJob: ...


@dataclass
class ShardStats:
    """The content of ``NNNNNN_stats.json``."""

    name: str
    count: int
    bytes: int
    sha256: str
    fingerprint: str
    skipped: dict[str, int]
    converted: dict[str, int]
    skipped_samples: list[dict[str, str]]
    renamed: dict[str, int] = field(default_factory=dict)

    def info(self) -> ShardInfo:
        return ShardInfo(self.name, self.count, self.bytes, self.sha256)


def stats_path(directory: Path, index: int) -> Path:
    return directory / f"{index:06d}{STATS_SUFFIX}"


def sample_key(shard: int, position: int, width: int) -> str:
    """img2dataset-style key: shard index then the position in the shard's input, zero-padded."""
    return f"{shard:05d}{position:0{width}d}"


def key_width(max_shard_inputs: int) -> int:
    return max(4, len(str(max(max_shard_inputs - 1, 0))))


def write_shard(directory: Path, job: ShardJob) -> ShardStats:
    """Write shard ``job.index`` (tar, index, parquet, stats) into ``directory``, whatever is there already.

    The tar is hashed as it is written and its index comes from the offsets the writer sees, so nothing is
    read back."""
    directory = Path(directory)
    name = shard_name(job.index)
    target_ext, target_column = TARGETS[job.kind]
    rows: dict[str, list] = {"key": [], "uid": [], target_column: [], "width": [], "height": []}
    skipped: Counter = Counter()
    converted: Counter = Counter()
    renamed: Counter = Counter()
    skipped_samples: list[dict[str, str]] = []
    starts: list[int] = []
    with atomic_file(directory / name) as handle:
        written = HashingWriter(handle)
        with tarfile.open(fileobj=written, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for item in job.items():
                if isinstance(item, Skip):
                    skipped[item.reason] += 1
                    skipped_samples.append(asdict(item))
                    continue
                starts.append(tar.offset)
                _add_sample(tar, item, target_ext)
                for column, value in (("key", item.key), ("uid", item.uid), (target_column, item.target),
                                      ("width", item.width), ("height", item.height)):
                    rows[column].append(value)
                if item.converted_from:
                    converted[item.converted_from] += 1
                if item.renamed:
                    renamed[item.renamed] += 1
            starts.append(tar.offset)
    digest = written.hexdigest()
    keys = [key.encode("utf-8", "surrogateescape") for key in rows["key"]]
    TarIndex(np.array(keys, dtype=bytes) if keys else np.array([], dtype="S1"),
             np.array(starts, dtype=np.int64)).save(index_path(directory / name), digest)
    atomic_write_bytes(directory / f"{job.index:06d}.parquet", _parquet_bytes(rows, target_column))
    stats = ShardStats(name, len(rows["key"]), written.bytes, digest, job.fingerprint(),
                       dict(sorted(skipped.items())), dict(sorted(converted.items())), skipped_samples,
                       dict(sorted(renamed.items())))
    atomic_write_json(stats_path(directory, job.index), asdict(stats))
    return stats


def finished_shard(directory: Path, job: ShardJob, verify: bool = False) -> ShardStats | None:
    """The stats of shard ``job.index`` if it is complete and made from this job; else ``None``.

    A shard is trusted by its size and the sha256 its stats and index record (a few ``stat`` calls), since it
    was written under a temporary name and renamed whole; ``verify`` hashes the tar again (for a file system
    or copy one does not trust). A shard written before indexes existed gets its index here, once its bytes
    are checked against the recorded sha256."""
    directory = Path(directory)
    try:
        stats = ShardStats(**json.loads(stats_path(directory, job.index).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    tar_path = directory / stats.name
    if (stats.fingerprint != job.fingerprint() or not tar_path.is_file()
            or not (directory / f"{job.index:06d}.parquet").is_file() or tar_path.stat().st_size != stats.bytes):
        return None
    try:
        index = TarIndex.load(index_path(tar_path), stats.sha256)
    except ValueError:
        index = None
    if index is None or verify:
        if sha256_file(tar_path) != stats.sha256:
            return None
    if index is None:
        scanned = TarIndex.scan(tar_path)
        if len(scanned) != stats.count:
            return None
        scanned.save(index_path(tar_path), stats.sha256)
    return stats


def write_shards(directory: Path, plan: DatasetPlan, indices: Iterable[int], workers: int = 1,
                 log: logging.Logger | None = None, desc: str = "shards",
                 verify: bool = False) -> dict[int, ShardStats]:
    """Write the shards ``indices`` of ``plan`` that are not finished yet; return every one's stats.

    This is what a Slurm array task calls with its range; ``build_shards`` is the same for all shards.
    ``verify`` re-hashes the finished ones, in ``workers`` processes (see :func:`finished_shard`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    indices = list(indices)
    results: dict[int, ShardStats] = {}
    started = [index for index in indices if stats_path(directory, index).exists()]
    if started:
        checked = _check_all(directory, plan, started, workers if verify else 1, verify)
        what = "verifying" if verify else "checking"
        for index, done in progress(checked, total=len(started), desc=f"{desc}: {what} finished shards", log=log):
            if done is not None:
                results[index] = done
    missing = [index for index in indices if index not in results]
    if results and log:
        log.info("%s: kept %d finished shards, %d to write", desc, len(results), len(missing))
    if missing:
        written = _write_all(directory, plan, missing, workers)
        for index, stats in progress(written, total=len(missing), desc=f"{desc}: writing", log=log):
            results[index] = stats
    return results


def build_shards(directory: Path, plan: DatasetPlan, workers: int = 1, log: logging.Logger | None = None,
                 desc: str = "shards", verify: bool = False) -> list[ShardStats]:
    """Make every shard of ``plan`` exist and verify; drop temporaries and shards no longer planned.

    The manifest and the files derived from it go first, so a folder being rebuilt never looks finished.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in [*INDEX_FILES, *directory.glob(".*.tmp")]:
        (directory / leftover).unlink(missing_ok=True)
    for path in directory.iterdir():
        match = SHARD_FILE.match(path.name)
        if match and int(match.group(1)) >= plan.num_shards:
            path.unlink()
    results = write_shards(directory, plan, range(plan.num_shards), workers, log, desc, verify)
    return [results[index] for index in range(plan.num_shards)]


def finish_dataset(directory: Path, plan: DatasetPlan, stats: list[ShardStats], *, name: str, kind: str,
                   split: str, config: dict[str, Any], classes: list[ClassInfo] | None = None) -> Manifest:
    """Write the manifest (and the files derived from it) for shards that ``build_shards`` made."""
    skipped = Counter(plan.skipped)
    converted: Counter = Counter()
    renamed: Counter = Counter()
    for shard in stats:
        skipped.update(shard.skipped)
        converted.update(shard.converted)
        renamed.update(shard.renamed)
    manifest = Manifest(name=name, kind=kind, split=split, shards=[shard.info() for shard in stats],
                        classes=classes or [], skipped=dict(skipped), converted=dict(converted),
                        renamed=dict(renamed), config=config)
    manifest.save(directory)
    return manifest


def dataset_report(manifest: Manifest, plan: DatasetPlan, stats: list[ShardStats]) -> dict[str, Any]:
    """A stage report entry: counts by reason and the skipped samples themselves (up to a limit)."""
    samples = list(plan.skipped_samples)
    for shard in stats:
        samples.extend(shard.skipped_samples)
    return {"name": manifest.name, "samples": manifest.num_samples, "shards": len(manifest.shards),
            "bytes": sum(shard.bytes for shard in manifest.shards), "skipped": manifest.skipped,
            "skipped_total": sum(manifest.skipped.values()), "converted": manifest.converted,
            "renamed": manifest.renamed,
            "skipped_samples": samples[:REPORT_SAMPLE_LIMIT],
            "skipped_samples_truncated": len(samples) > REPORT_SAMPLE_LIMIT}


def default_workers(workers: int) -> int:
    """``workers`` if set, else one per CPU this process may use."""
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_all(directory: Path, plan: DatasetPlan, indices: list[int], workers: int
               ) -> Iterator[tuple[int, ShardStats]]:
    """Write shards in this process (``workers <= 1``) or in a pool of light processes."""
    calls = ((index, (directory, plan.job(index))) for index in indices)
    yield from run_all(write_shard, calls, workers if len(indices) > 1 else 1)


def _check_all(directory: Path, plan: DatasetPlan, indices: list[int], workers: int, verify: bool
               ) -> Iterator[tuple[int, ShardStats | None]]:
    calls = ((index, (directory, plan.job(index), verify)) for index in indices)
    yield from run_all(finished_shard, calls, workers if len(indices) > 1 else 1)


def _add_sample(tar: tarfile.TarFile, sample: Sample, target_ext: str) -> None:
    """Append one sample's members in the fixed order."""
    if isinstance(sample.target, bytes):
        target_bytes = sample.target
    else:
        target_bytes = sample.target.encode("utf-8") if target_ext == "txt" else str(int(sample.target)).encode()
    meta = {"uid": sample.uid, "width": sample.width, "height": sample.height, **sample.meta}
    meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    for ext, data in (("jpg", sample.image), (target_ext, target_bytes), ("json", meta_bytes)):
        info = tarfile.TarInfo(f"{sample.key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


def _parquet_bytes(rows: dict[str, list], target: str) -> bytes:
    schema = pa.schema([("key", pa.string()), ("uid", pa.string()),
                        (target, {"label": pa.int64(), "mask": pa.binary()}.get(target, pa.string())),
                        ("width", pa.int32()), ("height", pa.int32())])
    buffer = io.BytesIO()
    pq.write_table(pa.table(rows, schema=schema), buffer)
    return buffer.getvalue()
