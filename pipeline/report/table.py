"""The report's table: one row per variant, one column per metric, each cell the mean ± sample standard deviation
(n - 1) over the variant's runs (its seeds), and the best row of each column marked."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from pipeline.core.errors import KopeError
from pipeline.report.collect import RunData


@dataclass(frozen=True)
class MetricInfo:
    title: str
    higher_is_better: bool
    percent: bool = False
    digits: int = 3


METRICS: dict[str, MetricInfo] = {
    "top1": MetricInfo("top-1 %", True, percent=True, digits=1),
    "top5": MetricInfo("top-5 %", True, percent=True, digits=1),
    "knn_top1": MetricInfo("k-NN top-1 %", True, percent=True, digits=1),
    "linear_top1": MetricInfo("linear top-1 %", True, percent=True, digits=1),
    "zeroshot_top1": MetricInfo("zero-shot top-1 %", True, percent=True, digits=1),
    "val_top1": MetricInfo("val top-1 % (training)", True, percent=True, digits=1),
    "final_loss": MetricInfo("final train loss", False),
    "steps_to_reference": MetricInfo("steps to ref. top-1", False, digits=0),
    "gini": MetricInfo("CLS Gini", True),
    "gini_last": MetricInfo("CLS Gini, last block", True),
    "synchrony": MetricInfo("synchrony", True),
    "synchrony_last": MetricInfo("synchrony, last block", True),
    "entropy": MetricInfo("CLS entropy", False),
}
TIE = 1e-12
CURVE_PRECISION = 1e-6  # curves come back from TensorBoard as float32


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # None for a single value
    n: int  # runs with a value
    of: int  # runs in the row


@dataclass
class Row:
    variant: str
    runs: list[RunData]
    stats: dict[str, Stat] = field(default_factory=dict)


@dataclass
class Table:
    rows: list[Row]
    metrics: list[str]  # the columns shown
    omitted: list[str]  # asked for, measured by no run
    best: dict[str, set[str]]  # metric -> variants marked best
    run_values: dict[str, dict[str, float]]  # stage -> its values (steps_to_reference included)
    reference: str | None = None
    target: float | None = None  # the reference's mean final validation top-1 (steps_to_reference)


def stat(values: list[float], of: int) -> Stat | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values), of)


def steps_to(curve_steps: list[int], curve_values: list[float], target: float) -> int | None:
    """The first logged step whose value reaches ``target`` (to TensorBoard's float32 precision), or None."""
    reach = target - CURVE_PRECISION * abs(target)
    return next((step for step, value in zip(curve_steps, curve_values) if value >= reach), None)


def summarise(runs: list[RunData], metrics: list[str], reference: str | None = None) -> Table:
    """Group ``runs`` by variant (first appearance order) and summarise each asked metric."""
    groups: dict[str, list[RunData]] = {}
    for data in runs:
        groups.setdefault(data.variant, []).append(data)
    rows = [Row(variant, members) for variant, members in groups.items()]
    if reference is not None and reference not in groups:
        raise KopeError(f"report: reference '{reference}' is not a variant (variants: {', '.join(groups)})")
    reference = reference or rows[0].variant
    finals = [value for data in groups[reference] if (value := data.final_val_top1()) is not None]
    target = statistics.fmean(finals) if finals else None
    per_run: dict[str, dict[str, float]] = {}
    for data in runs:
        values = dict(data.metrics)
        curve = data.curves.get("val_top1")
        if target is not None and curve is not None:
            reached = steps_to(curve.steps, curve.values, target)
            if reached is not None:
                values["steps_to_reference"] = float(reached)
        per_run[data.stage] = values
    for row in rows:
        for name in metrics:
            found = stat([per_run[data.stage][name] for data in row.runs if name in per_run[data.stage]],
                         len(row.runs))
            if found is not None:
                row.stats[name] = found
    shown = [name for name in metrics if any(name in row.stats for row in rows)]
    if "steps_to_reference" in shown and target is None:
        shown.remove("steps_to_reference")
    table = Table(rows, shown, [name for name in metrics if name not in shown], {}, per_run, reference, target)
    table.best = {name: best_rows(rows, name) for name in shown}
    return table


def best_rows(rows: list[Row], metric: str) -> set[str]:
    """The variants with the best mean (ties: all of them); only rows where every run has a value compete, and
    nothing is marked with fewer than two such rows or when they all tie."""
    info = METRICS[metric]
    candidates = [row for row in rows if metric in row.stats and row.stats[metric].n == row.stats[metric].of
                  and math.isfinite(row.stats[metric].mean)]
    if len(candidates) < 2:
        return set()
    pick = max if info.higher_is_better else min
    best = pick(row.stats[metric].mean for row in candidates)
    marked = {row.variant for row in candidates if abs(row.stats[metric].mean - best) <= TIE}
    return marked if len(marked) < len(candidates) else set()


def format_stat(metric: str, found: Stat | None) -> str:
    """``85.3 ± 1.2`` (percent metrics scaled by 100), ``(2/3)`` when some runs have no value, ``–`` for none."""
    if found is None:
        return "–"
    info = METRICS[metric]
    scale = 100.0 if info.percent else 1.0
    text = f"{found.mean * scale:.{info.digits}f}"
    if found.std is not None:
        text += f" ± {found.std * scale:.{info.digits}f}"
    if found.n < found.of:
        text += f" ({found.n}/{found.of})"
    return text
