"""Linear probes on frozen features: one linear head per learning rate, all trained in the same pass.

As in DINOv2's linear evaluation, the backbone never runs during probe training: features are extracted
once, and every head of the learning-rate grid sees the same mini-batches (SGD with momentum, cosine
schedule, no weight decay by default), so the grid costs little more than a single head. The reported
accuracy is the best head's on the evaluation set, DINOv2's convention, with every head's accuracy kept
beside it so the choice stays visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation.metrics import topk_correct
from pipeline.evaluation.settings import LinearProbeSettings


@dataclass
class ProbeResult:
    per_lr: dict[str, dict[str, float]] = field(default_factory=dict)
    best_lr: float = 0.0
    top1: float = 0.0
    top5: float = 0.0


class LinearHeads(nn.Module):
    """``n`` independent linear classifiers over the same input (DINOv2 initialisation: N(0, 0.01), zero bias)."""

    def __init__(self, in_features: int, num_classes: int, n: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, num_classes) for _ in range(n))
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(x) for head in self.heads]


def train_linear_probes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    settings: LinearProbeSettings,
    seed: int = 0,
) -> LinearHeads:
    """Train one head per learning rate on (features, labels); batches are shuffled by ``seed``."""
    lrs: Sequence[float] = settings.learning_rates
    device = train_features.device
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = LinearHeads(train_features.shape[1], num_classes, len(lrs)).to(device)
    scale = settings.batch_size / 256
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr * scale} for head, lr in zip(heads.heads, lrs)],
        momentum=settings.momentum, weight_decay=settings.weight_decay,
    )
    n = train_features.shape[0]
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    features = train_features.float()
    labels = train_labels.to(device)
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, settings.batch_size):
            batch = order[start:start + settings.batch_size]
            losses = [F.cross_entropy(logits, labels[batch]) for logits in heads(features[batch])]
            optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            optimizer.step()
            schedule.step()
    return heads


@torch.no_grad()
def evaluate_linear_probes(
    heads: LinearHeads,
    features: torch.Tensor,
    labels: torch.Tensor,
    learning_rates: Sequence[float],
    chunk_size: int = 4096,
) -> ProbeResult:
    hits = [{1: 0, 5: 0} for _ in learning_rates]
    for start in range(0, features.shape[0], chunk_size):
        chunk_labels = labels[start:start + chunk_size].to(features.device)
        for i, logits in enumerate(heads(features[start:start + chunk_size].float())):
            for k, count in topk_correct(logits, chunk_labels).items():
                hits[i][k] += count
    total = max(int(labels.numel()), 1)
    per_lr = {f"{lr:g}": {"top1": h[1] / total, "top5": h[5] / total} for lr, h in zip(learning_rates, hits)}
    best = max(range(len(learning_rates)), key=lambda i: hits[i][1])
    return ProbeResult(per_lr=per_lr, best_lr=float(learning_rates[best]),
                       top1=hits[best][1] / total, top5=hits[best][5] / total)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    settings: LinearProbeSettings,
    seed: int = 0,
) -> ProbeResult:
    heads = train_linear_probes(train_features, train_labels, num_classes, settings, seed)
    return evaluate_linear_probes(heads, test_features, test_labels, settings.learning_rates)
