"""Stage ``finetune``: supervised fine-tuning of an exported backbone (supervised, DINO or CLIP vision tower).

The ``pretrain`` stage's engine does the training in ``supervised`` mode, so fine-tuning has the same
DeepSpeed engine, resume, fault and checkpoint contract; only the model differs: timm's own
``create_model("local-dir:<init>", pretrained=True, num_classes=N)`` builds the exported architecture with
its weights and a new classifier (position embeddings are resampled when ``supervised.aug.image_size``
differs from the export's). Images are normalised as the backbone was trained (mean/std from the export's
config). The recipe (``configs/recipes/finetune.yaml``) sets the paper's fine-tuning hyper-parameters: AdamW,
layer-wise lr decay, RandAugment, Mixup/CutMix, label smoothing, EMA.

At the end the fine-tuned weights (the EMA when kept) are exported to ``<stage>/export`` exactly as the
``export`` stage does, for ``evaluate`` (``model: '@finetune/export'``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config.types import InputPath, setting
from pipeline.data.loaders import LoaderSettings
from pipeline.errors import KopeError
from pipeline.export.exporter import load_trained_model
from pipeline.export.package import package_export
from pipeline.export.recipe import ModelRecipe
from pipeline.export.timm_format import CONFIG_FILE
from pipeline.stage import StageContext
from pipeline.train.checkpoint import CheckpointSettings
from pipeline.train.faults import FaultSettings
from pipeline.train.optim import OptimSettings
from pipeline.train.schedules import ScheduleSettings
from pipeline.train.tasks import SupervisedSettings
from stages import pretrain

EXPORT_DIR = "export"


@dataclass
class Settings:
    init: InputPath = setting(help="an export folder with config.json + model.safetensors, e.g. '@export'")
    data: InputPath = setting(help="sharded classification training set, e.g. '@shard_imagenet/train'")
    model_kwargs: dict[str, Any] = setting(default_factory=dict,
                                           help="extra timm arguments for fine-tuning, e.g. {drop_path_rate: 0.1}")
    global_batch_size: int = setting(1024, ge=1, help="samples per optimizer step over all ranks")
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    steps: int = setting(0, ge=0, help="optimizer steps to train (set one of steps, epochs, samples)")
    epochs: float = setting(0.0, ge=0, help="loader epochs to train")
    samples: int = setting(0, ge=0, help="samples to train on, over all ranks")
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    zero_stage: int = setting(0, ge=0, le=2, help="DeepSpeed ZeRO stage 0-2 (the EMA needs full weights)")
    precision: Literal["auto", "fp32", "bf16", "bf16_autocast"] = setting("auto", help="as in pretrain")
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    log_every_steps: int = setting(50, ge=1, help="steps between log lines and TensorBoard points")
    faults: FaultSettings = field(default_factory=FaultSettings)
    seed: int | None = setting(None, ge=0, help="seed (default: the pipeline's seed)")
    supervised: SupervisedSettings = field(default_factory=SupervisedSettings)


def init_model(init: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The timm name that loads the export, the arguments supervised training fixes, and the normalisation
    the backbone was trained with.

    A KoPE backbone from self-supervised training learnt its Kuramoto step γ; supervised training keeps γ
    fixed (the paper's recipe), at the learnt value the weights carry.
    """
    config_path = init / CONFIG_FILE
    if not config_path.is_file():
        raise KopeError(f"{config_path}: missing (finetune.init must be an export folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    pretrained_cfg = config.get("pretrained_cfg", {})
    norm = {key: tuple(pretrained_cfg[key]) for key in ("mean", "std") if key in pretrained_cfg}
    fixed = {"learnable_gamma": False} if config.get("model_args", {}).get("learnable_gamma") else {}
    return f"local-dir:{init.resolve()}", fixed, norm


def pretrain_settings(settings: Settings, ctx: StageContext) -> pretrain.Settings:
    """This stage as a supervised ``pretrain`` run whose model is the exported backbone."""
    name, fixed, norm = init_model(ctx.input_path(settings.init))
    aug = dataclasses.replace(settings.supervised.aug, **norm)
    kwargs = {**fixed, **settings.model_kwargs, "pretrained": True}
    return pretrain.Settings(
        mode="supervised", data=settings.data,
        model=pretrain.ModelSettings(name=name, kwargs=kwargs),
        global_batch_size=settings.global_batch_size, loader=settings.loader, steps=settings.steps,
        epochs=settings.epochs, samples=settings.samples, optim=settings.optim, schedule=settings.schedule,
        zero_stage=settings.zero_stage, precision=settings.precision, checkpoint=settings.checkpoint,
        log_every_steps=settings.log_every_steps, faults=settings.faults, seed=settings.seed,
        supervised=dataclasses.replace(settings.supervised, aug=aug),
    )


def export_finetuned(ctx: StageContext, training_metrics: dict[str, Any]) -> dict[str, Any]:
    """Export the last checkpoint (EMA weights when kept) to ``<stage>/export``, checked like ``export``."""
    recipe = ModelRecipe.load(ctx.out_dir)
    trained = load_trained_model(ctx.out_dir / "checkpoints", recipe)
    return package_export(trained, recipe, ctx.out_dir / EXPORT_DIR, ctx, training_metrics=training_metrics)


def run(settings: Settings, ctx: StageContext) -> dict[str, Any]:
    outputs = pretrain.run(pretrain_settings(settings, ctx), ctx)
    if not ctx.is_main:
        return outputs
    exported = export_finetuned(ctx, outputs)
    headline = {key: outputs[key] for key in ("val_top1", "val_top5") if key in outputs}
    return {**headline, "export": exported["export"], "export_weights": exported["weights"],
            "export_sha256": exported["sha256"], **outputs}
