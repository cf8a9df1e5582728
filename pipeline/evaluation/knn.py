"""Weighted k-NN classification on frozen features, the DINOv2 protocol.

Features are L2-normalised; each test sample's ``max(ks)`` most cosine-similar training samples vote for
their labels with weights ``softmax(sim / T)`` over those neighbours, and the k-NN prediction for each k
sums the votes of the k nearest. DINOv2 reports k = 10, 20, 100, 200 with T = 0.07.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.evaluation.metrics import topk_correct
from pipeline.evaluation.settings import DINOV2_KS, DINOV2_TEMPERATURE


def knn_class_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DINOV2_KS,
    temperature: float = DINOV2_TEMPERATURE,
) -> dict[int, torch.Tensor]:
    """Per k, the class scores (N_test×C) of every test sample; k above the training-set size is clamped."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k_max = min(max(ks), train.shape[0])
    sims, indices = (test @ train.T).topk(k_max, dim=1)
    weights = (sims / temperature).softmax(dim=1)
    votes = F.one_hot(train_labels.to(indices.device)[indices], num_classes).float() * weights.unsqueeze(-1)
    return {k: votes[:, : min(k, k_max)].sum(dim=1) for k in ks}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DINOV2_KS,
    temperature: float = DINOV2_TEMPERATURE,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """``{"k10_top1": ..., "k10_top5": ..., ...}``; test samples go in chunks so memory stays bounded."""
    hits = {k: {1: 0, 5: 0} for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        scores = knn_class_scores(train_features, train_labels, test_features[chunk], num_classes, ks, temperature)
        for k, class_scores in scores.items():
            for top, count in topk_correct(class_scores, test_labels[chunk].to(class_scores.device)).items():
                hits[k][top] += count
    total = max(int(test_labels.numel()), 1)
    return {f"k{k}_top{top}": count / total for k, by_top in hits.items() for top, count in by_top.items()}
