"""Stage ``export``: a training stage's checkpoint as a folder that timm and open_clip load with their own calls.

Reads ``<source>/model.json`` and ``<source>/checkpoints/`` (the latest checkpoint, or ``tag``), consolidates
ZeRO shards to one fp32 state dict, takes the EMA or teacher weights where the run kept them (``weights``),
and writes into the stage folder: ``config.json`` + ``model.safetensors`` (timm), for CLIP runs also
``open_clip_config.json`` + ``open_clip_model.safetensors``, a model card ``README.md`` and ``SHA256SUMS``.
Every model is reloaded through its library's call and compared with the checkpoint's before the stage ends.
One process does the work; other ranks (if any) return at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config.types import InputPath, is_stage_ref, setting, split_stage_ref
from pipeline.export.exporter import load_trained_model
from pipeline.export.package import package_export
from pipeline.export.recipe import ModelRecipe
from pipeline.export.weights import WeightsChoice
from pipeline.run_state import RunState
from pipeline.stage import StageContext

CHECKPOINTS = "checkpoints"


@dataclass
class Settings:
    source: InputPath = setting(help="the training stage's folder (model.json, checkpoints/), e.g. '@pretrain'")
    tag: str = setting("", help="checkpoint folder to export, e.g. step_00001000 ('': the latest)")
    weights: WeightsChoice = setting("auto", help="auto: EMA/teacher weights when the run kept them, else the "
                                                  "trained ones; averaged: require them; trained: the student")
    tolerance: float = setting(1e-5, gt=0, help="largest output difference allowed when reloading the export")


def run(settings: Settings, ctx: StageContext) -> dict[str, Any]:
    if not ctx.is_main:
        return {}
    source = ctx.input_path(settings.source)
    recipe = ModelRecipe.load(source)
    trained = load_trained_model(source / CHECKPOINTS, recipe, settings.tag or None, settings.weights)
    training_metrics = {}
    if is_stage_ref(settings.source):
        state = RunState(ctx.run_dir).read(split_stage_ref(settings.source)[0])
        training_metrics = state.outputs if state is not None else {}
    return package_export(trained, recipe, ctx.out_dir, ctx, training_metrics=training_metrics,
                          tolerance=settings.tolerance)
