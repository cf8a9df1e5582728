"""Build a report in a folder: collect the runs, summarise them, write the table files and the plots.

Every file is written under a temporary name and renamed, and plots of an earlier render that this one has no
data for are removed, so the folder always holds one whole report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.config.schema import PipelineConfig
from pipeline.core.fsutil import atomic_write_text
from pipeline.core.run_dir import RunDir
from pipeline.report.collect import collect_runs
from pipeline.report.plots import write_plots
from pipeline.report.render import csv_text, markdown, plain_text, runs_csv
from pipeline.report.settings import ReportSettings
from pipeline.report.table import summarise

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
RUNS_CSV = "runs.csv"
HEADLINE = "headline.txt"


def build_report(run: RunDir, config: PipelineConfig, stages: list[str], settings: ReportSettings,
                 out_dir: Path, title: str) -> dict[str, Any]:
    """Write the report of ``stages`` to ``out_dir``; returns what the stage records as its outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(run, config, stages, settings.replicates)
    table = summarise(runs, list(settings.metrics), settings.reference)
    plots = write_plots(table, out_dir)
    for stale in out_dir.glob("*.png"):
        if stale.name not in plots:
            stale.unlink()
    atomic_write_text(out_dir / REPORT_CSV, csv_text(table))
    atomic_write_text(out_dir / RUNS_CSV, runs_csv(table))
    atomic_write_text(out_dir / HEADLINE, plain_text(table))
    atomic_write_text(out_dir / REPORT_MD, markdown(table, title, plots))
    return {"variants": len(table.rows), "runs": len(runs), "plots": len(plots),
            "report": run.relative(out_dir / REPORT_MD), "headline": run.relative(out_dir / HEADLINE)}
