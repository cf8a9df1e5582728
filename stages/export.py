"""Stage ``export``: a training stage's checkpoint as a folder that timm and open_clip load with their own calls.

Reads ``<source>/model.json`` and ``<source>/checkpoints/`` (the latest checkpoint, or ``tag``), consolidates
ZeRO shards to one fp32 state dict, takes the weights the training task calls the model (the EMA or teacher where
the run kept them; ``weights``), and writes into the stage folder: ``config.json`` + ``model.safetensors`` (timm),
for CLIP runs also ``open_clip_config.json`` + ``open_clip_model.safetensors``, a model card ``README.md`` and
``SHA256SUMS``. Every model is reloaded through its library's call and compared with the checkpoint's before the
stage ends. One process does the work; other ranks (if any) return at once.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.config.types import is_stage_ref, split_stage_ref
from pipeline.core.stage import StageContext
from pipeline.export.package import export_training_stage
from pipeline.export.settings import ExportSettings


def run(settings: ExportSettings, ctx: StageContext) -> dict[str, Any]:
    if not ctx.is_main:
        return {}
    training_metrics = {}
    if is_stage_ref(settings.source):
        state = ctx.run.read(split_stage_ref(settings.source)[0])
        training_metrics = state.outputs if state is not None else {}
    return export_training_stage(ctx.input_path(settings.source), ctx.out_dir, ctx, tag=settings.tag or None,
                                 weights=settings.weights, training_metrics=training_metrics,
                                 tolerance=settings.tolerance)
