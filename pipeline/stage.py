"""The contract between the runner and a stage module.

A stage module (``stages/<kind>.py`` or any importable module named by ``kind:``) defines

* ``Settings``: a dataclass of its settings (see :mod:`pipeline.config.types`), and
* ``run(settings, ctx) -> dict``: does the work, writing only below ``ctx.out_dir``, and returns its
  outputs (JSON-serialisable: paths relative to the run directory, counts, metrics).

A stage is re-run from the start after a crash with the same ``out_dir``: it must finish what is
missing rather than assume an empty folder. The runner marks it done only after ``run`` returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.types import is_stage_ref, split_stage_ref


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
