"""Training as a library call: ``run_training(settings, task, ctx)`` trains ``task`` with ``settings`` on one
DeepSpeed engine, resuming from the stage folder's latest checkpoint, and leaves the trained model for the next
stages. The ``pretrain`` and ``finetune`` stages are thin adapters over it.

Writes, in ``ctx.out_dir``: ``checkpoints/`` (DeepSpeed checkpoints, ``latest``), ``tensorboard/``,
``model.safetensors`` (the weights downstream stages use: EMA or teacher weights where the task keeps them) and
``model.json`` (how to rebuild that model: library, name, kwargs, the task that trained it).

Length: exactly one of ``steps``, ``epochs`` (of the loader's epoch, see ``loader.samples_per_epoch``) or
``samples`` (seen, over all ranks). Batches: ``global_batch_size`` over all ranks; ``loader.batch_size`` per rank
and micro-step; the gradient accumulation steps follow (and are logged).

Resume: a killed, failed or preempted run continues from ``checkpoints/latest`` and ends with the same weights as
an uninterrupted run (bitwise on CPU with fixed thread counts). The stage's identity (``ctx.identity``) must not
change in between (the checkpoint names the changed keys and stops). On another number of ranks: ZeRO stage 0
resumes (same sample stream, not bitwise); stages 1–3 refuse with a message.

A stop signal saves a checkpoint and raises :class:`pipeline.train.faults.Preempted` (exit status 75).

Compilation (``compile``, default on GPUs): the model compiles inside the engine (see :mod:`pipeline.train.engine`),
with its caches in ``compile_cache_dir`` (default ``compile_cache/`` in the stage folder), so a requeued or resumed
run reuses what the previous one compiled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.checkpoint.files import save_safetensors
from pipeline.checkpoint.layout import read_meta
from pipeline.checkpoint.store import Checkpointer
from pipeline.core.fsutil import atomic_write_json
from pipeline.core.stage import StageContext
from pipeline.data.manifest import Manifest
from pipeline.data.order import steps_remaining
from pipeline.train import rng
from pipeline.train.engine import (
    BatchPlan,
    Precision,
    build_engine,
    compile_cache,
    compile_engine,
    gathered_parameters,
    init_distributed,
    resolve_compile,
)
from pipeline.train.schedules import build_schedule
from pipeline.train.settings import TrainSettings
from pipeline.train.task import Task
from pipeline.train.tensorboard import ScalarLog
from pipeline.train.trainer import LoopSettings, Trainer

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"
COMPILE_CACHE = "compile_cache"


@dataclass(frozen=True)
class RunLength:
    """How long a run is: its batch plan, optimizer steps, and the loader's epoch in micro-steps and samples."""

    plan: BatchPlan
    total_steps: int
    micro_steps_per_epoch: int
    epoch_length: int

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_steps_per_epoch // self.plan.accumulation

    def describe(self) -> str:
        epochs = self.total_steps * self.plan.accumulation / self.micro_steps_per_epoch
        return f"{self.total_steps} optimizer steps ({epochs:.2f} epochs of {self.epoch_length} samples)"


def run_length(settings: TrainSettings, data_dir: Path, world_size: int) -> RunLength:
    """The run's length from whichever of steps, epochs, samples is set, for ``world_size`` ranks."""
    plan = BatchPlan.derive(settings.global_batch_size, settings.loader.batch_size, world_size)
    epoch_length = settings.loader.samples_per_epoch or Manifest.load(data_dir).num_samples
    per_micro_step = plan.per_rank * plan.world_size
    micro_steps = steps_remaining(0, per_micro_step, epoch_length, settings.loader.drop_last)
    if micro_steps < 1:
        raise ValueError(f"{data_dir}: an epoch of {epoch_length} samples is less than one micro-batch over all ranks "
                         f"({per_micro_step})")
    if settings.steps:
        steps = settings.steps
    elif settings.epochs:
        steps = round(settings.epochs * micro_steps / plan.accumulation)
    else:
        steps = settings.samples // plan.global_batch
    if steps < 1:
        raise ValueError(f"{data_dir}: {settings.epochs} epochs of {epoch_length} samples are less than one optimizer "
                         f"step of {plan.global_batch} samples")
    return RunLength(plan, steps, micro_steps, epoch_length)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    if precision == "auto":
        return "bf16_autocast" if device.type == "cuda" else "fp32"
    return precision  # type: ignore[return-value]


