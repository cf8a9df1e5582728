"""The report's table as text: Markdown (``report.md``), CSV (``report.csv`` per variant, ``runs.csv`` per run)
and an aligned plain-text table for terminals (``headline.txt``, which ``kope status`` prints)."""

from __future__ import annotations

import csv
import io

from pipeline.report.collect import RunData
from pipeline.report.table import METRICS, Stat, Table, format_stat

BEST_MARK = "*"


def _direction_note(table: Table) -> str:
    higher = [METRICS[name].title for name in table.metrics if METRICS[name].higher_is_better]
    lower = [METRICS[name].title for name in table.metrics if not METRICS[name].higher_is_better]
    parts = [f"higher is better for {', '.join(higher)}" if higher else "",
             f"lower for {', '.join(lower)}" if lower else ""]
    return "; ".join(part for part in parts if part)


def _reference_note(table: Table) -> str:
    if "steps_to_reference" not in table.metrics or table.target is None:
        return ""
    return (f"Steps to ref. top-1: the first logged step at which a run's validation top-1 reaches the mean final "
            f"validation top-1 of `{table.reference}` ({100 * table.target:.1f} %); runs that never reach it have "
            "no value.")


def markdown(table: Table, title: str, plots: list[str]) -> str:
    runs = sum(len(row.runs) for row in table.rows)
    lines = [f"# {title}", "",
             f"{runs} runs of {len(table.rows)} variants. Each cell is the mean ± sample standard deviation (n − 1) "
             "over a variant's runs (its seeds); `(k/n)`: only k of its n runs have a value. The best row of each "
             f"column is in bold ({_direction_note(table)}): among rows where every run has a value, and only where "
             "those rows differ.", ""]
    if note := _reference_note(table):
        lines += [note, ""]
    header = ["variant", "runs", *(METRICS[name].title for name in table.metrics)]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        cells = [f"`{row.variant}`", str(len(row.runs))]
        for name in table.metrics:
            text = format_stat(name, row.stats.get(name))
            cells.append(f"**{text}**" if row.variant in table.best.get(name, set()) else text)
        lines.append("| " + " | ".join(cells) + " |")
    if table.omitted:
        lines += ["", f"Not measured by any run: {', '.join(table.omitted)}."]
    lines += ["", "## Runs", "", "| stage | variant | replicate | training stage | "
              + " | ".join(METRICS[name].title for name in table.metrics) + " |",
              "|" + "|".join(["---"] * 4 + ["---:"] * len(table.metrics)) + "|"]
    for row in table.rows:
        for data in row.runs:
            values = _run_values(table, data)
            lines.append(f"| `{data.stage}` | `{row.variant}` | {data.replicate or '–'} | "
                         f"{f'`{data.training}`' if data.training else '–'} | " + " | ".join(values) + " |")
    if plots:
        lines += ["", "## Plots", "", "Lines: the mean over a variant's runs; bands: from the lowest to the highest "
                  "run.", ""]
        lines += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _run_values(table: Table, data: RunData) -> list[str]:
    values = table.run_values[data.stage]
    return [format_stat(name, Stat(values[name], None, 1, 1) if name in values else None) for name in table.metrics]


def plain_text(table: Table) -> str:
    """An aligned table with the best per column marked ``*``, and one line saying what the cells are."""
    header = ["variant", "runs", *(METRICS[name].title for name in table.metrics)]
    rows = [header]
    for row in table.rows:
        cells = [row.variant, str(len(row.runs))]
        for name in table.metrics:
            mark = f" {BEST_MARK}" if row.variant in table.best.get(name, set()) else ""
            cells.append(format_stat(name, row.stats.get(name)) + mark)
        rows.append(cells)
    widths = [max(len(cells[i]) for cells in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in rows]
    note = f"mean ± std over each variant's runs; {BEST_MARK} best per column"
    if table.target is not None and "steps_to_reference" in table.metrics:
        note += f"; reference {table.reference} at {100 * table.target:.1f} % top-1"
    return "\n".join(lines + [note]) + "\n"


def csv_text(table: Table) -> str:
    """One line per variant: ``<metric>_mean``, ``_std`` and ``_n`` (fractions, not percent), and the metrics it
    is best at."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["variant", "runs", *(f"{name}_{part}" for name in table.metrics for part in ("mean", "std", "n")),
                     "best"])
    for row in table.rows:
        cells: list[object] = [row.variant, len(row.runs)]
        for name in table.metrics:
            found = row.stats.get(name)
            cells += [repr(found.mean), repr(found.std) if found.std is not None else "", found.n] if found else \
                ["", "", 0]
        cells.append(";".join(name for name in table.metrics if row.variant in table.best.get(name, set())))
        writer.writerow(cells)
    return out.getvalue()


def runs_csv(table: Table) -> str:
    """One line per run: its stage, variant, replicate, training stage and values."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["stage", "variant", "replicate", "training", *table.metrics])
    for row in table.rows:
        for data in row.runs:
            values = table.run_values[data.stage]
            writer.writerow([data.stage, row.variant, data.replicate or "", data.training or "",
                             *(repr(values[name]) if name in values else "" for name in table.metrics)])
    return out.getvalue()
