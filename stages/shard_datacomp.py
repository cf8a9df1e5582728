"""Stage ``shard_datacomp``: DataComp-style captioned data -> one WebDataset shard folder (``train/``).

Two modes. ``download``: metadata parquet(s) (uid, url, text, optional scores) are downloaded with
img2dataset into ``_download/`` (finished img2dataset shards survive a crash) and then resharded.
``reshard``: existing img2dataset / DataComp shards are resharded directly. Either way a uid subset and the
caption / size / aspect-ratio filters apply, the uid stays in every sample's json (as a string, whatever the
input's uid type), and ``report.json`` counts every dropped sample by reason and lists it (failed downloads
and rows dropped before the download included; uid-subset misses are only counted).

Downloads are bounded (:mod:`pipeline.data.fetch_limits`): each request must connect within
``connect_timeout_s`` and finish within ``timeout_s`` (a deadline for the whole request, not per read),
responses over ``max_response_bytes`` are abandoned while streaming, and only ``url_schemes`` are fetched.

With ``serve_local`` the metadata's folder is served on 127.0.0.1 while img2dataset runs and relative urls
are resolved against it: the demo downloads its images through the real downloader this way.

The stage's folder also gets a timm ``_info.json`` listing its split.

Output shards are a pure function of the settings and the downloaded shards, so a re-run keeps finished
shards and yields identical bytes. On a cluster a reshard can run as an array job (:func:`run_part`); then
:func:`run` verifies every shard (writing any that is missing) and writes the manifest.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from pipeline.core.fsutil import atomic_write_json
from pipeline.core.stage import StageContext
from pipeline.data.datacomp_source import (
    DownloadOptions,
    DropList,
    ReshardPlan,
    SampleFilters,
    download,
    plan_reshard,
    serve_folder,
    write_download_list,
)
from pipeline.data.fetch_limits import FetchLimits
from pipeline.data.images import ImageOptions
from pipeline.data.manifest import save_timm_splits
from pipeline.data.settings import DataCompShardSettings
from pipeline.data.shard_writer import (
    build_shards,
    dataset_report,
    default_workers,
    finish_dataset,
    write_shards,
)
from pipeline.data.uids import load_uid_subset

DATASET = "train"
DOWNLOAD_DIR = "_download"
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
        limits=FetchLimits(connect_timeout_s=settings.connect_timeout_s, deadline_s=settings.timeout_s,
                           max_bytes=settings.max_response_bytes, schemes=tuple(settings.url_schemes)))


def fetch(settings: DataCompShardSettings, ctx: StageContext) -> tuple[Path, DropList]:
    """The folder of img2dataset shards to reshard, and what was dropped before it (download mode)."""
    source = ctx.input_path(settings.source)
    if settings.mode == "reshard":
        return source, DropList()
    subset = load_uid_subset(ctx.input_path(settings.uid_subset)) if settings.uid_subset else None
    work = ctx.out_dir / DOWNLOAD_DIR
    served = source if source.is_dir() else source.parent
    with serve_folder(served) if settings.serve_local else nullcontext(None) as base_url:
        rows, dropped = write_download_list(
            source, work / "input.parquet", url_col=settings.url_col, caption_col=settings.caption_col,
            uid_col=settings.uid_col, extra_columns=settings.extra_columns, subset=subset, base_url=base_url,
            schemes=tuple(settings.url_schemes))
        ctx.log.info("downloading %d images with img2dataset into %s", rows, work / "shards")
        download(work / "input.parquet", work / "shards", rows, download_options(settings), settings.extra_columns)
    return work / "shards", dropped


def plan(settings: DataCompShardSettings, ctx: StageContext, folder: Path, dropped_before: DropList) -> ReshardPlan:
    subset = None
    if settings.mode == "reshard" and settings.uid_subset:
        subset = load_uid_subset(ctx.input_path(settings.uid_subset))
    image = ImageOptions(max_pixels=settings.max_pixels, quality=settings.quality)
    return plan_reshard(folder, samples_per_shard=settings.samples_per_shard, filters=sample_filters(settings),
                        image=image, source=settings.name, extra_fields=tuple(settings.extra_columns),
                        subset=subset, dropped_before=dropped_before)


def run_part(settings: DataCompShardSettings, ctx: StageContext, part: int, parts: int) -> None:
    """One array task's share of a reshard: output shards ``i`` with ``i % parts == part``. A download runs
    as one job (img2dataset spreads it over processes and threads itself), so its parts have nothing to do."""
    if settings.mode == "download":
        ctx.log.info("download mode: the stage's final job downloads and shards; part %d has nothing to do", part)
        return
    reshard = plan(settings, ctx, ctx.input_path(settings.source), DropList())
    write_shards(ctx.out_dir / DATASET, reshard, range(part, reshard.num_shards, parts),
                 default_workers(settings.workers), ctx.log, desc=f"{ctx.name} part {part}/{parts}")


def run(settings: DataCompShardSettings, ctx: StageContext) -> dict:
    if not ctx.is_main:
        ctx.log.info("sharding runs on rank 0 with a process pool; rank %d has nothing to do", ctx.rank)
        return {}
    folder, dropped_before = fetch(settings, ctx)
    reshard = plan(settings, ctx, folder, dropped_before)
    directory = ctx.out_dir / DATASET
    stats = build_shards(directory, reshard, default_workers(settings.workers), ctx.log, desc=ctx.name)
    manifest = finish_dataset(directory, reshard, stats, name=settings.name, kind="captions", split=DATASET,
                              config=asdict(settings))
    atomic_write_json(ctx.out_dir / REPORT_FILE, {DATASET: dataset_report(manifest, reshard, stats)})
    save_timm_splits(ctx.out_dir, settings.name, {DATASET: manifest})
    ctx.log.info("%d samples in %d shards, skipped %s, converted %s", manifest.num_samples, len(manifest.shards),
                 manifest.skipped or "none", manifest.converted or "none")
    if settings.mode == "download" and not settings.keep_download:
        shutil.rmtree(ctx.out_dir / DOWNLOAD_DIR, ignore_errors=True)
    return {DATASET: _relative(directory, ctx), f"{DATASET}_samples": manifest.num_samples,
            "report": _relative(ctx.out_dir / REPORT_FILE, ctx)}


def _relative(path: Path, ctx: StageContext) -> str:
    return str(path.relative_to(ctx.run_dir))
