"""One rank of the resume matrix: ``python -m tests.train.resume_worker OUT SPEC_JSON`` with torchrun-style
variables (RANK, WORLD_SIZE, ...).

For each case it runs the ``pretrain`` stage straight through, keeps its exported and checkpointed weights, then
runs it again in a fresh folder and interrupts it — ``rewind``: the folder is left as a kill right after checkpoint
``at`` leaves it; ``signal``: rank 0 receives SIGTERM while computing step ``at`` (every rank must stop at the same
step boundary and save) — and runs it once more with the loader's worker count changed, which resumes. The test
(tests/train/test_resume_matrix.py) compares the results. One process group runs every case, so torch and
DeepSpeed start once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.checkpoint.layout import read_latest
from pipeline.train import tasks
from pipeline.train.faults import Preempted
from tests.train.helpers import (
    STAGE,
    TINY_KOPE,
    checkpoint_weights,
    pretrain_block,
    rewind_to_checkpoint,
    run_stage_here,
)

TINY_DINO = {"name": "vit_kope_tiny_patch16_224",
             "kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "learnable_gamma": True}}
CLIP_MODEL = "ViT-KoPE-Ti-16-64"


@dataclass(frozen=True)
class Case:
    name: str
    mode: str
    zero: int
    ranks: int = 2
    precision: str = "fp32"
    accumulation: int = 1  # gradient accumulation steps: global batch = 4 per rank x ranks x this
    stop: str = "rewind"  # "rewind" (a kill after checkpoint `at`) or "signal" (SIGTERM to rank 0 during step `at`)
    at: int = 2
    workers: tuple[int, int] = (0, 0)  # loader workers before and after the interruption
    steps: int = 6
    log_every: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)


CASES = [
    # ZeRO stages and precisions on 2 ranks (fp32 cases also train the same model, see the test)
    Case("supervised-z0-signal", "supervised", 0, stop="signal", workers=(0, 1)),
    Case("supervised-z0-bf16-rewind", "supervised", 0, precision="bf16"),
    Case("supervised-z1-rewind", "supervised", 1, workers=(1, 0)),
    Case("supervised-z2-autocast-signal", "supervised", 2, precision="bf16_autocast", stop="signal", at=3),
    Case("supervised-z3-rewind", "supervised", 3, workers=(0, 2)),
    # gradient accumulation
    Case("supervised-z1-accum2-signal", "supervised", 1, accumulation=2, stop="signal", workers=(1, 0)),
    Case("supervised-z0-1rank-accum2-signal", "supervised", 0, ranks=1, accumulation=2, stop="signal",
         workers=(0, 1)),
    # the other modes
    Case("dino-z0-1rank-rewind", "dino", 0, ranks=1, workers=(0, 1)),
    Case("dino-z2-accum2-signal", "dino", 2, accumulation=2, stop="signal", workers=(0, 1)),
    Case("dino-centring-z1-rewind", "dino", 1, overrides={"dino": {"objective": "dino", "prototypes": 32}}),
    Case("clip-z1-1rank-accum2-rewind", "clip", 1, ranks=1, accumulation=2, workers=(1, 0)),
    # a stop after step 3 with 4-step log intervals: the first step after the resume writes a log line (ZeRO-3)
    Case("clip-z3-signal-then-a-logged-step", "clip", 3, stop="signal", at=2, log_every=4),
]


def block_for(case: Case, data: dict[str, str], workers: int) -> dict[str, Any]:
    world = case.ranks
    common = {"steps": case.steps, "zero_stage": case.zero, "precision": case.precision,
              "global_batch_size": 4 * world * case.accumulation, "log_every_steps": case.log_every,
              "loader": {"batch_size": 4, "num_workers": workers, "window_shards": 2},
              "checkpoint": {"every_steps": 2, "keep": 10},
              # ranks agree on a stop after every step, so a signalled run also stops between checkpoint steps
              # (the default cadence is tests/train/test_faults.py's)
              "faults": {"stop_check_every_steps": 1}}
    if case.mode == "supervised":
        block = pretrain_block(data["images"], model=TINY_KOPE, **common,
                               supervised={"ema_decay": 0.0 if case.zero == 3 else 0.9, "aug": {"image_size": 64}})
    elif case.mode == "dino":
        block = pretrain_block(data["images"], mode="dino", model=TINY_DINO, **common,
                               optim={"name": "adamw", "lr": 2e-3, "weight_decay": 0.04, "grad_clip": 3.0},
                               dino={"head_hidden_dim": 64, "head_bottleneck_dim": 32, "phase_alignment_weight": 0.1,
                                     "aug": {"global_size": 32, "local_size": 16, "local_crops": 2,
                                             "patch_size": 8}})
        del block["supervised"]
    else:
        block = pretrain_block(data["captions"], mode="clip", model={"name": CLIP_MODEL, "kwargs": {}}, **common,
                               optim={"name": "adamw", "lr": 1e-4, "weight_decay": 0.2, "betas": [0.9, 0.98]})
        del block["supervised"]
    for key, value in case.overrides.items():
        block[key] = {**block[key], **value} if isinstance(value, dict) else value
    return block


def signalled(task_class: type, at: int) -> type:
    """``task_class`` whose rank 0 receives SIGTERM while computing optimizer step ``at`` (0-based)."""

    class Signalled(task_class):
        def compute_loss(self, engine, batch, step):
            first_micro = engine.micro_steps % engine.gradient_accumulation_steps() == 0
            if step == at and first_micro and engine.global_rank == 0:
                signal.raise_signal(signal.SIGTERM)
            return super().compute_loss(engine, batch, step)

    return Signalled


def run_case(case: Case, out: Path, data: dict[str, str], rank: int, world: int) -> dict[str, Any]:
    whole_dir, run_dir = out / case.name / "whole", out / case.name / "interrupted"
    whole = run_stage_here(block_for(case, data, case.workers[0]), whole_dir, rank=rank, world_size=world)
    stopped_at = case.at
    if case.stop == "rewind":
        if rank == 0:
            shutil.copytree(whole_dir, run_dir)
            rewind_to_checkpoint(run_dir, case.at)
    else:
        original = tasks.TASKS[case.mode]
        tasks.TASKS[case.mode] = signalled(original, case.at)
        try:
            run_stage_here(block_for(case, data, case.workers[0]), run_dir, rank=rank, world_size=world)
            raise AssertionError(f"{case.name}: the stage was not stopped by the signal")
        except Preempted:
            stopped_at = int(read_latest(run_dir / STAGE / "checkpoints").removeprefix("step_"))
        finally:
            tasks.TASKS[case.mode] = original
    if dist.is_initialized():
        dist.barrier()
    resumed = run_stage_here(block_for(case, data, case.workers[1]), run_dir, rank=rank, world_size=world)
    if rank == 0:
        torch.save(checkpoint_weights(whole_dir), out / case.name / "whole_checkpoint.pt")
    return {"case": asdict(case), "whole": whole, "resumed": resumed, "stopped_at": stopped_at}


def main(out: Path, spec: dict[str, Any]) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    summaries = {}
    for case in CASES:
        if case.name in spec["cases"]:
            summaries[case.name] = run_case(case, out, spec["data"], rank, world)
    if rank == 0:
        (out / f"summaries-{world}.json").write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
