"""Stage ``finetune``: supervised fine-tuning of an exported backbone (supervised, DINO or CLIP vision tower), on
the same training library as ``pretrain`` (:func:`pipeline.train.run.run_training`): the same DeepSpeed engine,
resume, fault and checkpoint contract. timm builds the exported architecture with its weights and a new
classifier (``local-dir:``; position embeddings are resampled when ``supervised.aug.image_size`` differs from the
export's). Images are normalised as the backbone was trained (mean/std from the export's config). The recipe
(``configs/recipes/finetune.yaml``) sets the paper's fine-tuning hyper-parameters.

At the end the fine-tuned weights (the EMA when kept) are exported to ``<stage>/export`` exactly as the ``export``
stage does, for ``evaluate`` (``model: '@finetune/export'``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import KopeError
from pipeline.core.stage import StageContext
from pipeline.export.package import export_training_stage
from pipeline.export.timm_format import CONFIG_FILE
from pipeline.train.run import run_training
from pipeline.train.settings import FinetuneSettings
from pipeline.train.tasks import SupervisedTask, TimmModel

EXPORT_DIR = "export"


def backbone(folder: Path, overrides: dict[str, Any]) -> tuple[TimmModel, dict[str, tuple[float, ...]]]:
    """The exported backbone to start from, and the normalisation it was trained with.

    A self-supervised KoPE backbone learnt its Kuramoto step γ; supervised training keeps γ fixed (the paper's
    recipe) at the learnt value the weights carry.
    """
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise KopeError(f"{config_path}: missing (finetune.init must be an export folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    args = dict(config.get("model_args", {}))
    pretrained_cfg = config.get("pretrained_cfg", {})
    norm = {key: tuple(pretrained_cfg[key]) for key in ("mean", "std") if key in pretrained_cfg}
    fixed = {"learnable_gamma": False} if args.get("learnable_gamma") else {}
    return TimmModel(config["architecture"], {**fixed, **overrides}, folder, args), norm


def run(settings: FinetuneSettings, ctx: StageContext) -> dict[str, Any]:
    model, norm = backbone(ctx.input_path(settings.init), dict(settings.model_kwargs))
    supervised = dataclasses.replace(settings.supervised, aug=dataclasses.replace(settings.supervised.aug, **norm))
    val = supervised.val_data
    task = SupervisedTask(supervised, model=model, data_dir=ctx.input_path(settings.data), loader=settings.loader,
                          seed=ctx.seed, val_dir=ctx.input_path(val) if val else None)
    outputs = run_training(settings, task, ctx)
    if not ctx.is_main:
        return outputs
    exported = export_training_stage(ctx.out_dir, ctx.out_dir / EXPORT_DIR, ctx, training_metrics=outputs)
    headline = {key: outputs[key] for key in ("val_top1", "val_top5") if key in outputs}
    return {**headline, "export": exported["export"], "export_weights": exported["weights"],
            "export_sha256": exported["sha256"], **outputs}
