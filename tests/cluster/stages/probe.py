"""A stage that joins the process group and all-reduces, and tells the test, outside the run directory, what each
rank saw: its rank, world, host and Slurm node, the master address, and the all-reduce result."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.core.config.types import setting
from pipeline.core.ranks import rank_info_from_env
from pipeline.core.stage import StageContext


@dataclass
class Settings:
    report_dir: str = setting(help="folder outside the run directory for one report per rank")


def run(settings: Settings, ctx: StageContext) -> dict:
    info = rank_info_from_env()
    dist.init_process_group("gloo", init_method="env://", rank=info.rank, world_size=info.world_size)
    try:
        value = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(value)
    finally:
        dist.destroy_process_group()
    report = {"rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank, "pid": os.getpid(),
              "host": socket.gethostname(), "slurm_node": os.environ.get("SLURMD_NODENAME"),
              "master_addr": info.master_addr, "all_reduce": value.item()}
    Path(settings.report_dir).mkdir(parents=True, exist_ok=True)
    (Path(settings.report_dir) / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    if ctx.is_main:
        (ctx.out_dir / "result.json").write_text(json.dumps({"all_reduce": value.item()}))
    return {"all_reduce": value.item(), "world_size": ctx.world_size}
