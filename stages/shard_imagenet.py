"""Stage ``shard_imagenet``: an ImageNet-style tree -> one WebDataset shard folder per split.

Outputs ``<split>/`` (shards, per-shard parquet and stats, ``manifest.json``, ``sizes.json``, ``_info.json``,
``classes.tsv``), ``report.json`` (skipped, converted and renamed samples by reason, for every split) and one
``_info.json`` listing every split with timm's names (``val`` also as ``validation``), so the stage's folder
is the ``root`` of ``timm.data.create_dataset("wds/<name>", root=..., split=...)``.

Shard i is a pure function of the settings and the listed files, so a re-run after a crash keeps finished
shards and writes the rest, byte-identical to an uninterrupted run. On a cluster the stage can run as an
array job (:func:`run_part`, one slice of the shards per task); then :func:`run` checks every shard (by size
and recorded digest; ``verify_shards`` hashes them again, in parallel), writes any that is missing, and writes
the manifests.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.core.fsutil import atomic_write_json
from pipeline.core.stage import StageContext
from pipeline.data.imagenet_source import ImageNetPlan, plan_split, read_classes, read_val_labels
from pipeline.data.images import ImageOptions
from pipeline.data.manifest import ClassInfo, Manifest, save_timm_splits
from pipeline.data.settings import ImageNetShardSettings
from pipeline.data.shard_writer import (
    build_shards,
    dataset_report,
    default_workers,
    finish_dataset,
    write_shards,
)

REPORT_FILE = "report.json"


def plans(settings: ImageNetShardSettings, ctx: StageContext) -> tuple[list[ClassInfo], dict[str, ImageNetPlan]]:
    """The class list and every split's plan; a pure function of the settings and the tree."""
    root = ctx.input_path(settings.source)
    names = ctx.input_path(settings.class_names) if settings.class_names else None
    classes = read_classes(root, names)
    labels = None
    if settings.val_labels:
        synsets = ctx.input_path(settings.val_synsets) if settings.val_synsets else None
        labels = read_val_labels(ctx.input_path(settings.val_labels), synsets)
    image = ImageOptions(max_pixels=settings.max_pixels, resize_shorter=settings.resize_shorter,
                         quality=settings.quality)
    return classes, {
        split: plan_split(root, split, classes, seed=settings.seed, samples_per_shard=settings.samples_per_shard,
                          shard_bytes=settings.shard_bytes, image=image, source=settings.name, labels=labels)
        for split in settings.splits
    }


def run_part(settings: ImageNetShardSettings, ctx: StageContext, part: int, parts: int) -> None:
    """One array task's share: the shards ``i`` with ``i % parts == part`` of every split (unless finished)."""
    _, split_plans = plans(settings, ctx)
    for split, plan in split_plans.items():
        write_shards(ctx.out_dir / split, plan, range(part, plan.num_shards, parts),
                     default_workers(settings.workers), ctx.log, desc=f"{ctx.name}/{split} part {part}/{parts}",
                     verify=settings.verify_shards)


def run(settings: ImageNetShardSettings, ctx: StageContext) -> dict:
    if not ctx.is_main:
        ctx.log.info("sharding runs on rank 0 with a process pool; rank %d has nothing to do", ctx.rank)
        return {}
    classes, split_plans = plans(settings, ctx)
    outputs: dict = {}
    report = {}
    manifests: dict[str, Manifest] = {}
    for split, plan in split_plans.items():
        directory = ctx.out_dir / split
        stats = build_shards(directory, plan, default_workers(settings.workers), ctx.log, f"{ctx.name}/{split}",
                             verify=settings.verify_shards)
        manifest = finish_dataset(directory, plan, stats, name=f"{settings.name}-{split}", kind="classification",
                                  split=split, config=asdict(settings), classes=classes)
        report[split] = dataset_report(manifest, plan, stats)
        manifests[split] = manifest
        ctx.log.info("%s: %d samples in %d shards, skipped %s, converted %s, renamed %s", split,
                     manifest.num_samples, len(manifest.shards), manifest.skipped or "none",
                     manifest.converted or "none", manifest.renamed or "none")
        outputs[split] = _relative(directory, ctx)
        outputs[f"{split}_samples"] = manifest.num_samples
    atomic_write_json(ctx.out_dir / REPORT_FILE, report)
    save_timm_splits(ctx.out_dir, settings.name, manifests)
    outputs["report"] = _relative(ctx.out_dir / REPORT_FILE, ctx)
    outputs["num_classes"] = len(classes)
    return outputs


def _relative(path: Path, ctx: StageContext) -> str:
    return str(path.relative_to(ctx.run_dir))
