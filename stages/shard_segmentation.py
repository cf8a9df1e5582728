"""Stage ``shard_segmentation``: an ADE20K-style tree -> one WebDataset shard folder per split.

Outputs ``<folder>/`` per split (``splits`` maps ADE20K's ``training``/``validation`` to ``train``/``val``):
shards of ``<key>.jpg`` + ``<key>.seg.png`` (class indices, 255 ignored) + ``<key>.json``, per-shard parquet and
stats, ``manifest.json`` (kind ``segmentation``, the class list), ``sizes.json``, ``_info.json`` and
``classes.tsv``; and ``report.json`` (skipped and converted samples by reason, for every split). The pairs and
their checks are :mod:`pipeline.data.segmentation_source`; writing, resuming and verifying shards is the same
machinery as ``shard_imagenet`` (:mod:`pipeline.data.shard_writer`), so a re-run keeps finished shards and an
array job (:func:`run_part`) writes slices of them.
"""

from __future__ import annotations

from dataclasses import asdict

from pipeline.core.fsutil import atomic_write_json
from pipeline.core.stage import StageContext
from pipeline.data.images import ImageOptions
from pipeline.data.manifest import ClassInfo
from pipeline.data.segmentation_source import SegmentationPlan, plan_segmentation_split, read_segmentation_classes
from pipeline.data.settings import SegmentationShardSettings
from pipeline.data.shard_writer import build_shards, dataset_report, default_workers, finish_dataset, write_shards

REPORT_FILE = "report.json"


def plans(settings: SegmentationShardSettings, ctx: StageContext
          ) -> tuple[list[ClassInfo], dict[str, SegmentationPlan]]:
    """The class list and every split's plan (by output folder); a pure function of the settings and the tree."""
    root = ctx.input_path(settings.source)
    names = ctx.input_path(settings.class_names) if settings.class_names else None
    classes = read_segmentation_classes(root, names, settings.num_classes)
    image = ImageOptions(max_pixels=settings.max_pixels, quality=settings.quality)
    return classes, {
        folder: plan_segmentation_split(root, split, seed=settings.seed, samples_per_shard=settings.samples_per_shard,
                                        image=image, num_classes=settings.num_classes,
                                        reduce_zero_label=settings.reduce_zero_label, source=settings.name)
        for split, folder in settings.splits.items()
    }


def run_part(settings: SegmentationShardSettings, ctx: StageContext, part: int, parts: int) -> None:
    """One array task's share: the shards ``i`` with ``i % parts == part`` of every split (unless finished)."""
    _, split_plans = plans(settings, ctx)
    for folder, plan in split_plans.items():
        write_shards(ctx.out_dir / folder, plan, range(part, plan.num_shards, parts),
                     default_workers(settings.workers), ctx.log, desc=f"{ctx.name}/{folder} part {part}/{parts}")


def run(settings: SegmentationShardSettings, ctx: StageContext) -> dict:
    if not ctx.is_main:
        return {}
    classes, split_plans = plans(settings, ctx)
    outputs: dict = {}
    report = {}
    for folder, plan in split_plans.items():
        directory = ctx.out_dir / folder
        stats = build_shards(directory, plan, default_workers(settings.workers), ctx.log, f"{ctx.name}/{folder}")
        manifest = finish_dataset(directory, plan, stats, name=f"{settings.name}-{folder}", kind="segmentation",
                                  split=folder, config=asdict(settings), classes=classes)
        report[folder] = dataset_report(manifest, plan, stats)
        ctx.log.info("%s: %d image/mask pairs in %d shards, skipped %s, converted %s", folder, manifest.num_samples,
                     len(manifest.shards), manifest.skipped or "none", manifest.converted or "none")
        outputs[folder] = str(directory.relative_to(ctx.run_dir))
        outputs[f"{folder}_samples"] = manifest.num_samples
    atomic_write_json(ctx.out_dir / REPORT_FILE, report)
    outputs["report"] = str((ctx.out_dir / REPORT_FILE).relative_to(ctx.run_dir))
    outputs["num_classes"] = len(classes)
    return outputs
