"""Run the evaluation protocols on one exported model, recording each in ``results.jsonl`` and skipping those
already recorded for the same weights, settings and data.

Features of the evaluation set (and of the training set, for k-NN and linear probes) are extracted once and
shared by the protocols that need them; nothing is extracted when every requested protocol is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import sha256_file
from pipeline.core.logs import get_logger
from pipeline.core.results import ResultsLog, evaluation_id
from pipeline.evaluation.exported import EvalModel
from pipeline.evaluation.features import DatasetFeatures, classification_manifest, dataset_fingerprint, extract
from pipeline.evaluation.knn import knn_accuracy
from pipeline.evaluation.kope_analysis import analyse_to_files
from pipeline.evaluation.linear_probe import linear_probe
from pipeline.evaluation.metrics import topk_accuracy
from pipeline.evaluation.settings import EvalSettings
from pipeline.evaluation.zeroshot import (
    default_classnames,
    read_classnames,
    templates_by_name,
    zero_shot_logits,
    zero_shot_weights,
)

log = get_logger("evaluate")


NEEDS_TRAIN = {"knn", "linear"}


@dataclass
class EvalData:
    val: Path
    train: Path | None = None
    val_name: str = "val"


@dataclass
class _Features:
    """Lazily extracted features, shared by the protocols of one evaluation set."""

    model: EvalModel
    data: EvalData
    settings: EvalSettings
    cache: dict[str, DatasetFeatures] = field(default_factory=dict)

    def get(self, split: str) -> DatasetFeatures:
        if split not in self.cache:
            path = self.data.train if split == "train" else self.data.val
            if path is None:
                raise KopeError("k-NN and linear probes need training data (set train:)")
            limit = self.settings.max_train_samples if split == "train" else 0
            log.info("extracting %s features from %s", split, path)
            self.cache[split] = extract(self.model, path, self.settings.batch_size, self.settings.num_workers, limit,
                                        keep_logits=split != "train")
        return self.cache[split]


def _protocol_settings(protocol: str, settings: EvalSettings) -> dict[str, Any]:
    specific = {"knn": settings.knn, "linear": settings.linear, "zeroshot": settings.zeroshot,
                "analysis": settings.analysis}.get(protocol)
    out: dict[str, Any] = asdict(specific) if specific is not None else {}
    if protocol == "zeroshot" and settings.zeroshot.classnames:
        out["classnames"] = sha256_file(Path(settings.zeroshot.classnames))
    if protocol in NEEDS_TRAIN:
        out["max_train_samples"] = settings.max_train_samples
    return out


def _data_identity(protocol: str, data: EvalData, settings: EvalSettings) -> dict[str, Any]:
    identity = {"val": dataset_fingerprint(classification_manifest(data.val))}
    if protocol in NEEDS_TRAIN and data.train is not None:
        identity["train"] = dataset_fingerprint(classification_manifest(data.train), settings.max_train_samples)
    return identity


def _top1(features: _Features, model: EvalModel, num_classes: int, **_: Any) -> dict[str, Any]:
    if model.num_classes != num_classes:
        raise KopeError(f"{model.path}: top1 needs a classifier over the dataset's {num_classes} classes, "
                        f"the model has {model.num_classes} outputs (fine-tune it, or use knn/linear/zeroshot)")
    val = features.get("val")
    return topk_accuracy(val.logits, val.labels)


def _knn(features: _Features, model: EvalModel, settings: EvalSettings, num_classes: int, **_: Any
         ) -> dict[str, Any]:
    train, val = features.get("train"), features.get("val")
    table = knn_accuracy(train.features.to(model.device), train.labels, val.features.to(model.device), val.labels,
                         num_classes, settings.knn.ks, settings.knn.temperature)
    k = settings.knn.headline_k if settings.knn.headline_k in settings.knn.ks else max(settings.knn.ks)
    return {"top1": table[f"k{k}_top1"], "top5": table[f"k{k}_top5"], "k": k, "table": table}


def _linear(features: _Features, model: EvalModel, settings: EvalSettings, num_classes: int, seed: int, **_: Any
            ) -> dict[str, Any]:
    train, val = features.get("train"), features.get("val")
    result = linear_probe(train.features.to(model.device), train.labels, val.features.to(model.device), val.labels,
                          num_classes, settings.linear, seed)
    return {"top1": result.top1, "top5": result.top5, "best_lr": result.best_lr, "per_lr": result.per_lr}


def _zeroshot(features: _Features, model: EvalModel, settings: EvalSettings, class_names: list[str],
              **_: Any) -> dict[str, Any]:
    if model.kind != "open_clip" or model.tokenizer is None:
        raise KopeError(f"{model.path}: zero-shot classification needs a CLIP (open_clip) export")
    zs = settings.zeroshot
    names = read_classnames(Path(zs.classnames), len(class_names)) if zs.classnames else default_classnames(class_names)
    templates = list(zs.templates) or list(templates_by_name(zs.template_set))
    weights = zero_shot_weights(model.model, model.tokenizer, names, templates, model.device)
    val = features.get("val")
    return topk_accuracy(zero_shot_logits(val.features.to(model.device), weights).cpu(), val.labels)


def _analysis(features: _Features, model: EvalModel, settings: EvalSettings, out_dir: Path, **_: Any
              ) -> dict[str, Any]:
    backbone = model.backbone
    if not hasattr(backbone, "forward_cls_attention"):
        raise KopeError(f"{model.path}: the analysis needs a KoPE/ViT backbone with forward_cls_attention")
    from pipeline.evaluation.features import eval_loader

    loader = eval_loader(features.data.val, model, settings.analysis.images, 0, settings.analysis.images)
    images = next(iter(loader))["image"]
    mean, std = _normalisation(model)
    metrics = analyse_to_files(backbone, images, out_dir, mean, std, settings.analysis.attention_maps)
    return {name: {"mean": values["mean"], "per_block": values["per_block"]} for name, values in metrics.items()}


def _normalisation(model: EvalModel) -> tuple[list[float], list[float]]:
    if model.kind == "open_clip":
        config = model.model.visual.preprocess_cfg
    else:
        config = model.model.pretrained_cfg
    return list(config["mean"]), list(config["std"])


PROTOCOLS: dict[str, Callable[..., dict[str, Any]]] = {
    "top1": _top1, "knn": _knn, "linear": _linear, "zeroshot": _zeroshot, "analysis": _analysis,
}


def headline(protocol: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers ``kope status`` shows: ``top1``, ``knn_top1``, ``linear_top1``, ``zeroshot_top1``, ``synchrony``."""
    if protocol == "analysis":
        return {"synchrony": metrics["synchrony"]["mean"]} if "synchrony" in metrics else {}
    prefix = "" if protocol == "top1" else f"{protocol}_"
    return {f"{prefix}top1": metrics["top1"]}


