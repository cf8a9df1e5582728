"""What the runner hands to whatever starts a stage's processes, and where those starters live.

An executor receives a :class:`StageLaunch` (run directory, stage, config snapshot, process count) and returns
the stage's exit status; it knows nothing of the runner or the config schema. The inline executor runs the
stage in this process; the others live in ``cluster/`` (above this core) and are found by name, so the core
never imports them (or anything heavy) until a run asks for one. A batch scheduler (Slurm) submits stages
instead of running them and answers ``kope status`` / ``kope cancel`` about its jobs.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.core.ranks import RankInfo


@dataclass(frozen=True)
class StageLaunch:
    """One launch of one stage: every process runs :meth:`command`, with its rank in the environment."""

    run_dir: Path
    stage: str
    config: str  # the config snapshot, relative to run_dir
    nproc: int = 1

    def command(self, part: int | None = None, parts: int | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "pipeline.core.stage_main", str(self.run_dir), self.stage, "--config",
               self.config]
        return cmd + (["--part", str(part), "--parts", str(parts)] if part is not None else [])


class Executor(Protocol):
    def world_size(self, launch: StageLaunch) -> int:
        """How many ranks the stage will have (checked against its settings before anything starts)."""

    def run(self, launch: StageLaunch) -> int:
        """Run the stage to its end; its exit status (0 done, 75 interrupted, else failed)."""


@dataclass(frozen=True)
class JobView:
    """What ``kope status`` shows of a stage's scheduler jobs."""

    job: str
    state: str  # "PENDING (Dependency)", "parts RUNNING (3/8 tasks done)"
    log: str
    active: bool
    problem: str | None  # why the stage is not done when the stage itself could not say
    waiting_again: bool  # requeued: waits to run the stage again


class InlineExecutor:
    """Runs the stage in the ``kope`` process itself: simplest, and what tests and the demo use."""

    @classmethod
    def from_profile(cls, profile: Any, pipeline_name: str) -> InlineExecutor:
        return cls()

    def world_size(self, launch: StageLaunch) -> int:
        return 1

    def run(self, launch: StageLaunch) -> int:
        from pipeline.core.stage_main import run_stage

        return run_stage(launch.run_dir, launch.stage, launch.config, RankInfo()).code


EXECUTORS = {
    "inline": "pipeline.core.launch:InlineExecutor",
    "local": "cluster.executors:LocalExecutor",
    "torchrun": "cluster.executors:TorchrunExecutor",
}
SCHEDULERS = {"slurm": "cluster.slurm_runs:SlurmScheduler"}


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def executor(name: str, profile: Any, pipeline_name: str) -> Executor:
    """The executor called ``name``, set up from the cluster profile (None: defaults)."""
    return _load(EXECUTORS[name]).from_profile(profile, pipeline_name)


def scheduler(name: str = "slurm") -> Any:
    """The batch scheduler called ``name`` (see ``cluster.slurm_runs.SlurmScheduler`` for its methods)."""
    return _load(SCHEDULERS[name])()
