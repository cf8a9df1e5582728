"""What a training run measures about itself: throughput, time spent waiting for data, model FLOP
utilisation on GPUs, and KoPE's state (coupling step γ, phase synchrony)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from the vendors' data sheets, matched in this
# order against the name CUDA reports (``torch.cuda.get_device_name``): the first pattern found in it wins, so
# the PCIe and NVL parts come before the SXM part of the same name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H200 NVL", 835.0),
    (r"GH200|H200", 989.0),
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100", 989.0),  # SXM5 (reported as "H100 80GB HBM3")
    (r"A100", 312.0),  # SXM4 and PCIe alike
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"L4\b", 121.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU called ``device_name``, or None for one not in the table: then no
    MFU is reported rather than one measured against another GPU's peak."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops * 1e12
    return None


def peak_flops(device: torch.device) -> float | None:
    """The device's peak bf16 FLOP/s, or None when unknown (CPUs, unlisted GPUs): then no MFU is logged."""
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` runs (forward and backward), counted by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass
class Throughput:
    """Steps, samples and seconds since the last report."""

    steps: int = 0
    samples: int = 0
    step_s: float = 0.0
    data_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, samples: int, step_s: float, data_s: float) -> None:
        self.steps += 1
        self.samples += samples
        self.step_s += step_s
        self.data_s += data_s

    def report(self, flops_per_sample: float | None = None, peak: float | None = None,
               world_size: int = 1) -> dict[str, float]:
        """Averages since the last report (then starts over): img/s over all ranks, seconds per step and
        waiting for data per step, and MFU when the FLOPs and the peak are known."""
        elapsed = time.perf_counter() - self.started
        steps = max(self.steps, 1)
        out = {"img_per_s": self.samples / elapsed if elapsed > 0 else 0.0, "step_s": self.step_s / steps,
               "data_wait_s": self.data_s / steps}
        if flops_per_sample and peak:
            out["mfu"] = out["img_per_s"] * flops_per_sample / (peak * world_size)
        self.steps, self.samples, self.step_s, self.data_s = 0, 0, 0.0, 0.0
        self.started = time.perf_counter()
        return out


class MeanWindow:
    """The loss and the task's scalars summed since the last report on this rank; means over all ranks' micro-
    batches at a report. Non-finite losses (skipped steps) are left out of the mean. The window is saved with
    checkpoints, so the first report after a resume averages the same micro-batches as an uninterrupted run.

    Nothing here reads a device value between reports: the loss and tensor-valued scalars are summed on their
    device, plain numbers on the host, and both are read back once, at a report or a checkpoint."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)
        self.metric_sums: dict[str, torch.Tensor | float] = {}
        self.micro_batches = 0

    def add(self, loss: torch.Tensor, metrics: Mapping[str, torch.Tensor | float]) -> None:
        """Adds one micro-batch (no host sync: see the class docstring)."""
        value = loss.detach().double()
        finite = torch.isfinite(value)
        self.loss_sum += torch.where(finite, value, torch.zeros_like(value))
        self.loss_count += finite.double()
        for name, metric in metrics.items():
            metric = metric.detach().double().reshape(()) if isinstance(metric, torch.Tensor) else float(metric)
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + metric
        self.micro_batches += 1

    def totals(self) -> dict[str, float]:
        """Sums over all ranks (a collective: every rank reports the same metric names); reads the device."""
        names = sorted(self.metric_sums)
        sums = [torch.as_tensor(self.metric_sums[n], dtype=torch.float64, device=self.device) for n in names]
        values = torch.stack([self.loss_sum, self.loss_count,
                              torch.tensor(float(self.micro_batches), dtype=torch.float64, device=self.device),
                              *sums])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        return dict(zip(["loss_sum", "loss_count", "micro_batches", *names], values.tolist()))

    def means(self) -> dict[str, float]:
        """Finite means over all ranks since the last report (a collective), then starts over."""
        totals = self.totals()
        loss_sum, loss_count, count = totals.pop("loss_sum"), totals.pop("loss_count"), totals.pop("micro_batches")
        means = {name: total / max(count, 1.0) for name, total in totals.items()}
        if loss_count > 0:
            means["loss"] = loss_sum / loss_count
        self.load_totals({}, keep=False)
        return {name: value for name, value in means.items() if math.isfinite(value)}

    def load_totals(self, totals: dict[str, float], keep: bool) -> None:
        """Start from saved ``totals`` (``keep``: on one rank only, so the next report counts them once)."""
        totals = dict(totals) if keep else {}
        self.loss_sum.fill_(totals.pop("loss_sum", 0.0))
        self.loss_count.fill_(totals.pop("loss_count", 0.0))
        self.micro_batches = int(totals.pop("micro_batches", 0))
        self.metric_sums = {name: float(value) for name, value in totals.items()}


def phase_synchrony(phases: torch.Tensor) -> float:
    """Kuramoto order parameter of the patch phases (B×H×P×R angles), averaged over images, heads and
    oscillators: 1 when all patches share a phase, about 1/√P for random phases."""
    phases = phases.float()
    order = torch.complex(phases.cos().mean(dim=2), phases.sin().mean(dim=2)).abs()
    return float(order.mean())


@torch.no_grad()
def kope_metrics(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """γ and the mean phase synchrony of the final patch phases on ``images``, for a KoPE ViT (nothing for
    models without phases). Run it where the model's full weights are present (see the engine's
    ``gathered_parameters``)."""
    metrics: dict[str, float] = {}
    coupling = getattr(model, "coupling", None)
    if coupling is not None:
        metrics["gamma"] = float(coupling.gamma)
    if getattr(model, "kope", False) and hasattr(model, "forward_feature_dict"):
        was_training = model.training
        model.eval()
        try:
            phases = model.forward_feature_dict(images).get("patch_phases")
        finally:
            model.train(was_training)
        if phases is not None:
            metrics["phase_synchrony"] = phase_synchrony(phases)
    return {key: value for key, value in metrics.items() if math.isfinite(value)}
