"""Stage ``shard_datacomp``: DataComp-style captioned data -> one WebDataset shard folder (``train/``).

Two modes. ``download``: metadata parquet(s) (uid, url, text, optional scores) are downloaded with
img2dataset into ``_download/`` in chunks of ``download_chunk_rows`` rows (:mod:`pipeline.data.datacomp_download`)
and then resharded. ``reshard``: existing img2dataset / DataComp shards are resharded directly. Either way a
uid subset and the caption / size / aspect-ratio filters apply, the uid stays in every sample's json (as a
string, whatever the input's uid type), and ``report.json`` counts every dropped sample by reason and lists it
(failed downloads and rows dropped before the download included; uid-subset misses are only counted).

On Slurm the stage runs as an array job (:func:`run_part`) and then one job (:func:`run`):

* download: array task ``part`` downloads the chunks ``c % parts == part``, each into its own folder with
  img2dataset in incremental mode, so a requeued task resumes where it stopped; the final job finds every
  chunk done (downloading any that is not), plans the reshard once and writes the shards with its process pool.
* reshard: the first task to arrive plans (the others wait for it on a file lock) and saves the plan in
  ``_plan/``; every task then writes the output shards ``i % parts == part`` from its slice of the plan, and
  the final job checks them and writes the manifest.

Which chunk or shard a task handles is a pure function of the settings, and the output shards are a pure
function of the settings and the downloaded shards, so a rerun or requeue never downloads a chunk twice and
the shards are byte-identical whatever the number of parts.

Downloads are bounded (:mod:`pipeline.data.fetch_limits`): each request must connect within
``connect_timeout_s`` and finish within ``timeout_s`` (a deadline for the whole request, not per read),
responses over ``max_response_bytes`` are abandoned while streaming, and only ``url_schemes`` are fetched.
With ``serve_local`` the metadata's folder is served on 127.0.0.1 while img2dataset runs and relative urls
are resolved against it: the demo downloads its images through the real downloader this way.

The stage's folder also gets a timm ``_info.json`` listing its split.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

from pipeline.core.fsutil import atomic_write_json
from pipeline.core.stage import StageContext
from pipeline.data.datacomp_download import (
    ChunkFolders,
    DownloadOptions,
    DownloadPlan,
    ListOptions,
    check_distributor,
    fetch_chunk,
    plan_download,
    serve_folder,
)
from pipeline.data.datacomp_source import (
    DropList,
    ReshardPlan,
    SampleFilters,
    list_input_shards,
    plan_key,
    plan_reshard,
)
from pipeline.data.fetch_limits import FetchLimits
from pipeline.data.images import ImageOptions
from pipeline.data.manifest import save_timm_splits
from pipeline.data.settings import DataCompShardSettings
from pipeline.data.shard_writer import build_shards, dataset_report, default_workers, finish_dataset, write_shards
from pipeline.data.uids import load_uid_subset

DATASET = "train"
DOWNLOAD_DIR = "_download"
PLAN_DIR = "_plan"
REPORT_FILE = "report.json"


def sample_filters(settings: DataCompShardSettings) -> SampleFilters:
    return SampleFilters(settings.min_caption_chars, settings.max_caption_chars, settings.min_image_size,
                         settings.max_aspect_ratio)


def download_options(settings: DataCompShardSettings) -> DownloadOptions:
    return DownloadOptions(
        image_size=settings.image_size, resize_mode=settings.resize_mode,
        resize_only_if_bigger=settings.resize_only_if_bigger, encode_quality=settings.encode_quality,
        min_image_size=settings.min_image_size, max_aspect_ratio=settings.max_aspect_ratio,
        max_pixels=settings.max_pixels, retries=settings.retries, thread_count=settings.thread_count,
        processes=settings.processes, samples_per_shard=settings.download_shard_size,
        distributor=settings.distributor,
        limits=FetchLimits(connect_timeout_s=settings.connect_timeout_s, deadline_s=settings.timeout_s,
                           max_bytes=settings.max_response_bytes, schemes=tuple(settings.url_schemes)))


def list_options(settings: DataCompShardSettings) -> ListOptions:
    return ListOptions(settings.url_col, settings.caption_col, settings.uid_col, tuple(settings.extra_columns),
                       tuple(settings.url_schemes))


def downloads(settings: DataCompShardSettings, ctx: StageContext) -> tuple[DownloadPlan, ChunkFolders]:
    return (plan_download(ctx.input_path(settings.source), settings.download_chunk_rows),
            ChunkFolders(ctx.out_dir / DOWNLOAD_DIR))


def fetch(settings: DataCompShardSettings, ctx: StageContext, chunks: Callable[[DownloadPlan], range]) -> None:
    """Download the chunks ``chunks(plan)`` that are not finished yet."""
    plan, folders = downloads(settings, ctx)
    check_distributor(settings.distributor)
    todo = [chunk for chunk in chunks(plan) if not folders.finished(chunk, settings.download_shard_size)]
    if not todo:
        return
    subset = load_uid_subset(ctx.input_path(settings.uid_subset)) if settings.uid_subset else None
    source = ctx.input_path(settings.source)
    served = source if source.is_dir() else source.parent
    with serve_folder(served) if settings.serve_local else nullcontext(None) as base_url:
        for chunk in todo:
            ctx.log.info("downloading chunk %d of %d with img2dataset into %s", chunk + 1, plan.num_chunks,
                         folders.shards(chunk))
            fetch_chunk(plan, chunk, folders, list_options(settings), download_options(settings), subset, base_url,
                        subset_id=str(settings.uid_subset or ""))


def reshard_plan(settings: DataCompShardSettings, ctx: StageContext) -> ReshardPlan:
    """The stage's reshard plan: made once by whichever process needs it first, saved in ``_plan/``, and read
    (its arrays mapped, not loaded) by every other task and the final job."""
    if settings.mode == "download":
        plan, folders = downloads(settings, ctx)
        folder, inputs, dropped = folders.shards_root, folders.input_shards(plan), folders.dropped(plan)
        subset = None  # applied before the download
    else:
        folder = ctx.input_path(settings.source)
        inputs, dropped = list_input_shards(folder), DropList()
        subset = ctx.input_path(settings.uid_subset) if settings.uid_subset else None
    image = ImageOptions(max_pixels=settings.max_pixels, quality=settings.quality)
    identity = {"samples_per_shard": settings.samples_per_shard, "filters": asdict(sample_filters(settings)),
                "image": asdict(image), "source": settings.name, "extra": list(settings.extra_columns),
                "subset": str(subset or ""), "dropped": dict(dropped.counts)}
    key = plan_key(folder, inputs, identity, files=(subset,) if subset else ())
    saved = ctx.out_dir / PLAN_DIR / key
    with _exclusive(ctx.out_dir / PLAN_DIR / ".lock"):
        if not (saved / "plan.json").is_file():
            ctx.log.info("planning the reshard of %d input shards", len(inputs))
            made = plan_reshard(folder, samples_per_shard=settings.samples_per_shard, filters=sample_filters(settings),
                                image=image, source=settings.name, extra_fields=tuple(settings.extra_columns),
                                subset=subset, dropped_before=dropped, inputs=inputs,
                                workers=default_workers(settings.workers))
            temporary = saved.with_name(f".{key}.{os.getpid()}.tmp")
            made.save(temporary)
            for stale in saved.parent.iterdir():  # plans of earlier settings or inputs
                if stale.is_dir() and not stale.name.startswith(".") and stale.name != key:
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(temporary, saved)
            except OSError:  # another task without a lock saved it first: the same plan
                shutil.rmtree(temporary, ignore_errors=True)
                if not (saved / "plan.json").is_file():
                    raise
    return ReshardPlan.load(saved)


def run_part(settings: DataCompShardSettings, ctx: StageContext, part: int, parts: int) -> None:
    """One array task's share: the download chunks ``c % parts == part`` (download), or the output shards
    ``i % parts == part`` (reshard)."""
    if settings.mode == "download":
        fetch(settings, ctx, lambda plan: plan.chunks_of_part(part, parts))
        return
    plan = reshard_plan(settings, ctx)
    write_shards(ctx.out_dir / DATASET, plan, range(part, plan.num_shards, parts),
                 default_workers(settings.workers), ctx.log, desc=f"{ctx.name} part {part}/{parts}",
                 verify=settings.verify_shards)


def run(settings: DataCompShardSettings, ctx: StageContext) -> dict:
    if not ctx.is_main:
        ctx.log.info("sharding runs on rank 0 with a process pool; rank %d has nothing to do", ctx.rank)
        return {}
    if settings.mode == "download":
        fetch(settings, ctx, lambda plan: range(plan.num_chunks))
    reshard = reshard_plan(settings, ctx)
    directory = ctx.out_dir / DATASET
    stats = build_shards(directory, reshard, default_workers(settings.workers), ctx.log, desc=ctx.name,
                         verify=settings.verify_shards)
    manifest = finish_dataset(directory, reshard, stats, name=settings.name, kind="captions", split=DATASET,
                              config=asdict(settings))
    atomic_write_json(ctx.out_dir / REPORT_FILE, {DATASET: dataset_report(manifest, reshard, stats)})
    save_timm_splits(ctx.out_dir, settings.name, {DATASET: manifest})
    ctx.log.info("%d samples in %d shards, skipped %s, converted %s", manifest.num_samples, len(manifest.shards),
                 manifest.skipped or "none", manifest.converted or "none")
    shutil.rmtree(ctx.out_dir / PLAN_DIR, ignore_errors=True)
    if settings.mode == "download" and not settings.keep_download:
        shutil.rmtree(ctx.out_dir / DOWNLOAD_DIR, ignore_errors=True)
    return {DATASET: _relative(directory, ctx), f"{DATASET}_samples": manifest.num_samples,
            "report": _relative(ctx.out_dir / REPORT_FILE, ctx)}


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (released by the kernel if the holder dies). On a file
    system without locks every task plans for itself: the same plan, written under a temporary name."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _relative(path: Path, ctx: StageContext) -> str:
    return str(path.relative_to(ctx.run_dir))
