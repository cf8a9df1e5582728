"""Training-step overhead of our DeepSpeed engine against a plain PyTorch step, and checkpoint timings.

Both steps train the same model on the same batch in this process: the plain step is forward, loss,
backward and AdamW (fused on CUDA) under the same precision; the engine step is what the ``pretrain`` loop
does per step (schedule, forward through DeepSpeed, non-finite guard, backward, step) with the chosen ZeRO
stage. Then a checkpoint is saved and a fresh engine resumes from it (init, load, first step).

    python tools/bench_train.py                                        # CPU: a tiny KoPE ViT, a few steps
    python tools/bench_train.py --model vit_kope_base_patch16_224 --batch 256 --img 224 --steps 30  # GPU

Prints one JSON line; ``engine_vs_plain`` is the img/s ratio (target on one H100 with KoPE-B/16: >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import pipeline.models  # noqa: F401  (registers vit_kope_*)
from pipeline.checkpoint.store import Checkpointer
from pipeline.train.engine import BatchPlan, build_engine, forward_precision, init_distributed, set_schedule
from pipeline.train.faults import poison_if_nonfinite
from pipeline.train.optim import OptimSettings
from pipeline.train.state import Progress, RngState

TINY = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_kope_base_patch16_224" if cuda else "vit_kope_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=256 if cuda else 8)
    parser.add_argument("--img", type=int, default=224 if cuda else 64)
    parser.add_argument("--steps", type=int, default=30 if cuda else 20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2, help="untimed steps first")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--precision", default="bf16_autocast" if cuda else "fp32",
                        choices=("fp32", "bf16", "bf16_autocast"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both variants")
    parser.add_argument("--checkpoint-dir", default="", help="where to save the checkpoint (default: a temp dir)")
    return parser.parse_args()


def create_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = TINY if args.model == "vit_kope_tiny_patch16_224" and args.img < 224 else {}
    return timm.create_model(args.model, img_size=args.img, num_classes=1000, **extra)


def timed(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per step after ``warmup`` untimed steps (the median shrugs off other processes' bursts)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_step_time(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor,
                    device: torch.device) -> float:
    model = create_model(args).to(device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    inputs = images.to(torch.bfloat16) if args.precision == "bf16" else images
    autocast = args.precision == "bf16_autocast"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(step_model(inputs).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, args.steps, args.warmup, device)


def make_engine(args: argparse.Namespace, device: torch.device):
    plan = BatchPlan.derive(args.batch, args.batch, 1)
    engine = build_engine(create_model(args), OptimSettings(lr=1e-4, weight_decay=0.05), plan, args.zero,
                          args.precision, device)
    if args.compile:
        engine.compile()
    return engine


def engine_step(engine, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        set_schedule(engine.optimizer, 1e-4, 0.05)
        with forward_precision(engine) as dtype:
            inputs = images.to(dtype)
        loss = F.cross_entropy(engine(inputs).float(), labels)
        engine.backward(poison_if_nonfinite(loss))
        engine.step()

    return step


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/kope-torch-ext")
    device = init_distributed(rank=0, world_size=1, local_rank=0)
    images = torch.randn(args.batch, 3, args.img, args.img, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    plain_s = plain_step_time(args, images, labels, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    engine = make_engine(args, device)
    engine_s = timed(engine_step(engine, images, labels), args.steps, args.warmup, device)

    folder = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="kope-bench-"))
    checkpointer = Checkpointer(folder, keep=1, rank=0, world_size=1)
    start = time.perf_counter()
    tag = checkpointer.save(engine, 1, {"progress": Progress(1, args.batch)}, {"rng": RngState()}, {})
    synchronize(device)
    save_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (folder / tag).iterdir())
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()

    start = time.perf_counter()
    engine = make_engine(args, device)
    built = time.perf_counter()
    checkpointer.load(engine, tag, {"progress": Progress()}, {"rng": RngState()})
    loaded = time.perf_counter()
    engine_step(engine, images, labels)()
    synchronize(device)
    done = time.perf_counter()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({
        "device": name, "model": args.model, "batch": args.batch, "img_size": args.img, "precision": args.precision,
        "zero_stage": args.zero, "compile": args.compile, "threads": torch.get_num_threads(),
        "plain_img_per_s": args.batch / plain_s, "engine_img_per_s": args.batch / engine_s,
        "engine_vs_plain": plain_s / engine_s, "checkpoint_save_s": save_s, "checkpoint_bytes": size,
        "resume_engine_init_s": built - start, "resume_load_s": loaded - built, "resume_first_step_s": done - loaded,
        "resume_to_first_step_s": done - start,
    }))


if __name__ == "__main__":
    main()
