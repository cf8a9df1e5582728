"""The contract between the runner and a stage kind.

A stage kind (see :mod:`pipeline.core.kinds`) has a ``Settings`` dataclass and

* ``run(settings, ctx) -> dict``: does the work, writing only below ``ctx.out_dir``, and returns its outputs
  (JSON-serialisable: paths relative to the run directory, counts, metrics);
* optionally ``run_part(settings, ctx, part, parts) -> None``: the ``part``-th of ``parts`` independent slices of
  the work (on Slurm an array job runs the parts, then one job runs ``run``, which finds them done).

A stage is re-run from the start after a crash with the same ``out_dir``: it must finish what is missing
rather than assume an empty folder. The stage process marks it done only after ``run`` returns. A stage that
stops on a signal raises :class:`pipeline.core.errors.Interrupted` after saving what it has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config.types import is_stage_ref, split_stage_ref
from pipeline.core.run_dir import RunDir


@dataclass
class StageContext:
    """What a running stage knows about its place in the pipeline and the process group."""

    name: str
    run_dir: Path
    out_dir: Path
    seed: int
    log: logging.Logger
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # see pipeline.core.identity

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes run-directory files (state, logs, manifests, exports)."""
        return self.rank == 0

    def input_path(self, value: str) -> Path:
        """Resolve an ``InputPath`` setting: ``@stage/sub`` to that stage's output folder, else as given."""
        if is_stage_ref(value):
            stage, sub = split_stage_ref(value)
            base = self.stage_dirs[stage]
            return base / sub if sub else base
        return Path(value)

    def relative(self, path: Path) -> str:
        """``path`` as the outputs record it: relative to the run directory."""
        return self.run.relative(path)