def evaluate(
    model: EvalModel,
    data: EvalData,
    settings: EvalSettings,
    results: ResultsLog,
    out_dir: Path,
    *,
    seed: int = 0,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every requested protocol not yet in ``results``; returns the headline metrics of all of them."""
    manifest = classification_manifest(data.val)
    class_names = [info.name for info in manifest.classes]
    features = _Features(model, data, settings)
    summary: dict[str, Any] = {}
    for protocol in settings.protocols:
        protocol_settings = {**_protocol_settings(protocol, settings), "preprocess": repr(model.transform)}
        data_identity = _data_identity(protocol, data, settings)
        eval_id = evaluation_id(model.weights_sha256, protocol, protocol_settings, data_identity)
        found = results.find(eval_id)
        if found is not None:
            log.info("%s on %s: already recorded (%s), skipped", protocol, data.val_name, eval_id)
            metrics = found["metrics"]
        else:
            metrics = PROTOCOLS[protocol](features=features, model=model, settings=settings, num_classes=len(
                class_names), class_names=class_names, seed=seed, out_dir=out_dir)
            results.append({**(record or {}), "id": eval_id, "protocol": protocol, "dataset": data.val_name,
                            "checkpoint_sha256": model.weights_sha256, "settings": protocol_settings,
                            "data": data_identity, "metrics": metrics})
            log.info("%s on %s: %s", protocol, data.val_name, _short(headline(protocol, metrics)))
        summary.update(headline(protocol, metrics))
    return summary


def _short(values: dict[str, float]) -> str:
    return " ".join(f"{key}={value:.4f}" for key, value in values.items() if not math.isnan(value))

