"""``kope run --cluster ... --wait``: follow a submitted run until none of its jobs is queued or running.

On a terminal the status table is redrawn in place; in a log file a table is printed only when it
changed, so a CI log shows each transition once.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from cluster.slurm_runs import active_jobs, reconcile
from pipeline.core.errors import StageFailed
from pipeline.core.run_dir import RunDir
from pipeline.core.status import format_status

CLEAR_SCREEN = "\033[H\033[2J"


def follow_run(run: RunDir, stages: list[str], interval_s: float = 5.0, stream: TextIO | None = None) -> None:
    """Block until the jobs of ``stages`` ended; raise StageFailed naming those that are not done."""
    stream = stream or sys.stdout
    live = stream.isatty()
    shown = None
    while True:
        busy = active_jobs(run, stages)
        reconcile(run)
        table = format_status(run.root)
        if table != shown:
            stream.write((CLEAR_SCREEN if live else "\n") + table + "\n")
            stream.flush()
            shown = table
        if not busy:
            break
        time.sleep(interval_s)
    unfinished = [name for name in stages if (state := run.read(name)) is None or state.status != "done"]
    if unfinished:
        raise StageFailed(f"{run.root}: stages not done: {', '.join(unfinished)} (see `kope status {run.root}`)")
