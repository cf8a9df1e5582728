"""How the data path's fixed costs grow with shards, samples and files; prints one JSON object.

Each cost is measured at a few small sizes, its growth law fitted (time and memory as ``a * n**k``, k from the
smallest and largest size), and extrapolated to ImageNet-1K (1.28 M files, 1,300 shards of 1,000) and DataComp
medium (128 M samples, 13,000 shards of 10,000). Every cost has a reference measured in the same run:

* ``loader_index``: a reader opening a shard: the index written at shard time (one read) against a scan of
  the shard's member headers, per shard of 1,000 and 10,000 samples; per rank-epoch at ~3.4 openings per shard
  (a rank's workers touch a shard in about that many of their batches).
* ``datacomp_plan``: planning a reshard of img2dataset shards (their parquets), the time and the peak memory
  the plan takes (tracemalloc) against reading the same parquet columns with pyarrow; and the download list
  of one chunk, per metadata row.
* ``verify``: re-running over finished shards: the default check (size and recorded digest) against hashing
  every shard again, per shard of 100 MB.
* ``fingerprint``: the input fingerprint of a dataset folder (one ``os.scandir`` pass, one stat per entry)
  against three ``stat`` calls per entry (``Path.stat``, ``is_file``, ``is_dir``), per entry to two levels.

    python tools/bench_scale.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.fsutil import fingerprint_path
from pipeline.data.datacomp_download import write_download_list
from pipeline.data.datacomp_source import SampleFilters, plan_reshard
from pipeline.data.images import ImageOptions
from pipeline.data.shard_writer import Sample, finished_shard, write_shard
from pipeline.data.tar_index import TarIndex, index_path

TARGETS = {"imagenet": {"shards": 1_300, "samples": 1_281_167, "files": 1_281_167, "per_shard": 1_000},
           "datacomp": {"shards": 13_000, "samples": 128_000_000, "files": 13_000 * 3, "per_shard": 10_000}}
OPENINGS_PER_SHARD_PER_RANK_EPOCH = 3.4


def seconds_of(function: Callable[[], object], repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def growth(sizes: list[int], values: list[float]) -> dict[str, float]:
    """``value = a * n**k`` through the first and last point."""
    k = math.log(values[-1] / values[0]) / math.log(sizes[-1] / sizes[0]) if values[0] > 0 else 0.0
    return {"k": round(k, 2), "a": values[-1] / sizes[-1] ** k}


def extrapolate(law: dict[str, float], n: float) -> float:
    return law["a"] * n ** law["k"]


class _TinyJob:
    """A shard of ``count`` samples with small members: what an index costs depends on members, not bytes."""

    kind = "captions"

    def __init__(self, index: int, count: int, size: int = 64):
        self.index, self.count, self.size = index, count, size

    def fingerprint(self) -> str:
        return f"tiny-{self.index}-{self.count}-{self.size}"

    def items(self):
        for i in range(self.count):
            yield Sample(f"{self.index:05d}{i:05d}", bytes(self.size), f"caption {i}", f"u{i}", 8, 8, {})


def loader_index(folder: Path) -> dict:
    per_shard = {}
    for count in (1_000, 10_000):
        stats = write_shard(folder, _TinyJob(count, count))
        tar = folder / stats.name
        written = seconds_of(lambda tar=tar, stats=stats: TarIndex.load(index_path(tar), stats.sha256))
        scanned = seconds_of(lambda tar=tar: TarIndex.scan(tar))
        per_shard[count] = {"index_ms": round(written * 1e3, 3), "scan_ms": round(scanned * 1e3, 3),
                            "index_bytes": index_path(tar).stat().st_size, "index_reads": 1,
                            "scan_reads": 3 * count, "scan_vs_index": round(scanned / written, 1)}
    out = {"per_shard": per_shard}
    for name, target in TARGETS.items():
        shard = per_shard[target["per_shard"]]
        openings = target["shards"] * OPENINGS_PER_SHARD_PER_RANK_EPOCH
        out[name] = {"openings_per_rank_epoch": round(openings),
                     "index_s": round(openings * shard["index_ms"] / 1e3, 2),
                     "scan_s": round(openings * shard["scan_ms"] / 1e3, 2),
                     "index_read_gb": round(openings * shard["index_bytes"] / 1e9, 3),
                     "scan_reads": round(openings * shard["scan_reads"])}
    return out


def img2dataset_inputs(folder: Path, shards: int, rows: int) -> None:
    """``shards`` img2dataset-style parquets of ``rows`` successful rows each (and empty tars beside them:
    planning never opens a tar that has a parquet)."""
    rng = np.random.default_rng(shards)
    for shard in range(shards):
        uids = [rng.bytes(16).hex() for _ in range(rows)]
        table = pa.table({"key": [f"{shard:05d}{i:04d}" for i in range(rows)], "status": ["success"] * rows,
                          "error_message": [None] * rows, "uid": uids,
                          "caption": [f"a caption of sample {i}" for i in range(rows)],
                          "width": [512] * rows, "height": [384] * rows,
                          "original_width": [1024] * rows, "original_height": [768] * rows})
        pq.write_table(table, folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}.tar").touch()


def measured(function: Callable[[], object]) -> tuple[float, int, object]:
    tracemalloc.start()
    start = time.perf_counter()
    result = function()
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak, result


def datacomp_plan(folder: Path, workers: int) -> dict:
    sizes, times, peaks, held, reads = [], [], [], [], []
    rows = 1_000
    for shards in (10, 40, 160):
        inputs = folder / f"inputs{shards}"
        inputs.mkdir()
        img2dataset_inputs(inputs, shards, rows)
        seconds, peak, plan = measured(lambda inputs=inputs: plan_reshard(
            inputs, samples_per_shard=10_000, filters=SampleFilters(), image=ImageOptions(), source="bench",
            workers=workers))
        files = sorted(inputs.glob("*.parquet"))
        reads.append(seconds_of(lambda files=files: [pq.read_table(f, columns=["key", "uid", "caption"])
                                                     for f in files], repeat=1))
        sizes.append(shards * rows)
        times.append(seconds)
        peaks.append(peak)
        held.append(plan.shard_ids.nbytes + plan.rows.nbytes)
    time_law, peak_law = growth(sizes, times), growth(sizes, peaks)
    chunk = folder / "chunk.parquet"
    chunk_rows = 100_000
    pq.write_table(pa.table({"uid": [hashlib.md5(str(i).encode()).hexdigest() for i in range(chunk_rows)],
                             "url": [f"http://example.com/{i}.jpg" for i in range(chunk_rows)],
                             "text": [f"caption {i}" for i in range(chunk_rows)]}), chunk)
    list_seconds, list_peak, _ = measured(lambda: write_download_list(
        chunk, folder / "list.parquet", url_col="url", caption_col="text", uid_col="uid", extra_columns=[],
        subset=None, base_url=None))
    out = {"workers": workers, "samples": sizes, "seconds": [round(t, 3) for t in times],
           "pyarrow_read_seconds": [round(t, 3) for t in reads],
           "plan_vs_pyarrow_read": [round(t / r, 2) for t, r in zip(times, reads)],
           "peak_mb": [round(p / 1e6, 2) for p in peaks], "plan_bytes_per_sample": held[-1] / sizes[-1],
           "growth_time_k": time_law["k"], "growth_peak_k": peak_law["k"],
           "download_list": {"rows": chunk_rows, "seconds": round(list_seconds, 2),
                             "peak_bytes_per_row": round(list_peak / chunk_rows)}}
    target = TARGETS["datacomp"]["samples"]
    out["datacomp"] = {"plan_s": round(extrapolate(time_law, target), 1),
                       "peak_gb": round(extrapolate(peak_law, target) / 1e9, 2),
                       "plan_gb": round(held[-1] / sizes[-1] * target / 1e9, 2),
                       "download_list_peak_mb_per_1m_row_chunk": round(list_peak / chunk_rows * 1e6 / 1e6)}
    return out


class _BlobJob:
    """One shard of ``megabytes`` of incompressible samples, as the writer writes them."""

    kind = "captions"

    def __init__(self, index: int, megabytes: int):
        self.index, self.megabytes = index, megabytes

    def fingerprint(self) -> str:
        return f"blob-{self.index}-{self.megabytes}"

    def items(self):
        rng = np.random.default_rng(self.index)
        for i in range(self.megabytes * 10):
            yield Sample(f"{self.index:05d}{i:05d}", rng.bytes(100_000), "c", f"u{i}", 8, 8, {})


def verify(folder: Path) -> dict:
    job = _BlobJob(0, 100)
    write_shard(folder, job)
    trusted = seconds_of(lambda: finished_shard(folder, job))
    hashed = seconds_of(lambda: finished_shard(folder, job, verify=True))
    out = {"per_100mb_shard": {"trust_ms": round(trusted * 1e3, 3), "rehash_ms": round(hashed * 1e3, 1),
                               "rehash_vs_trust": round(hashed / trusted)}}
    for name, shards, megabytes in (("imagenet", 1_300, 110), ("datacomp", 13_000, 450)):
        out[name] = {"trust_s": round(shards * trusted, 1),
                     "rehash_serial_s": round(shards * hashed * megabytes / 100, 1)}
    return out


def three_stat_fingerprint(path: Path, max_depth: int = 2) -> str:
    """The reference: what the fingerprint cost before, three stat calls per entry."""
    entries = []

    def visit(current: Path, depth: int) -> None:
        stat = current.stat()
        entries.append(f"{current.relative_to(path)}|{stat.st_size if current.is_file() else 'd'}|"
                       f"{stat.st_mtime_ns}")
        if current.is_dir() and depth < max_depth:
            for child in sorted(current.iterdir()):
                visit(child, depth + 1)

    visit(path, 0)
    return hashlib.sha256("\n".join(entries).encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint(folder: Path) -> dict:
    sizes, ours, reference = [], [], []
    for entries in (5_000, 20_000, 80_000):
        root = folder / f"tree{entries}"
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        for i in range(entries // 100):
            (root / "train" / f"n{i:08d}").mkdir()
        for i in range(entries - entries // 100):
            (root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").touch()
        assert fingerprint_path(root) == three_stat_fingerprint(root)
        sizes.append(entries)
        ours.append(seconds_of(lambda root=root: fingerprint_path(root)))
        reference.append(seconds_of(lambda root=root: three_stat_fingerprint(root)))
    law = growth(sizes, ours)
    return {"entries": sizes, "scandir_s": [round(t, 4) for t in ours],
            "three_stat_s": [round(t, 4) for t in reference],
            "three_stat_vs_scandir": [round(r / t, 2) for t, r in zip(ours, reference)], "growth_k": law["k"],
            "imagenet_51k_entries_s": round(extrapolate(law, 51_000), 3),
            "note": "entries to two levels: an ImageNet root holds about 51 k (train's 1,000 class folders, "
                    "val's 50,000 files); the files inside class folders are three levels down"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="planning processes")
    parser.add_argument("--only", nargs="*", choices=["loader_index", "datacomp_plan", "verify", "fingerprint"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    benches = {"loader_index": loader_index, "datacomp_plan": lambda folder: datacomp_plan(folder, args.workers),
               "verify": verify, "fingerprint": fingerprint}
    report: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(benches):
            folder = Path(tmp) / name
            folder.mkdir()
            report[name] = benches[name](folder)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
