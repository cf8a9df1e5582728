"""Training metrics: phase synchrony, FLOP counting for MFU, throughput averages."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.train.metrics import (
    MeanWindow,
    Throughput,
    count_flops,
    peak_bf16_flops,
    peak_flops,
    phase_synchrony,
)


def test_phase_synchrony_is_one_for_equal_phases_and_zero_for_evenly_spread_ones():
    equal = torch.full((2, 3, 16, 4), 0.7)
    spread = (2 * math.pi * torch.arange(16) / 16).view(1, 1, 16, 1).expand(2, 3, 16, 4)
    assert phase_synchrony(equal) == pytest.approx(1.0)
    assert phase_synchrony(spread) == pytest.approx(0.0, abs=1e-6)
    half = torch.cat([torch.zeros(1, 1, 8, 1), torch.full((1, 1, 8, 1), math.pi / 2)], dim=2)
    assert phase_synchrony(half) == pytest.approx(math.sqrt(0.5))


def test_flops_of_a_linear_layer_forward_and_backward():
    layer = nn.Linear(32, 16)
    inputs = torch.randn(8, 32, requires_grad=True)
    flops = count_flops(lambda: layer(inputs).sum().backward())
    assert flops == 3 * 2 * 8 * 32 * 16, "forward, input gradient and weight gradient: 2·B·in·out each"


def test_throughput_reports_averages_and_mfu():
    meter = Throughput()
    meter.add(samples=64, step_s=0.5, data_s=0.1)
    meter.add(samples=64, step_s=0.7, data_s=0.3)
    meter.started -= 2.0
    report = meter.report(flops_per_sample=1e9, peak=1e12, world_size=2)
    assert report["step_s"] == pytest.approx(0.6) and report["data_wait_s"] == pytest.approx(0.2)
    assert report["img_per_s"] == pytest.approx(64.0, rel=0.01)
    assert report["mfu"] == pytest.approx(report["img_per_s"] * 1e9 / 2e12)
    assert meter.steps == 0 and "mfu" not in meter.report(), "starts over, no MFU without a peak"
    assert peak_flops(torch.device("cpu")) is None


def test_mean_window_leaves_out_nonfinite_losses_and_carries_saved_totals():
    window = MeanWindow(torch.device("cpu"))
    window.add(torch.tensor(2.0), {"loss_cls": 1.0})
    window.add(torch.tensor(float("nan")), {"loss_cls": 3.0})
    saved = window.totals()
    assert window.means() == {"loss": 2.0, "loss_cls": 2.0}
    assert window.means() == {}, "empty after a report"
    resumed = MeanWindow(torch.device("cpu"))
    resumed.load_totals(saved, keep=True)
    resumed.add(torch.tensor(5.0), {"loss_cls": 5.0})
    assert resumed.means() == {"loss": 3.5, "loss_cls": 3.0}


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-16GB", None), ("NVIDIA B200", None),
])
def test_peak_table_knows_each_part_and_nothing_else(name, tflops):
    assert peak_bf16_flops(name) == (tflops * 1e12 if tflops else None)


def test_mean_window_keeps_tensor_metrics_on_the_device_until_a_report():
    window = MeanWindow(torch.device("cpu"))
    window.add(torch.tensor(1.0), {"loss_cls": torch.tensor(0.5), "teacher_temp": 0.04})
    window.add(torch.tensor(3.0), {"loss_cls": torch.tensor([1.5]), "teacher_temp": 0.06})
    assert isinstance(window.metric_sums["loss_cls"], torch.Tensor)
    assert isinstance(window.metric_sums["teacher_temp"], float)
    saved = window.totals()
    assert saved == pytest.approx({"loss_sum": 4.0, "loss_count": 2.0, "micro_batches": 2.0, "loss_cls": 2.0,
                                   "teacher_temp": 0.1})
    assert window.means() == pytest.approx({"loss": 2.0, "loss_cls": 1.0, "teacher_temp": 0.05})
    resumed = MeanWindow(torch.device("cpu"))
    resumed.load_totals(saved, keep=True)
    resumed.add(torch.tensor(2.0), {"loss_cls": torch.tensor(4.0), "teacher_temp": 0.2})
    assert resumed.means() == pytest.approx({"loss": 2.0, "loss_cls": 2.0, "teacher_temp": 0.1})
