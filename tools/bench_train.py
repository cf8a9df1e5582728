"""The training loop as the ``pretrain`` stage runs it against a plain PyTorch loop doing the same work, measured in
one process; then a checkpoint save and a resume.

* ``engine``: the project's own :class:`pipeline.train.trainer.Trainer` running supervised training (its real
  task: uint8 batches normalised on the device, Mixup/CutMix, BCE, the EMA of the weights) on the DeepSpeed engine
  with the chosen ZeRO stage and precision, ``compile:`` as the stage would set it. Every step does all the loop
  does: RNG isolation of the batch fetch, the device feed (pinned batches copied on a side stream, one ahead),
  schedule writes, the non-finite guard, the stop-signal check, EMA, throughput bookkeeping.
* ``plain``: the same model, batches and work in a hand-written loop: non-blocking copy, normalisation, Mixup/CutMix,
  autocast forward, BCE, backward, fused AdamW over the same parameter groups, per-group lr and weight decay, EMA.

Neither synchronises inside the timed steps: each variant runs ``--warmup`` steps, then ``--rounds`` rounds of
``--steps`` steps, each round between two device synchronisations, the variants taking turns (so a machine whose
load changes slows both alike); the figures are the median rounds. Batches come from memory (the same pinned uint8
batches over and over, ``--pool`` of them), so the figures are those of training, not of JPEG decoding
(``tools/bench_loader.py`` measures that).

    python tools/bench_train.py                                          # CPU: a tiny KoPE ViT, a few steps
    python tools/bench_train.py --model vit_kope_base_patch16_224 --batch 256 --img 224 --steps 30   # GPU

Prints one JSON line; ``engine_vs_plain`` is the img/s ratio (target on one H100 with KoPE-B/16: >= 0.95), and
``mfu_*`` the model FLOP utilisation against the GPU's bf16 peak (absent for devices not in the peak table).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import pipeline.models  # noqa: F401  (registers vit_kope_*)
from pipeline.checkpoint.store import Checkpointer
from pipeline.data.manifest import ClassInfo, Manifest
from pipeline.data.settings import LoaderSettings, SupervisedAugSettings
from pipeline.train.ema import ModelEma
from pipeline.train.engine import (
    BatchPlan,
    build_engine,
    compile_engine,
    init_distributed,
    resolve_compile,
)
from pipeline.train.metrics import count_flops, peak_flops
from pipeline.train.optim import OptimSettings
from pipeline.train.param_groups import build_param_groups
from pipeline.train.schedules import build_schedule
from pipeline.train.settings import FaultSettings, ScheduleSettings, SupervisedSettings
from pipeline.train.tasks.supervised import SupervisedTask, TimmModel
from pipeline.train.tensorboard import ScalarLog
from pipeline.train.trainer import LoopSettings, Trainer

TINY = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
LR, WEIGHT_DECAY = 1e-4, 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_kope_base_patch16_224" if cuda else "vit_kope_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=256 if cuda else 8, help="images per micro-step")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--img", type=int, default=224 if cuda else 64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30 if cuda else 10, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2, help="untimed steps first (compilation)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant, taking turns")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--precision", default="bf16_autocast" if cuda else "fp32",
                        choices=("fp32", "bf16", "bf16_autocast"))
    parser.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                        help="as the compile: setting (auto: on with CUDA); the plain loop follows the same choice")
    parser.add_argument("--fused-attention", default="auto", choices=("auto", "true", "false"),
                        help="the KoPE model's fused_attention option (auto: fused on CUDA)")
    parser.add_argument("--ema-decay", type=float, default=0.99996, help="0: no EMA (then ZeRO-3 is possible)")
    parser.add_argument("--pool", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--checkpoint-dir", default="", help="where to save the checkpoint (default: a temp dir)")
    return parser.parse_args(argv)


def _choice(value: str) -> bool | str:
    return {"true": True, "false": False}.get(value, value)


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    extra = TINY if args.model == "vit_kope_tiny_patch16_224" and args.img < 224 else {}
    if "kope" in args.model:
        extra = {**extra, "fused_attention": _choice(args.fused_attention)}
    return extra


class MemoryLoader:
    """The part of :class:`pipeline.data.loaders.ResumableLoader` training uses, serving the same few pinned uint8
    batches without end (counting positions as the real loader does)."""

    def __init__(self, batches: list[dict[str, Any]], epoch_length: int):
        self.batches = batches
        self.epoch_length = epoch_length
        self.epoch = self.samples_consumed = 0

    def stream(self) -> Iterator[dict[str, Any]]:
        index = 0
        while True:
            batch = self.batches[index % len(self.batches)]
            index += 1
            size = len(batch["label"])
            if self.samples_consumed + size > self.epoch_length:
                self.epoch, self.samples_consumed = self.epoch + 1, 0
            self.samples_consumed += size
            yield dict(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.samples_consumed = int(state["epoch"]), int(state["samples_consumed"])


def make_batches(args: argparse.Namespace) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    pin = torch.cuda.is_available()
    batches = []
    for _ in range(args.pool):
        images = torch.randint(0, 256, (args.batch, 3, args.img, args.img), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, args.classes, (args.batch,), generator=generator)
        batches.append({"image": images.pin_memory() if pin else images, "label": labels.pin_memory() if pin
                        else labels})
    return batches


def write_classes(folder: Path, classes: int) -> Path:
    """A dataset folder whose manifest names ``classes`` classes (what the task reads; its one tiny shard is
    never read: batches come from memory)."""
    spec = importlib.util.spec_from_file_location("bench_loader", Path(__file__).with_name("bench_loader.py"))
    bench_loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_loader)
    folder.mkdir(parents=True, exist_ok=True)
    root = bench_loader.write_synthetic_dataset(folder, 1, 32, 32, 90)
    manifest = Manifest.load(root)
    named = [ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(classes)]
    Manifest(name=manifest.name, kind=manifest.kind, shards=manifest.shards, classes=named).save(root)
    return root


def make_task(args: argparse.Namespace, data: Path) -> SupervisedTask:
    aug = SupervisedAugSettings(image_size=args.img, uint8_images=True)
    settings = SupervisedSettings(ema_decay=args.ema_decay, aug=aug)
    return SupervisedTask(settings, model=TimmModel(args.model, model_kwargs(args)), data_dir=data,
                          loader=LoaderSettings(batch_size=args.batch), seed=0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The hand-written loop: the same model, batches and work as the trainer's step, nothing else."""

    def __init__(self, args: argparse.Namespace, data: Path, batches: list[dict[str, Any]], device: torch.device,
                 compiled: bool):
        self.args, self.device = args, device
        self.task = make_task(args, data)  # its transforms and criterion: the same work, outside any engine
        torch.manual_seed(0)
        self.model = self.task.create_model().to(device)
        if args.precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        groups = build_param_groups(self.model, 1.0, {})
        params = [{key: value for key, value in group.items() if key != "names"} for group in groups]
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
        self.ema = ModelEma(self.model, args.ema_decay) if args.ema_decay > 0 else None
        self.step_model = torch.compile(self.model) if compiled else self.model
        self.dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        self.source = MemoryLoader(batches, 10**9).stream()

    def micro_step(self, model: torch.nn.Module) -> None:
        task, batch = self.task, next(self.source)
        images = task.images(batch["image"], self.device)
        targets = batch["label"].to(self.device, non_blocking=True)
        if task.mixup is not None:
            images, targets = task.mixup(images, targets)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16_autocast"):
            loss = task.criterion(model(images.to(self.dtype)).float(), targets)
        (loss / self.args.accumulation).backward()

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = LR * group["lr_scale"], WEIGHT_DECAY * group["wd_scale"]
        for _ in range(self.args.accumulation):
            self.micro_step(self.step_model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    def flops_per_image(self) -> float:
        """FLOPs of one image's forward and backward (eager: the counter sees every op)."""
        flops = count_flops(lambda: self.micro_step(self.model))
        self.optimizer.zero_grad(set_to_none=True)
        return flops / self.args.batch

    def seconds_per_step(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - start) / steps


def make_trainer(args: argparse.Namespace, data: Path, batches: list[dict[str, Any]], device: torch.device,
                 compiled: bool, folder: Path, total_steps: int) -> Trainer:
    task = make_task(args, data)
    torch.manual_seed(0)
    module = task.build_module()
    plan = BatchPlan.derive(args.batch * args.accumulation, args.batch, 1)
    engine = build_engine(module, OptimSettings(lr=LR, weight_decay=WEIGHT_DECAY), plan, args.zero, args.precision,
                          device)
    if compiled:
        compile_engine(engine)
    schedule = build_schedule(ScheduleSettings(warmup_steps=1), LR, WEIGHT_DECAY, total_steps, 10**6,
                              plan.global_batch)
    loop = LoopSettings(total_steps=total_steps, checkpoint_every=10**9, log_every=50, max_nonfinite_in_a_row=5,
                        seed=0, stop_check_every=FaultSettings().stop_check_every_steps)
    checkpointer = Checkpointer(folder, keep=1, rank=0, world_size=1)
    scalars = ScalarLog(folder / "tensorboard", enabled=False)
    loader = MemoryLoader(batches, 10**9)
    return Trainer(task, engine, loader, plan, schedule, checkpointer, loop, {"bench": True}, scalars,
                   logging.getLogger("bench_train"), 0)


class TimedTrainer:
    """``trainer.run()`` in rounds, each timed over its steps by wrapping the trainer's own step (the loop's work
    between steps, the stop check included, falls inside a round; the checkpoint each ``run()`` saves at its end
    falls outside it and is timed on its own)."""

    def __init__(self, trainer: Trainer, device: torch.device):
        self.trainer, self.device = trainer, device
        self.marks: dict[str, float] = {}
        self.window = (0, 0)
        train_step, save = trainer._train_step, trainer.save

        def timed_step(batches: Iterator[Any]) -> None:
            if trainer.step == self.window[0]:
                synchronize(device)
                self.marks["start"] = time.perf_counter()
            train_step(batches)
            if trainer.step == self.window[1]:
                synchronize(device)
                self.marks["end"] = time.perf_counter()

        def timed_save() -> None:
            start = time.perf_counter()
            save()
            synchronize(device)
            self.marks["save"] = time.perf_counter() - start

        trainer._train_step, trainer.save = timed_step, timed_save
        trainer.resume()

    def seconds_per_step(self, steps: int) -> float:
        trainer = self.trainer
        self.window = (trainer.step, trainer.step + steps)
        trainer.settings = dataclasses.replace(trainer.settings, total_steps=self.window[1])
        trainer.run()
        return (self.marks["end"] - self.marks["start"]) / steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "kope-torch-ext"))
    device = init_distributed(rank=0, world_size=1, local_rank=0)
    compiled = resolve_compile(_choice(args.compile), device)
    batches = make_batches(args)
    scratch = tempfile.TemporaryDirectory(prefix="kope-bench-")
    data = write_classes(Path(scratch.name) / "data", args.classes)
    folder = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(scratch.name) / "run"

    plain = PlainLoop(args, data, batches, device, compiled)
    flops_per_image = plain.flops_per_image()
    total = args.warmup + args.rounds * args.steps
    engine = TimedTrainer(make_trainer(args, data, batches, device, compiled, folder, total), device)
    plain.seconds_per_step(args.warmup)
    engine.seconds_per_step(args.warmup)
    rounds: dict[str, list[float]] = {"plain": [], "engine": []}
    for _ in range(args.rounds):
        rounds["plain"].append(plain.seconds_per_step(args.steps))
        rounds["engine"].append(engine.seconds_per_step(args.steps))
    plain_s, engine_s = statistics.median(rounds["plain"]), statistics.median(rounds["engine"])
    save_s = engine.marks["save"]
    tag = engine.trainer.checkpointer.latest()
    size = sum(p.stat().st_size for p in (folder / tag).rglob("*") if p.is_file())
    del engine, plain
    if device.type == "cuda":
        torch.cuda.empty_cache()

    start = time.perf_counter()
    resumed = make_trainer(args, data, batches, device, compiled, folder, total)
    built = time.perf_counter()
    resumed.resume()
    loaded = time.perf_counter()
    resumed._train_step(resumed.feed.batches())
    synchronize(device)
    done = time.perf_counter()

    images_per_step = args.batch * args.accumulation
    peak = peak_flops(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": args.model, "batch": args.batch, "accumulation": args.accumulation,
        "img_size": args.img, "precision": args.precision, "zero_stage": args.zero, "compile": compiled,
        "fused_attention": model_kwargs(args).get("fused_attention"), "ema": args.ema_decay > 0,
        "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds,
        "plain_img_per_s": images_per_step / plain_s, "engine_img_per_s": images_per_step / engine_s,
        "engine_vs_plain": plain_s / engine_s, "gflop_per_img": round(flops_per_image / 1e9, 3),
        "checkpoint_save_s": save_s, "checkpoint_bytes": size,
        "resume_engine_init_s": built - start, "resume_load_s": loaded - built, "resume_first_step_s": done - loaded,
        "resume_to_first_step_s": done - start,
    }
    if peak:
        result["mfu_plain"] = result["plain_img_per_s"] * flops_per_image / peak
        result["mfu_engine"] = result["engine_img_per_s"] * flops_per_image / peak
    print(json.dumps(result), flush=True)
    del resumed
    scratch.cleanup()
    return result


if __name__ == "__main__":
    main()
