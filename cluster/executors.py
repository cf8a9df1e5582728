"""Executors that start a stage's processes on this machine (or, with torchrun, on several) and report their
exit status. Each receives a :class:`pipeline.core.launch.StageLaunch`; every process runs its command, the
stage process entry point, with its rank in the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pipeline.core.cluster_profile import ClusterProfile, ResolvedTorchrun
from pipeline.core.errors import INTERRUPTED_EXIT_CODE
from pipeline.core.launch import StageLaunch, StageProcesses
from pipeline.core.logs import get_logger
from pipeline.core.ranks import RankInfo, free_port

log = get_logger("executor")


class LocalExecutor:
    """Starts ``launch.nproc`` processes on this machine as one process group (gloo or NCCL via env://)."""

    @classmethod
    def from_profile(cls, profile: ClusterProfile | None, pipeline_name: str) -> LocalExecutor:
        return cls()

    def world_size(self, launch: StageLaunch) -> int:
        return launch.nproc

    def run(self, launch: StageLaunch, processes: StageProcesses) -> int:
        port = free_port()
        procs = []
        for rank in range(launch.nproc):
            info = RankInfo(rank=rank, world_size=launch.nproc, local_rank=rank, master_port=port)
            procs.append(processes.spawn(launch.command(), env={**os.environ, **info.export()}))
        try:
            codes = wait_all_or_stop(procs)
        finally:
            processes.reap(procs)
        if any(codes):
            log.error("stage %s: process exit codes %s", launch.stage, codes)
        return combined_status(codes)


TORCHRUN_FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""The stop signals torchrun's agent passes on to its workers (by default it would die of SIGUSR1)."""


class TorchrunExecutor:
    """One ``torchrun`` per stage on this machine; with several machines each runs the same ``kope run`` and
    their torchrun agents meet at the c10d rendezvous (no ssh, no hostfile). A stop signal reaches the agent,
    which passes it to its workers; the workers die with the agent (``pipeline.core.signals.die_with_parent``)."""

    def __init__(self, settings: ResolvedTorchrun, run_name: str):
        self.settings, self.run_name = settings, run_name

    @classmethod
    def from_profile(cls, profile: ClusterProfile | None, pipeline_name: str) -> TorchrunExecutor:
        if profile is None:
            raise ValueError("the torchrun executor needs a cluster profile (--cluster torchrun)")
        return cls(profile.torchrun_settings(), pipeline_name)

    def world_size(self, launch: StageLaunch) -> int:
        return self.settings.nnodes * (self.settings.nproc_per_node or launch.nproc)

    def command(self, launch: StageLaunch) -> list[str]:
        torchrun = self.settings
        nproc = torchrun.nproc_per_node or launch.nproc
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={torchrun.nnodes}",
               f"--nproc_per_node={nproc}", "--max_restarts=0"]
        if torchrun.rdzv_endpoint is None:
            cmd.append("--standalone")
        else:
            rdzv_id = f"{torchrun.rdzv_id or self.run_name}-{launch.stage}"
            cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={torchrun.rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
        return cmd + launch.command()[1:]

    def run(self, launch: StageLaunch, processes: StageProcesses) -> int:
        env = {**os.environ, "TORCHELASTIC_SIGNALS_TO_HANDLE": TORCHRUN_FORWARDED_SIGNALS}
        agent = processes.spawn(self.command(launch), env=env)
        try:
            code = agent.wait()
        finally:
            processes.reap([agent])
        if code:
            log.error("stage %s: torchrun exited with code %d", launch.stage, code)
        return code


def combined_status(codes: list[int]) -> int:
    """One exit status for a stage's processes: 0 when all succeeded, 75 when every one either succeeded or
    was interrupted, else the first failure's."""
    if all(code == 0 for code in codes):
        return 0
    if all(code in (0, INTERRUPTED_EXIT_CODE) for code in codes):
        return INTERRUPTED_EXIT_CODE
    return next(code for code in codes if code not in (0, INTERRUPTED_EXIT_CODE))


def wait_all_or_stop(procs: list[subprocess.Popen], grace_s: float = 30.0) -> list[int]:
    """Exit codes of ``procs`` (each the leader of its own process group); once one fails the others' groups get
    SIGTERM after ``grace_s`` (then SIGKILL), since ranks waiting in a collective for a dead peer would otherwise
    wait forever."""
    failed_at = None
    while None in (codes := [proc.poll() for proc in procs]):
        if failed_at is None and any(code not in (None, 0, INTERRUPTED_EXIT_CODE) for code in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            _signal_groups(procs, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            _signal_groups(procs, signal.SIGKILL)
            break
        time.sleep(0.2)
    return [proc.wait() for proc in procs]


def _signal_groups(procs: list[subprocess.Popen], signum: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
