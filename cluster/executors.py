"""Executors that start a stage's processes on this machine (or, with torchrun, on several) and report their
exit status. Each receives a :class:`pipeline.core.launch.StageLaunch`; every process runs its command, the
stage process entry point, with its rank in the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pipeline.core.cluster_profile import ClusterProfile, ResolvedTorchrun
from pipeline.core.errors import INTERRUPTED_EXIT_CODE
from pipeline.core.launch import StageLaunch
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

    def run(self, launch: StageLaunch) -> int:
        port = free_port()
        procs = []
        for rank in range(launch.nproc):
            info = RankInfo(rank=rank, world_size=launch.nproc, local_rank=rank, master_port=port)
            procs.append(subprocess.Popen(launch.command(), env={**os.environ, **info.export()}))
        codes = wait_all_or_stop(procs)
        if any(codes):
            log.error("stage %s: process exit codes %s", launch.stage, codes)
        return combined_status(codes)


class TorchrunExecutor:
    """One ``torchrun`` per stage on this machine; with several machines each runs the same ``kope run`` and
    their torchrun agents meet at the c10d rendezvous (no ssh, no hostfile)."""

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

    def run(self, launch: StageLaunch) -> int:
        code = subprocess.call(self.command(launch))
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
    """Exit codes of ``procs``; once one fails the others are terminated after ``grace_s`` (then killed), since
    ranks waiting in a collective for a dead peer would otherwise wait forever."""
    failed_at = None
    while None in (codes := [proc.poll() for proc in procs]):
        if failed_at is None and any(codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            break
        time.sleep(0.2)
    return [proc.wait() for proc in procs]
