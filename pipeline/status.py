"""``kope status``: one line per stage, read from the run directory's state files."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import KopeError
from pipeline.run_state import RunState, StageState

MAX_OUTPUTS_WIDTH = 60


def _stage_order(run_dir: Path, run_state: RunState) -> list[str]:
    config_path = run_dir / "config.yaml"
    names = run_state.stage_names()
    if config_path.exists():
        declared = list((yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("stages", {}))
        return [name for name in declared if name in names] + [name for name in names if name not in declared]
    return names


def _outputs_summary(state: StageState) -> str:
    parts = [f"{key}={value}" for key, value in state.outputs.items() if not isinstance(value, dict | list)]
    text = " ".join(parts)
    return text if len(text) <= MAX_OUTPUTS_WIDTH else text[: MAX_OUTPUTS_WIDTH - 1] + "…"


def format_status(run_dir: Path) -> str:
    run_state = RunState(run_dir)
    if not run_state.state_dir.is_dir():
        raise KopeError(f"{run_dir}: not a run directory (no state/ folder)")
    rows = [("STAGE", "STATUS", "DURATION", "OUTPUTS")]
    errors = []
    for name in _stage_order(run_dir, run_state):
        state = run_state.read(name)
        if state is None:
            continue
        duration = f"{state.duration_s:.1f}s" if state.duration_s is not None else "-"
        rows.append((name, state.status, duration, _outputs_summary(state) or "-"))
        if state.status == "failed":
            errors.append(f"{name}: {state.error} (see {state.traceback})")
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    return "\n".join(lines + [f"error: {line}" for line in errors])
