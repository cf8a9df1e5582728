"""Schedules: warm-up then cosine, weight-decay cosine, batch scaling of the learning rate."""

from __future__ import annotations

import math

import pytest

from pipeline.train.schedules import ScheduleSettings, build_schedule, cosine, scaled_lr, warmup_cosine


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    values = [warmup_cosine(step, 100, 10, peak=1.0, start=0.0, end=0.1) for step in range(101)]
    assert values[0] == 0.0 and values[5] == pytest.approx(0.5) and values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5), "half-way through the cosine: the mean of peak and end"
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:])), "decreasing after the warm-up"


def test_cosine_goes_both_ways_and_stays_at_the_end():
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(5, 10, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(20, 10, 0.04, 0.4) == pytest.approx(0.4)


def test_schedule_from_settings_counts_warmup_epochs_and_keeps_constant_weight_decay():
    settings = ScheduleSettings(warmup_epochs=2, warmup_steps=3, warmup_lr=1e-6, min_lr=1e-5)
    schedule = build_schedule(settings, lr=4e-3, weight_decay=0.05, total_steps=100, steps_per_epoch=10,
                              global_batch=2048)
    assert schedule.warmup_steps == 23
    assert schedule.lr(0) == pytest.approx(1e-6) and schedule.lr(23) == pytest.approx(4e-3)
    assert schedule.lr(100) == pytest.approx(1e-5)
    assert schedule.weight_decay_at(0) == schedule.weight_decay_at(77) == 0.05


def test_weight_decay_cosine_and_sqrt_batch_scaling_of_the_dino_recipe():
    settings = ScheduleSettings(weight_decay_end=0.4, lr_scaling="sqrt", lr_reference_batch=1024)
    schedule = build_schedule(settings, lr=4e-3, weight_decay=0.04, total_steps=50, steps_per_epoch=5,
                              global_batch=4096)
    assert schedule.peak_lr == pytest.approx(8e-3)
    assert schedule.weight_decay_at(0) == pytest.approx(0.04) and schedule.weight_decay_at(50) == pytest.approx(0.4)
    assert scaled_lr(1e-3, ScheduleSettings(lr_scaling="linear", lr_reference_batch=256), 512) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, ScheduleSettings(), 512) == 1e-3


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match="warm-up of 10 steps is not shorter than the run"):
        build_schedule(ScheduleSettings(warmup_steps=10), 1e-3, 0.0, total_steps=10, steps_per_epoch=1,
                       global_batch=1)
    assert math.isfinite(build_schedule(ScheduleSettings(), 1e-3, 0.0, 1, 1, 1).lr(0))
