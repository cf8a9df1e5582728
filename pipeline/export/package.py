"""Write a complete export folder from a training stage's checkpoint: the model files (checked by reloading),
labels and preprocessing from the training config, the model card and ``SHA256SUMS``.

Shared by the ``export`` stage and the ``finetune`` stage (which exports its own result the same way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.config.types import is_stage_ref, split_stage_ref
from pipeline.core.fsutil import atomic_write_text, sha256_file
from pipeline.core.results import ResultsLog
from pipeline.core.stage import StageContext
from pipeline.data.manifest import MANIFEST_FILE, Manifest, ManifestError
from pipeline.export.checksums import write_checksums
from pipeline.export.exporter import TrainedModel, load_trained_model, write_export
from pipeline.export.model_card import CardFacts, kope_settings, load_snippets, render_card
from pipeline.export.recipe import ModelRecipe
from pipeline.export.timm_format import CONFIG_FILE, WEIGHTS_FILE
from pipeline.train.run import CHECKPOINTS
from pipeline.train.settings import WeightsChoice

CARD_FILE = "README.md"


def data_config(mode: str, config: dict[str, Any]) -> dict[str, Any]:
    """The evaluation preprocessing the training recipe implies (normalisation, crop) for timm's config."""
    aug = (config.get(mode) or {}).get("aug") or {}
    out: dict[str, Any] = {key: tuple(aug[key]) for key in ("mean", "std") if aug.get(key)}
    if mode == "supervised":
        out.update({timm_key: aug[key] for key, timm_key in (("eval_crop_pct", "crop_pct"),
                                                              ("interpolation", "interpolation")) if key in aug})
    return out


def training_manifest(config: dict[str, Any], ctx: StageContext) -> tuple[Path | None, Manifest | None]:
    """The training set named by the checkpoint's config, when it can still be found."""
    data = config.get("data")
    if not isinstance(data, str) or not data:
        return None, None
    if is_stage_ref(data) and split_stage_ref(data)[0] not in ctx.stage_dirs:
        return None, None
    path = ctx.input_path(data)
    try:
        return path, Manifest.load(path)
    except ManifestError:
        return path, None


def recorded_metrics(ctx: StageContext, weights_sha256: str) -> dict[str, Any]:
    """Top-1 of every evaluation in the run's ``results.jsonl`` of these weights (and of no others)."""
    found = {}
    for record in ResultsLog(ctx.run.results_file).records():
        metrics = record.get("metrics")
        top1 = metrics.get("top1") if isinstance(metrics, dict) else None
        if record.get("checkpoint_sha256") == weights_sha256 and isinstance(top1, int | float):
            found[f"{record.get('protocol')} top-1 on {record.get('dataset')}"] = round(top1, 4)
    return found


def _card(trained: TrainedModel, recipe: ModelRecipe, folder: Path, ctx: StageContext, config: dict[str, Any],
          files: dict[str, str], training_metrics: dict[str, Any]) -> CardFacts:
    folder_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    client = trained.checkpoint.client_state
    manifest_path, manifest = training_manifest(config, ctx)
    data: dict[str, Any] = {"dataset": config.get("data", "unknown")}
    if manifest is not None and manifest_path is not None:
        data.update({"name": manifest.name, "kind": manifest.kind, "samples": manifest.num_samples,
                     "manifest sha256": f"`{sha256_file(manifest_path / MANIFEST_FILE)}`"})
    timm_code, clip_code = load_snippets(folder_config, recipe.library == "open_clip")
    numbers = {f"training {key}": round(value, 4) if isinstance(value, float) else value
               for key, value in training_metrics.items()
               if isinstance(value, int | float) and not isinstance(value, bool)}
    return CardFacts(
        title=f"{folder_config['architecture']} ({recipe.mode}, {trained.checkpoint.tag})",
        mode=recipe.mode,
        architecture=folder_config["architecture"],
        model_args=folder_config.get("model_args", {}),
        parameters=sum(p.numel() for p in trained.timm_model.parameters()),
        kope=kope_settings(trained.timm_model),
        weights=trained.weights,
        checkpoint={"checkpoint": trained.checkpoint.tag, "steps": client.get("step", trained.checkpoint.global_steps),
                    "samples seen": client.get("samples_seen", "unknown"),
                    "ZeRO stage": trained.checkpoint.zero_stage, "ranks": trained.checkpoint.world_size,
                    "code version": client.get("code_version", "unknown")},
        data=data,
        files=files,
        load_timm=timm_code,
        load_open_clip=clip_code,
        metrics={**numbers, **recorded_metrics(ctx, files.get(WEIGHTS_FILE, ""))},
        config=config,
    )


def package_export(trained: TrainedModel, recipe: ModelRecipe, folder: Path, ctx: StageContext, *,
                   training_metrics: dict[str, Any] | None = None, tolerance: float = 1e-5) -> dict[str, Any]:
    """Write and check ``folder``; returns what the stage reports (path, weights, sha256, reload difference)."""
    config = trained.checkpoint.training_config
    labels: dict[str, Any] = {}
    _, manifest = training_manifest(config, ctx)
    if manifest is not None and recipe.mode == "supervised" and manifest.classes:
        labels = {"label_names": [c.wnid for c in manifest.classes],
                  "label_descriptions": {c.wnid: c.name for c in manifest.classes}}
    result = write_export(trained, recipe, folder, data_config=data_config(recipe.mode, config),
                          tolerance=tolerance, **labels)
    files = write_checksums(folder, result.files)
    card = _card(trained, recipe, folder, ctx, config, files, training_metrics or {})
    atomic_write_text(folder / CARD_FILE, render_card(card))
    write_checksums(folder, [*result.files, folder / CARD_FILE])
    ctx.log.info("exported %s (%s weights of %s) to %s; reload differences %s", recipe.name, trained.weights,
                 trained.checkpoint.tag, folder, result.max_abs_diff)
    client = trained.checkpoint.client_state
    return {"export": str(folder.relative_to(ctx.run_dir)) if folder.is_relative_to(ctx.run_dir) else str(folder),
            "weights": trained.weights, "checkpoint": trained.checkpoint.tag,
            "steps": client.get("step", trained.checkpoint.global_steps), "samples_seen": client.get("samples_seen"),
            "sha256": files[WEIGHTS_FILE], "max_abs_diff": max(result.max_abs_diff.values())}


def export_training_stage(source: Path, folder: Path, ctx: StageContext, *, tag: str | None = None,
                          weights: WeightsChoice = "auto", training_metrics: dict[str, Any] | None = None,
                          tolerance: float = 1e-5) -> dict[str, Any]:
    """Export the checkpoint ``tag`` (default: latest) of the training stage folder ``source`` into ``folder``."""
    recipe = ModelRecipe.load(source)
    trained = load_trained_model(source / CHECKPOINTS, recipe, tag, weights)
    return package_export(trained, recipe, folder, ctx, training_metrics=training_metrics, tolerance=tolerance)
