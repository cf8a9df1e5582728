"""The report's PNG plots (matplotlib, no display): training loss and validation top-1 against steps and against
samples seen, and the per-block CLS-attention Gini and phase synchrony of each variant's export. One line per
variant (the mean over its runs), a band from its lowest to its highest run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.fsutil import atomic_path
from pipeline.report.table import Row, Table

CURVES = {"loss": ("train loss", 1.0), "val_top1": ("validation top-1 (%)", 100.0)}
BLOCK_METRICS = {"gini": "CLS-attention Gini", "synchrony": "phase synchrony"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(series: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """x, mean, low, high over the points every series has (series: (x, y) pairs of equal x where they meet)."""
    common = sorted(set.intersection(*(set(xs) for xs, _ in series)))
    lookup = [dict(zip(xs, ys)) for xs, ys in series]
    mean = [sum(values[x] for values in lookup) / len(lookup) for x in common]
    low = [min(values[x] for values in lookup) for x in common]
    high = [max(values[x] for values in lookup) for x in common]
    return common, mean, low, high


def _row_curve(row: Row, curve: str, by_samples: bool, scale: float) -> list[tuple[list[float], list[float]]]:
    series = []
    for data in row.runs:
        found = data.curves.get(curve)
        if found is None or (by_samples and not data.samples_per_step):
            continue
        factor = data.samples_per_step if by_samples else 1.0
        series.append(([step * factor for step in found.steps], [value * scale for value in found.values]))
    return series


def _save(fig: Any, path: Path) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _draw_bands(ax, drawn: list, **style) -> None:
    """One line per variant (the mean of its runs) and, over several runs, the band from lowest to highest."""
    for row, series in drawn:
        xs, mean, low, high = _band(series)
        line, = ax.plot(xs, mean, label=f"{row.variant} ({len(series)})", linewidth=1.6, **style)
        if len(series) > 1:
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def _curve_plot(table: Table, curve: str, by_samples: bool, path: Path) -> bool:
    label, scale = CURVES[curve]
    drawn = [(row, _row_curve(row, curve, by_samples, scale)) for row in table.rows]
    drawn = [(row, series) for row, series in drawn if series]
    if not drawn:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    _draw_bands(ax, drawn)
    if curve == "val_top1" and table.target is not None:
        ax.axhline(table.target * 100, color="grey", linestyle=":", linewidth=1,
                   label=f"{table.reference} final mean")
    ax.set_xlabel("samples seen" if by_samples else "optimizer steps")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def _block_plot(table: Table, metric: str, path: Path) -> bool:
    drawn = []
    for row in table.rows:
        series = [data.per_block[metric] for data in row.runs if metric in data.per_block]
        if series:
            depth = min(len(values) for values in series)
            blocks = list(range(1, depth + 1))
            drawn.append((row, [(blocks, values[:depth]) for values in series]))
    if not drawn:
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    _draw_bands(ax, drawn, marker="o")
    ax.set_xlabel("block")
    ax.set_ylabel(BLOCK_METRICS[metric])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def write_plots(table: Table, out_dir: Path) -> list[str]:
    """Write every plot there is data for into ``out_dir``; returns their file names."""
    written = []
    for curve in CURVES:
        for by_samples in (False, True):
            name = f"{curve}_vs_{'samples' if by_samples else 'steps'}.png"
            if _curve_plot(table, curve, by_samples, out_dir / name):
                written.append(name)
    for metric in BLOCK_METRICS:
        name = f"{metric}_per_block.png"
        if _block_plot(table, metric, out_dir / name):
            written.append(name)
    return written
