"""Evaluation metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation.knn import knn_accuracy, knn_class_scores
from pipeline.evaluation.linear_probe import LinearProbeSettings, linear_probe
from pipeline.evaluation.metrics import topk_accuracy
from pipeline.models.analysis import attention_entropy, gini, phase_synchrony


def test_gini_is_zero_for_uniform_and_n_minus_1_over_n_for_one_hot():
    n = 8
    uniform = torch.full((n,), 1 / n)
    one_hot = torch.zeros(n)
    one_hot[3] = 1.0
    assert gini(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert gini(one_hot).item() == pytest.approx((n - 1) / n, abs=1e-5)


def test_entropy_and_synchrony_by_hand():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert attention_entropy(p).item() == pytest.approx(math.log(2), abs=1e-5)
    # two tokens, equal weight, phases 0 and pi/2 on one oscillator: |0.5 + 0.5i| = sqrt(0.5)
    psi = torch.tensor([[0.0], [math.pi / 2], [1.0], [2.0]])
    assert phase_synchrony(p, psi).item() == pytest.approx(math.sqrt(0.5), abs=1e-6)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc["top1"] == pytest.approx(1 / 3)
    assert acc["top2"] == pytest.approx(2 / 3)  # row 2: label 1 is second; row 3: label 0 is third


def test_knn_on_a_toy_set():
    # training points on the unit circle: class 0 near angle 0, class 1 near angle pi/2
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5, 1.6])
    train = torch.stack([angles.cos(), angles.sin()], dim=1) * 3.0  # scale must not matter (cosine)
    train_labels = torch.tensor([0, 0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.0, 1.0]])
    scores = knn_class_scores(train, train_labels, test, num_classes=2, ks=(1, 3), temperature=0.07)
    assert scores[1].argmax(dim=1).tolist() == [0, 1]
    # k=3 for the second test point: neighbours 1.6 (cls 1), 1.5 (cls 1), 0.2 (cls 0), weights softmax(cos/T)
    sims = torch.tensor([math.cos(1.6 - math.pi / 2), math.cos(1.5 - math.pi / 2), math.cos(0.2 - math.pi / 2)])
    weights = (sims / 0.07).softmax(0)
    assert scores[3][1].tolist() == pytest.approx([weights[2].item(), (weights[0] + weights[1]).item()], abs=1e-5)
    acc = knn_accuracy(train, train_labels, test, torch.tensor([0, 0]), num_classes=2, ks=(1, 3))
    assert acc["k1_top1"] == pytest.approx(0.5)
    assert acc["k3_top5"] == pytest.approx(1.0)


def test_knn_clamps_k_to_the_training_set():
    train = torch.eye(3)
    scores = knn_class_scores(train, torch.tensor([0, 1, 2]), torch.eye(3), num_classes=3, ks=(200,))
    assert scores[200].shape == (3, 3)
    assert scores[200].sum(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_linear_probe_grid_learns_separable_data_and_reports_each_lr():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 3
    labels = torch.arange(4).repeat(50)
    features = centres[labels] + torch.randn(200, 16, generator=generator)
    settings = LinearProbeSettings(learning_rates=[1e-6, 0.1], epochs=5, batch_size=32)
    result = linear_probe(features[:160], labels[:160], features[160:], labels[160:], 4, settings)
    assert set(result.per_lr) == {"1e-06", "0.1"}
    assert result.best_lr == 0.1
    assert result.top1 >= 0.95
    assert result.per_lr["1e-06"]["top1"] < result.top1
