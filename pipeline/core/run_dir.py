"""The run directory: every path of a run, its resolved config, the config snapshots stages read, and the
per-stage state files. The one module that knows the layout::

    runs/<name>/
        config.yaml               the resolved config of the latest ``kope run`` (for people and ``kope status``)
        snapshots/config-<h>.yaml the config a launch of a stage reads, named by its content: never rewritten, so a
                                  queued job runs the settings it was submitted with, whatever a later
                                  ``kope run`` writes, and every machine of a multi-node launch names the same file
        state/<stage>.json        status, identity, inputs, outputs, errors, Slurm jobs (written atomically)
        logs/                     kope.log, <stage>.log, <stage>.rank<r>.log, <stage>.part<i>.log, tracebacks
        slurm/                    job scripts and logs
        results.jsonl             one line per evaluation
        <stage>/                  each stage's outputs
        .lock                     held by the ``kope run`` that drives the run
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_write_json, atomic_write_text, canonical_json, sha256_text
from pipeline.core.run_state import StageState

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.jsonl"


class RunDir:
    """Paths and state files of one run directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.state_dir = self.root / "state"
        self.log_dir = self.root / "logs"
        self.snapshot_dir = self.root / "snapshots"
        self.slurm_dir = self.root / "slurm"
        self.config_file = self.root / CONFIG_FILE
        self.results_file = self.root / RESULTS_FILE
        self.lock_file = self.root / ".lock"

    def __fspath__(self) -> str:
        return str(self.root)

    # --- paths -----------------------------------------------------------------------------------------------

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def state_file(self, stage: str) -> Path:
        return self.state_dir / f"{stage}.json"

    def stage_log(self, stage: str, rank: int = 0, part: int | None = None) -> Path:
        if part is not None:
            return self.log_dir / f"{stage}.part{part}.log"
        return self.log_dir / (f"{stage}.log" if rank == 0 else f"{stage}.rank{rank}.log")

    def traceback_file(self, stage: str, rank: int = 0, part: int | None = None) -> Path:
        return self.stage_log(stage, rank, part).with_suffix(".traceback.txt")

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory when it is inside it (what state files record)."""
        path = Path(path)
        for root in (self.root, self.root.resolve()):
            if path.is_relative_to(root):
                return str(path.relative_to(root))
        return str(path)

    # --- configs ---------------------------------------------------------------------------------------------

    def write_resolved_config(self, tree: dict[str, Any]) -> None:
        atomic_write_text(self.config_file, yaml.safe_dump(tree, sort_keys=False))

    def snapshot_path(self, tree: dict[str, Any]) -> Path:
        """Where the snapshot of ``tree`` lives (a function of its content alone)."""
        return self.snapshot_dir / f"config-{sha256_text(canonical_json(tree))[:16]}.yaml"

    def write_snapshot(self, tree: dict[str, Any]) -> str:
        """The immutable copy of the resolved config that launched stages read; returns its path relative to
        the run directory (written once: the same content always has the same name)."""
        path = self.snapshot_path(tree)
        if not path.exists():
            atomic_write_text(path, yaml.safe_dump(tree, sort_keys=False))
        return self.relative(path)

    def declared_stages(self) -> dict[str, list[str]]:
        """stage -> needs, in the order of the resolved config (empty if there is none)."""
        if not self.config_file.exists():
            return {}
        stages = (yaml.safe_load(self.config_file.read_text(encoding="utf-8")) or {}).get("stages", {})
        return {name: list(block.get("needs", [])) for name, block in stages.items()}

    # --- state files -----------------------------------------------------------------------------------------

    def read(self, stage: str) -> StageState | None:
        path = self.state_file(stage)
        if not path.exists():
            return None
        try:
            return StageState.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise KopeError(f"{path}: unreadable state file: {exc}") from None

    def write(self, state: StageState) -> None:
        atomic_write_json(self.state_file(state.stage), state.to_json())

    def stage_names(self) -> list[str]:
        return sorted(path.stem for path in self.state_dir.glob("*.json"))

    def require(self) -> RunDir:
        """This run directory, or a one-line error when it is not one."""
        if not self.state_dir.is_dir():
            raise KopeError(f"{self.root}: not a run directory (no state/ folder)")
        return self
