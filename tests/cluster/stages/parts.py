"""A stage whose work splits into parts (like a sharding stage): ``run_part`` writes items ``i % parts == part``,
``run`` writes whatever is missing and sums them up."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pipeline.core.config.types import setting
from pipeline.core.stage import StageContext


@dataclass
class Settings:
    items: int = setting(6, ge=1)


def _write(ctx: StageContext, item: int, writer: str) -> None:
    path = ctx.out_dir / f"item{item}.json"
    if not path.exists():
        path.write_text(json.dumps({"item": item, "writer": writer}))


def run_part(settings: Settings, ctx: StageContext, part: int, parts: int) -> None:
    task = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    for item in range(part, settings.items, parts):
        _write(ctx, item, f"part {part}/{parts} task {task}")


def run(settings: Settings, ctx: StageContext) -> dict:
    for item in range(settings.items):
        _write(ctx, item, "run")
    writers = [json.loads((ctx.out_dir / f"item{item}.json").read_text())["writer"] for item in range(settings.items)]
    return {"items": settings.items, "written_by_run": sum(writer == "run" for writer in writers)}
