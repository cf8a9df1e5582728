"""One pass of a frozen model over a classification dataset: features, logits and labels, in manifest order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import canonical_json, sha256_text
from pipeline.data.loaders import ResumableLoader
from pipeline.data.loaders_samples import SupervisedSamples
from pipeline.data.manifest import Manifest
from pipeline.data.settings import LoaderSettings
from pipeline.evaluation.exported import EvalModel


@dataclass
class DatasetFeatures:
    features: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None = None


def classification_manifest(dataset_dir: Path) -> Manifest:
    manifest = Manifest.load(dataset_dir)
    if manifest.kind != "classification":
        raise KopeError(f"{dataset_dir}: evaluation needs a classification dataset, this one holds {manifest.kind}")
    return manifest


def dataset_fingerprint(manifest: Manifest, limit: int = 0) -> dict[str, object]:
    """What identifies the evaluated data: the manifest's name and shard hashes (and a sample limit)."""
    shards = [[shard.name, shard.samples, shard.sha256] for shard in manifest.shards]
    return {"name": manifest.name, "split": manifest.split, "samples": min(manifest.num_samples, limit or
            manifest.num_samples), "shards_sha256": sha256_text(canonical_json(shards))}


def eval_loader(dataset_dir: Path, model: EvalModel, batch_size: int, num_workers: int, limit: int = 0
                ) -> ResumableLoader:
    """Every sample (or the first ``limit``) once, in manifest order, with the model's eval transform."""
    total = Manifest.load(dataset_dir).num_samples
    limit = min(limit, total) if limit else 0
    settings = LoaderSettings(batch_size=batch_size, num_workers=num_workers, shuffle=False, drop_last=False,
                              samples_per_epoch=limit)
    return ResumableLoader(dataset_dir, SupervisedSamples(model.transform), settings)


@torch.no_grad()
def extract(model: EvalModel, dataset_dir: Path, batch_size: int = 256, num_workers: int = 4, limit: int = 0,
            keep_logits: bool = True) -> DatasetFeatures:
    features, labels, logits = [], [], []
    for batch in eval_loader(dataset_dir, model, batch_size, num_workers, limit):
        feats, scores = model.features_and_logits(batch["image"])
        features.append(feats.cpu())
        labels.append(batch["label"])
        if keep_logits and scores is not None:
            logits.append(scores.cpu())
    if not features:
        raise KopeError(f"{dataset_dir}: no samples to evaluate")
    return DatasetFeatures(torch.cat(features), torch.cat(labels), torch.cat(logits) if logits else None)
