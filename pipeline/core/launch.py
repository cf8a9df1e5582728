"""What the runner hands to whatever starts a stage's processes, and where those starters live.

An executor receives a :class:`StageLaunch` (run directory, stage, config snapshot, process count) and returns
the stage's exit status; it knows nothing of the runner or the config schema. The inline executor runs the
stage in this process; the others live in ``cluster/`` (above this core) and are found by name, so the core
never imports them (or anything heavy) until a run asks for one. A batch scheduler (Slurm) submits stages
instead of running them and answers ``kope status`` / ``kope cancel`` about its jobs.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.core.ranks import RankInfo
from pipeline.core.signals import die_with_parent


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


class StageProcesses:
    """The processes of the stage being run, as the runner and the run lock see them.

    An executor starts each process with :meth:`spawn` (in a process group of its own, dying with its parent) and
    waits for them; the runner forwards stop signals to every group or kills them; ``on_change`` hears the PIDs
    alive (the run lock records them, so a second ``kope run`` cannot take over while they live).
    """

    def __init__(self, on_change: Callable[[list[int]], None] | None = None):
        self.procs: list[subprocess.Popen] = []
        self.on_change = on_change or (lambda pids: None)

    def spawn(self, cmd: list[str], **popen: Any) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent, **popen)
        self.procs.append(proc)
        self.on_change(self.pids())
        return proc

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs if proc.returncode is None]

    def forward(self, signum: int) -> None:
        """Send ``signum`` to every process group of the stage (its ranks and their workers)."""
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass

    def kill(self) -> None:
        self.forward(signal.SIGKILL)

    def reap(self, procs: Iterable[subprocess.Popen] | None = None) -> list[int]:
        """Wait for ``procs`` (default: all) to exit, killing any still running; their exit codes."""
        procs = list(self.procs if procs is None else procs)
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        codes = [proc.wait() for proc in procs]
        self.procs = [proc for proc in self.procs if proc not in procs]
        self.on_change(self.pids())
        return codes


class Executor(Protocol):
    def world_size(self, launch: StageLaunch) -> int:
        """How many ranks the stage will have (checked against its settings before anything starts)."""

    def run(self, launch: StageLaunch, processes: StageProcesses) -> int:
        """Run the stage to its end, starting every process through ``processes``; its exit status (0 done, 75
        interrupted, else failed)."""


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

    def run(self, launch: StageLaunch, processes: StageProcesses) -> int:
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
