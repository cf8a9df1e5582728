"""Stage ``shard_imagenet``: an ImageNet-style tree -> one WebDataset shard folder per split.

Outputs ``<split>/`` (shards, per-shard parquet and stats, ``manifest.json``, ``sizes.json``, ``_info.json``,
``classes.tsv``), ``report.json`` (skipped, converted and renamed samples by reason, for every split) and one
``_info.json`` listing every split with timm's names (``val`` also as ``validation``), so the stage's folder
is the ``root`` of ``timm.data.create_dataset("wds/<name>", root=..., split=...)``.

Shard i is a pure function of the settings and the listed files, so a re-run after a crash keeps finished
shards and writes the rest, byte-identical to an uninterrupted run. On a cluster the stage can run as an
array job (:func:`run_part`, one slice of the shards per task); then :func:`run` verifies every shard
(writing any that is missing) and writes the manifests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config.types import InputPath, setting
from pipeline.data.imagenet_source import ImageNetPlan, plan_split, read_classes, read_val_labels
from pipeline.data.images import PIL_DEFAULT_MAX_PIXELS, ImageOptions
from pipeline.data.manifest import ClassInfo, Manifest, save_timm_splits
from pipeline.data.shard_writer import (
    build_shards,
    dataset_report,
    default_workers,
    finish_dataset,
    write_shards,
)
from pipeline.fsutil import atomic_write_json
from pipeline.stage import StageContext

REPORT_FILE = "report.json"


@dataclass
class Settings:
    source: InputPath = setting(help="root with train/<wnid>/* and val/ (class folders, or flat with val_labels)")
    splits: list[str] = setting(default_factory=lambda: ["train", "val"], help="split folders to shard")
    val_labels: InputPath | None = setting(
        None, help="labels of a flat split: LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt "
                   "(with val_synsets) or 'file wnid' lines")
    val_synsets: InputPath | None = setting(
        None, help="ILSVRC2012 class id -> wnid: the devkit's meta.mat or one wnid per line in id order")
    class_names: InputPath | None = setting(
        None, help="class names (classes.tsv, LOC_synset_mapping.txt or words.txt); default: found in source")
    name: str = setting("imagenet", help="dataset name: manifests are named <name>-<split>")
    seed: int = setting(0, ge=0, help="seed of the sample order (every shard mixes classes)")
    samples_per_shard: int = setting(1000, ge=1, help="inputs per shard (skipped ones leave a shard smaller)")
    shard_bytes: int = setting(0, ge=0, help="if > 0: cut shards by this many source bytes instead")
    resize_shorter: int = setting(0, ge=0, help="0: keep the original JPEG bytes; else re-encode larger images "
                                                "with the shorter side at this many pixels")
    quality: int = setting(90, ge=1, le=100, help="JPEG quality of re-encoded and converted images")
    max_pixels: int = setting(PIL_DEFAULT_MAX_PIXELS, ge=1, help="larger images are skipped (decompression bombs)")
    workers: int = setting(0, ge=0, help="processes writing shards; 0: one per CPU")


def plans(settings: Settings, ctx: StageContext) -> tuple[list[ClassInfo], dict[str, ImageNetPlan]]:
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


def run_part(settings: Settings, ctx: StageContext, part: int, parts: int) -> None:
    """One array task's share: the shards ``i`` with ``i % parts == part`` of every split (unless finished)."""
    _, split_plans = plans(settings, ctx)
    for split, plan in split_plans.items():
        write_shards(ctx.out_dir / split, plan, range(part, plan.num_shards, parts),
                     default_workers(settings.workers), ctx.log, desc=f"{ctx.name}/{split} part {part}/{parts}")


def run(settings: Settings, ctx: StageContext) -> dict:
    if not ctx.is_main:
        ctx.log.info("sharding runs on rank 0 with a process pool; rank %d has nothing to do", ctx.rank)
        return {}
    classes, split_plans = plans(settings, ctx)
    outputs: dict = {}
    report = {}
    manifests: dict[str, Manifest] = {}
    for split, plan in split_plans.items():
        directory = ctx.out_dir / split
        stats = build_shards(directory, plan, default_workers(settings.workers), ctx.log, f"{ctx.name}/{split}")
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
