"""Stage ``finetune_segmentation``: an exported backbone (supervised, DINO or a CLIP vision tower) plus a
segmentation head (SETR-PUP or linear), fine-tuned on a segmentation dataset (``shard_segmentation``) with the
same training library as ``pretrain`` and ``finetune`` (:func:`pipeline.train.run.run_training`): the same
DeepSpeed engine, layer-wise lr decay, resume, fault and checkpoint contract.

timm builds the exported architecture with its weights (``local-dir:``), without classifier, at the training
crop (position embeddings resampled) and with ``dynamic_img_size`` for whole-image inference. A KoPE backbone
keeps a learnable Kuramoto step learnable (the paper trains γ in segmentation runs). Images are normalised as
the backbone was trained (mean/std from the export's config). The recipe for ADE20K is
``configs/recipes/segmentation.yaml``.

At the end the segmenter is exported to ``<stage>/export`` (``segmenter.json`` + ``model.safetensors``, reloaded
and compared), for ``evaluate`` with ``protocols: [segmentation]``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import KopeError
from pipeline.core.stage import StageContext
from pipeline.data.manifest import Manifest
from pipeline.data.segmentation_transforms import IGNORE_INDEX
from pipeline.export.segmenter_format import export_segmenter
from pipeline.export.timm_format import CONFIG_FILE
from pipeline.train.run import run_training
from pipeline.train.settings import FinetuneSegmentationSettings
from pipeline.train.tasks import TimmModel
from pipeline.train.tasks.segmentation import SegmentationTask

EXPORT_DIR = "export"


def backbone(folder: Path, overrides: dict[str, Any]) -> tuple[TimmModel, dict[str, tuple[float, ...]]]:
    """The exported backbone to start from, and the normalisation it was trained with."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise KopeError(f"{config_path}: missing (finetune_segmentation.init must be an export folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    pretrained_cfg = config.get("pretrained_cfg", {})
    norm = {key: tuple(pretrained_cfg[key]) for key in ("mean", "std") if key in pretrained_cfg}
    return TimmModel(config["architecture"], dict(overrides), folder, dict(config.get("model_args", {}))), norm


def run(settings: FinetuneSegmentationSettings, ctx: StageContext) -> dict[str, Any]:
    model, norm = backbone(ctx.input_path(settings.init), settings.model_kwargs)
    segmentation = dataclasses.replace(settings.segmentation,
                                       aug=dataclasses.replace(settings.segmentation.aug, **norm))
    data = ctx.input_path(settings.data)
    task = SegmentationTask(segmentation, backbone=model, data_dir=data, loader=settings.loader, seed=ctx.seed)
    outputs = run_training(settings, task, ctx)
    if not ctx.is_main:
        return outputs
    aug = segmentation.aug
    preprocess = {"mean": list(aug.mean), "std": list(aug.std), "crop_size": aug.crop_size, "scale": list(aug.scale),
                  "ignore_index": IGNORE_INDEX, "dataset": Manifest.load(data).name}
    exported = export_segmenter(ctx.out_dir, ctx.out_dir / EXPORT_DIR, classes=task.classes, preprocess=preprocess)
    return {**outputs, "export": ctx.relative(ctx.out_dir / EXPORT_DIR), "export_sha256": exported["sha256"],
            "export_max_abs_diff": exported["max_abs_diff"]}
