"""A resumable stage with the training stage's stop contract: SIGTERM or SIGUSR1 saves a checkpoint at the next
step boundary and raises ``Preempted``; a re-run continues from the checkpoint. Every step is appended to
``steps.log``, so a test sees whether a step was lost or repeated."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass

from pipeline.core.config.types import setting
from pipeline.core.fsutil import atomic_write_json
from pipeline.core.stage import StageContext
from pipeline.train.faults import Preempted


@dataclass
class Settings:
    steps: int = setting(20, ge=1)
    step_s: float = setting(0.5, ge=0)


def run(settings: Settings, ctx: StageContext) -> dict:
    checkpoint = ctx.out_dir / "checkpoint.json"
    start = json.loads(checkpoint.read_text())["next_step"] if checkpoint.exists() else 0
    stop: dict[str, str] = {}
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda sig, frame: stop.setdefault("signal", signal.Signals(sig).name))
    steps_log = ctx.out_dir / "steps.log"
    with open(steps_log, "a", encoding="utf-8") as log:
        log.write(f"start {start} job {os.environ.get('SLURM_JOB_ID')}\n")
        for step in range(start, settings.steps):
            if stop:
                atomic_write_json(checkpoint, {"next_step": step})
                log.write(f"stop {step} {stop['signal']}\n")
                raise Preempted(f"{stop['signal']} at step {step}; checkpoint saved")
            time.sleep(settings.step_s)
            log.write(f"step {step}\n")
            log.flush()
    return {"steps": settings.steps}