def _export(task: Task, engine: Any, checkpointer: Checkpointer, steps: int, scalars: ScalarLog,
            ctx: StageContext) -> dict[str, float]:
    """``model.safetensors`` and ``model.json`` on rank 0, then the task's evaluation of them, if it has one."""
    with gathered_parameters(engine):
        weights = {name: tensor.detach().cpu().clone() for name, tensor in task.parameters_for_export(engine)}
    results: dict[str, float] = {}
    if ctx.is_main:
        save_safetensors(weights, ctx.out_dir / MODEL_WEIGHTS)
        atomic_write_json(ctx.out_dir / MODEL_JSON, {
            **task.model_spec(), "mode": task.name, "weights": MODEL_WEIGHTS,
            "checkpoint": f"{CHECKPOINTS}/{checkpointer.latest()}", "steps": steps,
        })
        evaluate = getattr(task, "evaluate", None)
        if evaluate is not None:
            results = evaluate(weights, engine.device)
            scalars.write(steps, results, "eval/")
            if results:
                ctx.log.info("evaluation: %s", ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
    if dist.is_initialized():
        dist.barrier()
    return results


def run_training(settings: TrainSettings, task: Task, ctx: StageContext) -> dict[str, Any]:
    """Train ``task`` as ``settings`` say, in ``ctx.out_dir``; returns the stage's outputs."""
    device = init_distributed(ctx.rank, ctx.world_size, ctx.local_rank)
    precision = resolve_precision(settings.precision, device)
    length = run_length(settings, ctx.input_path(settings.data), ctx.world_size)
    plan = length.plan
    ctx.log.info("%s: %s, %s, ZeRO stage %d, %s, %s", task.name, task.model_spec()["name"], plan.describe(),
                 settings.zero_stage, precision, length.describe())
    task.begin(length.total_steps, settings.zero_stage)
    rng.seed_all(ctx.seed)
    module = task.build_module()
    loader = task.build_loader(ctx.rank, ctx.world_size)
    schedule = build_schedule(settings.schedule, settings.optim.lr, settings.optim.weight_decay, length.total_steps,
                              length.steps_per_epoch, plan.global_batch)
    engine = build_engine(module, settings.optim, plan, settings.zero_stage, precision, device, settings.deepspeed)
    compiled = resolve_compile(settings.compile, device)
    caches: contextlib.AbstractContextManager = contextlib.nullcontext()
    if compiled:
        folder = ctx.run_dir / settings.compile_cache_dir if settings.compile_cache_dir else ctx.out_dir / COMPILE_CACHE
        caches = compile_cache(folder)
        compile_engine(engine)
        ctx.log.info("compiling the model inside the engine (caches in %s)", folder)

    checkpointer = Checkpointer(ctx.out_dir / CHECKPOINTS, settings.checkpoint.keep, ctx.rank, ctx.world_size)
    latest = checkpointer.latest()
    resume_step = int(read_meta(checkpointer.directory / latest).get("step", 0)) if latest else 0
    scalars = ScalarLog(ctx.out_dir / "tensorboard", enabled=ctx.is_main, resume_step=resume_step)
    loop = LoopSettings(total_steps=length.total_steps, checkpoint_every=settings.checkpoint.every_steps,
                        log_every=settings.log_every_steps,
                        max_nonfinite_in_a_row=settings.faults.max_nonfinite_in_a_row, seed=ctx.seed,
                        stop_check_every=settings.faults.stop_check_every_steps)
    trainer = Trainer(task, engine, loader, plan, schedule, checkpointer, loop, ctx.identity, scalars, ctx.log,
                      ctx.rank)
    try:
        with caches:
            trainer.resume()
            summary = trainer.run()
            results = _export(task, engine, checkpointer, summary["steps"], scalars, ctx)
    finally:
        scalars.close()
    return {"model": ctx.relative(ctx.out_dir / MODEL_JSON), "weights": ctx.relative(ctx.out_dir / MODEL_WEIGHTS),
            "checkpoints": ctx.relative(ctx.out_dir / CHECKPOINTS),
            "tensorboard": ctx.relative(ctx.out_dir / "tensorboard"), **summary, **results}
