"""What the report compares, read from the run directory: for each named stage, its row (the variant without the
replicate key), its evaluations in ``results.jsonl``, and the outputs and TensorBoard curves of the training
stage upstream of it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.config.schema import PipelineConfig
from pipeline.core.errors import KopeError
from pipeline.core.results import ResultsLog
from pipeline.core.run_dir import RunDir
from pipeline.report.events import read_scalars

LOSS_TAG = "train/loss"
VAL_TAGS = ("model/val_top1", "eval/val_top1")  # during training (val_every_steps), else the final one
PROTOCOL_METRICS = {"top1": ("top1", "top1"), "top5": ("top1", "top5"), "knn_top1": ("knn", "top1"),
                    "linear_top1": ("linear", "top1"), "zeroshot_top1": ("zeroshot", "top1")}
ANALYSIS_METRICS = ("gini", "synchrony", "entropy")
TRAINING_OUTPUTS = {"val_top1": "val_top1", "final_loss": "last_loss"}


@dataclass
class Curve:
    steps: list[int]
    values: list[float]


@dataclass
class RunData:
    """One compared stage: a seed of one variant."""

    stage: str
    variant: str  # the row: the variant's name parts without the replicate key (the stage name without a matrix)
    replicate: str | None  # e.g. "seed_1"
    training: str | None = None  # the training stage the curves come from
    samples_per_step: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Curve] = field(default_factory=dict)  # "loss", "val_top1"
    per_block: dict[str, list[float]] = field(default_factory=dict)  # "gini", "synchrony", "entropy"

    def final_val_top1(self) -> float | None:
        curve = self.curves.get("val_top1")
        return curve.values[-1] if curve and curve.values else self.metrics.get("val_top1")


def row_of(config: PipelineConfig, stage: str, replicates: str) -> tuple[str, str | None]:
    """(row label, replicate) of ``stage``: ``pretrain-vit-seed_1`` with replicates ``seed`` -> (``vit``,
    ``seed_1``)."""
    variant = config.stages[stage].variant
    if variant is None:
        return stage, None
    parts = [label for path, label in variant.axes.items() if path != replicates]
    return "-".join(parts) or variant.of, variant.axes.get(replicates)


def lineage(config: PipelineConfig, stage: str) -> list[str]:
    """``stage`` and everything it depends on, nearest first."""
    needs = config.needs()
    order, seen, todo = [], {stage}, deque([stage])
    while todo:
        name = todo.popleft()
        order.append(name)
        for dep in needs.get(name, []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return order


def collect_runs(run: RunDir, config: PipelineConfig, stages: list[str], replicates: str) -> list[RunData]:
    records = ResultsLog(run.results_file).records()
    return [_collect(run, config, stage, replicates, records) for stage in stages]


def _collect(run: RunDir, config: PipelineConfig, stage: str, replicates: str,
             records: list[dict[str, Any]]) -> RunData:
    variant, replicate = row_of(config, stage, replicates)
    data = RunData(stage, variant, replicate)
    ancestry = lineage(config, stage)
    latest = {record["protocol"]: record["metrics"] for record in records
              if record.get("stage") in ancestry and record.get("dataset", "val") == "val" and "protocol" in record}
    for name, (protocol, key) in PROTOCOL_METRICS.items():
        value = latest.get(protocol, {}).get(key)
        if isinstance(value, int | float):
            data.metrics[name] = float(value)
    for name in ANALYSIS_METRICS:
        found = latest.get("analysis", {}).get(name)
        if isinstance(found, dict) and found.get("per_block"):
            data.metrics[name] = float(found["mean"])
            data.metrics[f"{name}_last"] = float(found["per_block"][-1])
            data.per_block[name] = [float(value) for value in found["per_block"]]
    _add_training(run, data, ancestry)
    if not data.metrics and not data.curves:
        raise KopeError(f"report: stage '{stage}' has no evaluation in {run.results_file.name} and no training "
                        "stage upstream with outputs to compare")
    return data


def _add_training(run: RunDir, data: RunData, ancestry: list[str]) -> None:
    for name in ancestry:
        state = run.read(name)
        if state is None or state.status != "done" or "tensorboard" not in state.outputs:
            continue
        outputs = state.outputs
        data.training = name
        for metric, key in TRAINING_OUTPUTS.items():
            if isinstance(outputs.get(key), int | float):
                data.metrics[metric] = float(outputs[key])
        if outputs.get("steps") and outputs.get("samples_seen"):
            data.samples_per_step = outputs["samples_seen"] / outputs["steps"]
        scalars = read_scalars(run.root / outputs["tensorboard"], [LOSS_TAG, *VAL_TAGS])
        if LOSS_TAG in scalars:
            data.curves["loss"] = Curve(*scalars[LOSS_TAG])
        val = next((scalars[tag] for tag in VAL_TAGS if tag in scalars), None)
        if val is not None:
            data.curves["val_top1"] = Curve(*val)
        return
