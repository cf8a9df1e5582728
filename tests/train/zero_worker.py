"""One rank of the ZeRO test: ``python -m tests.train.zero_worker OUT DATA`` with torchrun-style variables.

For each (ZeRO stage, precision) it runs the pretrain stage straight through in this process group, keeps
its exported and checkpointed weights, rewinds the checkpoints to step 2 (as a kill after checkpoint 2 would
leave them) and runs it again, which resumes. The test compares the two results; importing torch and
DeepSpeed once for all stages keeps it affordable.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.train.helpers import STAGE, checkpoint_weights, pretrain_block, rewind_to_checkpoint, run_stage_here

CASES = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16_autocast"), (3, "fp32")]


def case_name(zero_stage: int, precision: str) -> str:
    return f"z{zero_stage}_{precision}"


def main(out: Path, data: str) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    summaries = {}
    for zero_stage, precision in CASES:
        block = pretrain_block(data, steps=4, zero_stage=zero_stage, precision=precision,
                               supervised={"ema_decay": 0.0 if zero_stage == 3 else 0.9, "aug": {"image_size": 64}})
        run_dir = out / case_name(zero_stage, precision)
        whole = run_stage_here(block, run_dir, rank=rank, world_size=world_size)
        if rank == 0:
            shutil.copy(run_dir / STAGE / "model.safetensors", run_dir / "whole.safetensors")
            torch.save(checkpoint_weights(run_dir), run_dir / "whole_checkpoint.pt")
            rewind_to_checkpoint(run_dir, 2)
        dist.barrier()
        resumed = run_stage_here(block, run_dir, rank=rank, world_size=world_size)
        summaries[run_dir.name] = {"whole": whole, "resumed": resumed}
    if rank == 0:
        (out / "summaries.json").write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
