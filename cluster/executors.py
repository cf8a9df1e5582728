"""Executors start a stage's processes and report whether they all succeeded.

Every executor ends up in :func:`pipeline.stage_exec.execute_stage`; only the way processes are
started differs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Protocol

from cluster.env import RankInfo
from cluster.profile import ClusterProfile, ResolvedTorchrun
from pipeline.config.schema import PipelineConfig, StageSpec
from pipeline.logs import get_logger
from pipeline.stage_exec import execute_stage

log = get_logger("executor")


class Executor(Protocol):
    def run(self, config: PipelineConfig, spec: StageSpec) -> bool:
        """Run the stage to completion; True when it finished successfully."""


class InlineExecutor:
    """Runs the stage in the ``kope`` process itself: simplest, and what tests and the demo use."""

    def run(self, config: PipelineConfig, spec: StageSpec) -> bool:
        try:
            execute_stage(config, spec, RankInfo())
        except Exception:
            return False
        return True


class LocalExecutor:
    """Starts ``nproc`` processes on this machine as one process group (gloo or NCCL via env://)."""

    def __init__(self, nproc: int):
        self.nproc = nproc

    def run(self, config: PipelineConfig, spec: StageSpec) -> bool:
        port = free_port()
        procs = []
        for rank in range(self.nproc):
            info = RankInfo(rank=rank, world_size=self.nproc, local_rank=rank, master_port=port)
            env = {**os.environ, **info.export()}
            cmd = [sys.executable, "-m", "pipeline.stage_main", str(config.run_dir), spec.name]
            procs.append(subprocess.Popen(cmd, env=env))
        codes = wait_all_or_stop(procs)
        if any(codes):
            log.error("stage %s: process exit codes %s", spec.name, codes)
        return not any(codes)


class TorchrunExecutor:
    """One ``torchrun`` per stage on this machine; with several machines each runs the same ``kope run`` and
    their torchrun agents meet at the c10d rendezvous (no ssh, no hostfile)."""

    def __init__(self, settings: ResolvedTorchrun, run_name: str):
        self.settings, self.run_name = settings, run_name

    def command(self, config: PipelineConfig, spec: StageSpec) -> list[str]:
        torchrun = self.settings
        nproc = torchrun.nproc_per_node or spec.launch.nproc
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={torchrun.nnodes}",
               f"--nproc_per_node={nproc}", "--max_restarts=0"]
        if torchrun.rdzv_endpoint is None:
            cmd.append("--standalone")
        else:
            rdzv_id = f"{torchrun.rdzv_id or self.run_name}-{spec.name}"
            cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={torchrun.rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
        return cmd + ["-m", "pipeline.stage_main", str(config.run_dir), spec.name]

    def run(self, config: PipelineConfig, spec: StageSpec) -> bool:
        code = subprocess.call(self.command(config, spec))
        if code:
            log.error("stage %s: torchrun exited with code %d", spec.name, code)
        return code == 0


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def executor_for(config: PipelineConfig, spec: StageSpec, cluster: ClusterProfile | None = None) -> Executor:
    """The profile given to ``kope run --cluster`` decides for every stage; else the stage's launch block,
    else the pipeline's default."""
    name = cluster.executor if cluster is not None else spec.launch.executor or config.settings.executor
    if name == "local":
        return LocalExecutor(spec.launch.nproc)
    if name == "torchrun" and cluster is not None:
        return TorchrunExecutor(cluster.torchrun_settings(), config.settings.name)
    return InlineExecutor()
