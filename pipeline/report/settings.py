"""Settings of the ``report`` stage: plain dataclasses with no heavy imports (read when the config is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.core.config.types import InputPath, SettingError, setting

Metric = Literal["top1", "top5", "knn_top1", "linear_top1", "zeroshot_top1", "val_top1", "final_loss",
                 "steps_to_reference", "gini", "gini_last", "synchrony", "synchrony_last", "entropy"]
DEFAULT_METRICS: tuple[Metric, ...] = ("top1", "steps_to_reference", "final_loss", "gini", "gini_last", "synchrony")


@dataclass
class ReportSettings:
    """Stage ``report``: compare finished stages (usually every variant of a matrix) in tables and plots."""

    runs: list[InputPath] = setting(help="stages to compare, e.g. ['@evaluate[*]'] (every variant of a matrix): "
                                         "evaluate stages (their results.jsonl records) or training stages; the "
                                         "training stage upstream of each gives its curves")
    replicates: str = setting("seed", help="the matrix key averaged over (mean ± std); the other keys of a "
                                           "variant name its row")
    metrics: list[Metric] = setting(default_factory=lambda: list(DEFAULT_METRICS),
                                    help="table columns, in order (a column nothing measured is left out)")
    reference: str | None = setting(None, help="the variant whose final validation top-1 steps_to_reference "
                                               "counts the steps to (default: the first row)")
    title: str = setting("", help="heading of report.md (default: the stage's name)")

    def check(self) -> None:
        if not self.runs:
            raise SettingError("runs", "name at least one stage, e.g. ['@evaluate[*]']")
        if not self.metrics:
            raise SettingError("metrics", "name at least one metric")
        repeated = sorted({name for name in self.metrics if self.metrics.count(name) > 1})
        if repeated:
            raise SettingError("metrics", f"'{repeated[0]}' is listed twice")
