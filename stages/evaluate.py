"""Stage ``evaluate``: top-1/top-5, k-NN, linear probes, zero-shot and KoPE analysis of an exported model.

``model`` is an export folder (``@export`` or ``@finetune/export``), loaded with timm's or open_clip's own
call; ``val`` a sharded classification set (``train`` too for k-NN and linear probes; ``extra_val`` names
more evaluation sets, e.g. ImageNet-V2). Every protocol's result is appended to ``<run>/results.jsonl``; a
protocol already recorded there for the same weights (sha256), settings and data is not run again, so an
interrupted or forced evaluation resumes. The stage's outputs are the headline numbers ``kope status``
shows: ``top1``, ``knn_top1``, ``linear_top1``, ``zeroshot_top1``, ``synchrony`` (prefixed by the set name for
``extra_val``). One process does the work; other ranks return at once.

``protocols: [segmentation]`` evaluates a segmenter export (``@finetune_segmentation/export``) on segmentation
sets instead (:mod:`pipeline.evaluation.segmentation`): ``miou`` and ``pixel_accuracy``, overlays in the stage
folder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.results import ResultsLog
from pipeline.core.stage import StageContext
from pipeline.evaluation.exported import load_export, pick_device
from pipeline.evaluation.runner import EvalData, evaluate
from pipeline.evaluation.segmentation import evaluate_segmentation_export
from pipeline.evaluation.settings import EvaluateSettings


def run(settings: EvaluateSettings, ctx: StageContext) -> dict[str, Any]:
    if not ctx.is_main:
        return {}
    if settings.protocols == ["segmentation"]:
        return _segmentation(settings, ctx)
    model = load_export(ctx.input_path(settings.model), pick_device(settings.device))
    eval_settings = settings
    if settings.zeroshot.classnames:
        zeroshot = dataclasses.replace(settings.zeroshot, classnames=str(ctx.input_path(settings.zeroshot.classnames)))
        eval_settings = dataclasses.replace(settings, zeroshot=zeroshot)
    results = ResultsLog(ctx.run.results_file)
    train = ctx.input_path(settings.train) if settings.train else None
    record = {"stage": ctx.name, "model": str(model.path.relative_to(ctx.run_dir)) if model.path.is_relative_to(
        ctx.run_dir) else str(model.path)}
    sets = {"val": settings.val, **settings.extra_val}
    outputs: dict[str, Any] = {}
    for name, path in sets.items():
        data = EvalData(val=ctx.input_path(path), train=train, val_name=name)
        out_dir = ctx.out_dir if name == "val" else ctx.out_dir / name
        headline = evaluate(model, data, eval_settings, results, out_dir, seed=ctx.seed, record=record)
        outputs.update({key if name == "val" else f"{name}_{key}": value for key, value in headline.items()})
    return {key: round(value, 4) for key, value in outputs.items()}


def _segmentation(settings: EvaluateSettings, ctx: StageContext) -> dict[str, Any]:
    folder = ctx.input_path(settings.model)
    record = {"stage": ctx.name, "model": str(folder.relative_to(ctx.run_dir)) if folder.is_relative_to(
        ctx.run_dir) else str(folder)}
    outputs: dict[str, Any] = {}
    for name, path in {"val": settings.val, **settings.extra_val}.items():
        headline = evaluate_segmentation_export(
            folder, ctx.input_path(path), name, settings.segmentation, ResultsLog(ctx.run.results_file),
            ctx.out_dir if name == "val" else ctx.out_dir / name, pick_device(settings.device), settings.num_workers,
            record)
        outputs.update({key if name == "val" else f"{name}_{key}": value for key, value in headline.items()})
    return {key: round(value, 4) for key, value in outputs.items()}
