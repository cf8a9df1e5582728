"""``kope status``: one line per stage, read from the run directory's state files.

Stages submitted to Slurm also show their job, its Slurm state and the job log; a stage whose job ended
without the stage recording a result shows as failed with Slurm's reason, one whose job was requeued (time
limit, preemption) as requeued, and a pending stage that can no longer start because a parent failed as
blocked. The variants of a matrix are listed together under one line that counts them by status, and a finished
report's headline table (a text file the report wrote) follows the stages.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from pipeline.core.launch import JobView, scheduler
from pipeline.core.run_dir import RunDir
from pipeline.core.run_state import StageState

MAX_OUTPUTS_WIDTH = 60
HEADLINE_METRICS = ("top1", "val_top1", "knn_top1", "linear_top1", "zeroshot_top1", "miou", "synchrony")


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _outputs_summary(state: StageState) -> str:
    """The outputs as ``key=value``, headline metrics first, cut to the column width."""
    scalars = {key: value for key, value in state.outputs.items() if not isinstance(value, dict | list)}
    order = [key for key in HEADLINE_METRICS if key in scalars]
    order += [key for key in scalars if key not in HEADLINE_METRICS]
    parts = [f"{key}={_short(scalars[key])}" for key in order]
    text = " ".join(parts)
    return text if len(text) <= MAX_OUTPUTS_WIDTH else text[: MAX_OUTPUTS_WIDTH - 1] + "…"


def _job_views(run: RunDir, states: dict[str, StageState]) -> dict[str, JobView]:
    if not any(state.job for state in states.values()):
        return {}
    return scheduler().views(run)


def _matrix_groups(run: RunDir) -> dict[str, str]:
    """stage -> the stage of the file it is a variant of (from the resolved config's ``variant:`` blocks)."""
    if not run.config_file.exists():
        return {}
    stages = (yaml.safe_load(run.config_file.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {name: block["variant"]["of"] for name, block in stages.items()
            if isinstance(block, dict) and isinstance(block.get("variant"), dict) and "of" in block["variant"]}


def _grouped(order: list[str], groups: dict[str, str]) -> list[str]:
    """``order`` with each matrix's variants moved up to its first one."""
    out: list[str] = []
    for name in order:
        if name in out:
            continue
        group = groups.get(name)
        out += [other for other in order if groups.get(other) == group] if group else [name]
    return out


def _report_tables(run: RunDir, states: dict[str, StageState]) -> list[str]:
    lines = []
    for name, state in states.items():
        headline = state.outputs.get("headline") if state.kind == "report" and state.status == "done" else None
        if isinstance(headline, str) and (run.root / headline).is_file():
            where = state.outputs.get("report", headline)
            lines += ["", f"report {name} ({where}):", *(run.root / headline).read_text(encoding="utf-8").splitlines()]
    return lines


def format_status(run_dir: Path) -> str:
    run = RunDir(run_dir).require()
    needs = run.declared_stages()
    names = run.stage_names()
    groups = _matrix_groups(run)
    order = [name for name in needs if name in names] + [name for name in names if name not in needs]
    states = {name: state for name in _grouped(order, groups) if (state := run.read(name)) is not None}
    views = _job_views(run, states)
    header = ("STAGE", "STATUS", "DURATION") + (("SLURM JOB", "SLURM STATE", "LOG") if views else ())
    rows, errors, shown = [header], [], {}
    group_rows: dict[int, str] = {}  # row index -> the matrix whose variants follow it
    for name, state in states.items():
        group = groups.get(name)
        if group and group not in group_rows.values():
            group_rows[len(rows)] = group
            rows.append(())
        view = views.get(name)
        status, error = state.status, state.error if state.status in ("failed", "interrupted") else None
        if view and view.problem:
            status, error = "failed", view.problem
        elif view and view.waiting_again:
            status, error = "requeued", f"requeued after: {state.error}" if state.error else None
        bad_parents = [dep for dep in needs.get(name, []) if shown.get(dep) in ("failed", "blocked")]
        if status == "pending" and bad_parents and not (view and view.active):
            status, error = "blocked", f"not started: needs {', '.join(bad_parents)}, which did not finish"
        shown[name] = status
        duration = f"{state.duration_s:.1f}s" if state.duration_s is not None else "-"
        row = (f"  {name}" if group else name, status, duration)
        if views:
            row += (view.job, view.state, view.log) if view else ("-", "-", "-")
        rows.append(row + (_outputs_summary(state) or "-",))
        if error:
            where = f" (see {state.traceback})" if state.traceback and status == "failed" else ""
            errors.append(f"{name}: {error}{where}")
    for index, group in group_rows.items():
        members = [name for name in states if groups.get(name) == group]
        counts = Counter(shown[name] for name in members)
        rows[index] = ((group, f"matrix of {len(members)}", "") + (("", "", "") if views else ())
                       + (", ".join(f"{count} {status}" for status, count in counts.items()),))
    rows[0] += ("OUTPUTS",)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines + [f"error: {line}" for line in errors] + _report_tables(run, states))
