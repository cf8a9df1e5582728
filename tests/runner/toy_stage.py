"""A stage kind for runner tests: records that it ran, can read an input, sleep or fail."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from pipeline.core.config.types import InputPath, setting
from pipeline.core.signals import ignore_stop_signals
from pipeline.core.stage import StageContext


@dataclass
class Settings:
    value: int = setting(ge=0, le=1000, help="a required number, echoed in the outputs")
    source: InputPath | None = None
    fail: bool = False
    fail_rank: int | None = setting(None, ge=0, help="fail on this rank only")
    sleep_s: float = setting(0.0, ge=0)
    tags: list[str] = setting(default_factory=list)
    window: tuple[float, float] = (0.5, 1.0)  # a tuple default must not look changed next to its stored list
    ignore_stop: bool = False  # like a save that must not be cut: stop signals are ignored while it sleeps


def run(settings: Settings, ctx: StageContext) -> dict:
    with open(ctx.run_dir / "order.txt", "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.name} rank{ctx.rank}/{ctx.world_size}\n")
    if settings.ignore_stop:
        ignore_stop_signals()
    if settings.sleep_s:
        (ctx.out_dir / f"started.rank{ctx.rank}").write_text(str(os.getpid()))
        time.sleep(settings.sleep_s)
    if settings.fail or settings.fail_rank == ctx.rank:
        raise RuntimeError(f"planted failure in {ctx.name}")
    upstream = None
    if settings.source:
        upstream = json.loads((ctx.input_path(settings.source) / "result.json").read_text())["value"]
    if ctx.is_main:
        (ctx.out_dir / "result.json").write_text(json.dumps({"value": settings.value}))
    return {"value": settings.value, "upstream": upstream}
