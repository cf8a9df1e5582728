"""Rank, local rank, world size and master address, read from whichever launcher started us.

This is the one place that knows the launchers' variable names (torchrun, Slurm, our local executor).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def export(self) -> dict[str, str]:
        """The variables torch.distributed and DeepSpeed read (env:// initialisation)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def _first_host(nodelist: str) -> str:
    """``node[01-04,07],other`` -> ``node01``: the first host of a Slurm node list."""
    bracket, comma = nodelist.find("["), nodelist.find(",")
    if bracket == -1 or (comma != -1 and comma < bracket):
        return nodelist.split(",")[0]
    return nodelist[:bracket] + re.split(r"[,\-\]]", nodelist[bracket + 1:])[0]


SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


def _default_port(env: Mapping[str, str]) -> int:
    """Jobs sharing a node must not share a rendezvous port: under Slurm the port follows the job id."""
    job_id = env.get("SLURM_JOB_ID", "")
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id.isdigit() else 29500


def rank_info_from_env(env: Mapping[str, str] | None = None) -> RankInfo:
    """torchrun's variables win, then Slurm's, else a single process."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT") or _default_port(env))
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                        env.get("MASTER_ADDR", "127.0.0.1"), port)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                        addr, port)
    return RankInfo()


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous of processes started here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
