"""What every Slurm task of a stage runs: submitit unpickles a :class:`StageJob` and calls it.

The stage itself runs in a child process, through the same entry point as everywhere else
(``python -m pipeline.core.stage_main RUN_DIR STAGE``), so this process stays free to handle signals:

* SIGUSR2, which Slurm sends ``signal_delay_s`` before the time limit (and submitit uses for preemption
  notices): the stage process gets SIGUSR1, checkpoints and exits; on rank 0 submitit then calls
  :meth:`StageJob.checkpoint` and requeues the job, which starts the same entry point again and resumes
  from the stage's ``latest`` checkpoint.
* SIGTERM (``scancel``, ``scontrol requeue``, preemption with ``PreemptMode=REQUEUE``): Slurm signals the
  stage process directly, it checkpoints if it can, and Slurm requeues or ends the job.

The stage process writes its own state (rank 0 only), as everywhere; while an interrupted stage waits to be
requeued, ``kope status`` shows it as ``requeued``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

from pipeline.core.launch import StageLaunch
from pipeline.core.ranks import rank_info_from_env
from pipeline.core.run_dir import RunDir

# This process only watches the stage process: it imports only the torch-free core, so a job starts its stage
# without paying for torch twice.
log = logging.getLogger("kope.slurm")
STAGE_STOP_SIGNAL = signal.SIGUSR1  # asks a stage process to checkpoint and exit
SLURM_WARN_SIGNAL = signal.SIGUSR2  # submitit's --signal: time limit near, or preemption
POLL_S = 0.2


class StageProcessError(RuntimeError):
    """The stage process of this task failed; its traceback is in the stage log."""


def _ignore_warn_signal() -> None:
    """In the stage process: Slurm's warning signal reaches every process of the step, but only this job
    process decides what it means (the stage is told with STAGE_STOP_SIGNAL)."""
    signal.signal(SLURM_WARN_SIGNAL, signal.SIG_IGN)


class StageJob(Checkpointable):
    """One task of a stage's Slurm job: the whole stage, or part ``part`` of ``parts`` for array jobs."""

    def __init__(self, launch: StageLaunch, part: int | None = None, parts: int | None = None,
                 stop_grace_s: float = 90.0) -> None:
        self.launch, self.part, self.parts = launch, part, parts
        self.run_dir, self.stage = str(launch.run_dir), launch.stage
        self.stop_grace_s = stop_grace_s
        self._child: subprocess.Popen | None = None
        self._interrupted: str | None = None

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("_child", "_interrupted")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _child=None, _interrupted=None)

    def command(self) -> list[str]:
        return [sys.executable, *self.launch.command(self.part, self.parts)[1:]]

    def __call__(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
        rank = rank_info_from_env()
        if self.part is None and self._finished_in_this_job():
            log.info("stage %s already finished in job %s; nothing to do", self.stage, os.environ["SLURM_JOB_ID"])
            return
        env = {**os.environ, **rank.export()}
        submitit_handler = signal.getsignal(SLURM_WARN_SIGNAL)
        self._child = subprocess.Popen(self.command(), env=env, preexec_fn=_ignore_warn_signal)
        signal.signal(signal.SIGTERM, self._on_terminate)
        signal.signal(SLURM_WARN_SIGNAL, functools.partial(self._on_warning, submitit_handler))
        while not self._stage_exited():
            time.sleep(POLL_S)
        signal.signal(SLURM_WARN_SIGNAL, signal.SIG_IGN)
        code = self._child.returncode
        if self._interrupted:
            log.warning("stage %s stopped after %s (exit code %s)", self.stage, self._interrupted, code)
            return
        if code != 0:
            what = self.stage if self.part is None else f"{self.stage} part {self.part}/{self.parts}"
            raise StageProcessError(f"stage {what} exited with code {code} (rank {rank.rank}); "
                                    f"see {Path(self.run_dir) / 'logs'}")

    def checkpoint(self, *args: object, **kwargs: object) -> DelayedSubmission:
        """Called by submitit on rank 0 after the warning signal: let the stage save, then requeue it."""
        self._wait_for_stage()
        return DelayedSubmission(StageJob(self.launch, self.part, self.parts, self.stop_grace_s))

    def _on_warning(self, submitit_handler: Callable | int | None, signum: int,
                    frame: types.FrameType | None) -> None:
        self._interrupted = self._interrupted or signal.Signals(signum).name
        self._signal_stage(STAGE_STOP_SIGNAL)
        if callable(submitit_handler):
            submitit_handler(signum, frame)

    def _on_terminate(self, signum: int, frame: types.FrameType | None) -> None:
        # Slurm signals every process of the step: the stage has its own SIGTERM already.
        self._interrupted = self._interrupted or signal.Signals(signum).name

    # The stage process is watched with waitpid, not Popen.wait/poll: these run in signal handlers too, where
    # Popen's internal lock may be held by the interrupted main thread.
    def _stage_exited(self) -> bool:
        if self._child is None or self._child.returncode is not None:
            return True
        try:
            pid, status = os.waitpid(self._child.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by an interrupted wait of our own
            self._child.returncode = -1
            return True
        if pid == 0:
            return False
        self._child.returncode = os.waitstatus_to_exitcode(status)
        return True

    def _signal_stage(self, signum: int) -> None:
        if not self._stage_exited():
            os.kill(self._child.pid, signum)

    def _wait_for_stage(self) -> None:
        deadline = time.monotonic() + self.stop_grace_s
        while not self._stage_exited():
            if time.monotonic() > deadline:
                log.error("stage %s did not stop within %.0fs of %s; killing it (it resumes from its last "
                          "checkpoint)", self.stage, self.stop_grace_s, STAGE_STOP_SIGNAL.name)
                self._signal_stage(signal.SIGKILL)
                deadline = float("inf")
            time.sleep(POLL_S)

    def _finished_in_this_job(self) -> bool:
        """A requeue that arrives after the stage finished must not run it again."""
        job = os.environ.get("SLURM_JOB_ID")
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
            return False
        state = RunDir(self.run_dir).read(self.stage)
        return state is not None and state.status == "done" and state.job is not None and state.job.job_id == job
