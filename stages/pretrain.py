"""Stage ``pretrain``: train a model on a sharded dataset with DeepSpeed, in ``supervised``, ``dino`` or ``clip``
mode, resuming from its latest checkpoint whenever it is run again.

Outputs (in the stage folder): ``checkpoints/`` (DeepSpeed checkpoints, ``latest``), ``tensorboard/``,
``model.safetensors`` (the weights downstream stages use: EMA or teacher weights where the mode keeps them)
and ``model.json`` (how to rebuild that model: library, name, kwargs, plus mode and paths).

Length: exactly one of ``steps``, ``epochs`` (of the loader's epoch, see ``loader.samples_per_epoch``) or
``samples`` (seen, over all ranks). Batches: ``global_batch_size`` over all ranks; ``loader.batch_size`` per
rank and micro-step; the gradient accumulation steps follow (and are logged).

Resume: a killed, failed or preempted run continues from ``checkpoints/latest`` and ends with the same
weights as an uninterrupted run (bitwise on CPU with fixed thread counts). Settings that shape training
must not change in between (the stage names the changed keys and stops); ``checkpoint``, ``log_every_steps``,
``faults`` and the loader's worker settings may. On another number of ranks: ZeRO stage 0 resumes (same
sample stream, not bitwise); stages 1–3 refuse with a message (their optimizer states are partitioned by
rank; DeepSpeed's universal-checkpoint conversion is not wired in).

SIGTERM or SIGUSR1 saves a checkpoint and ends the stage process with exit status 75 (``Preempted``); run
the stage again to continue.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from pipeline.config.types import InputPath, setting
from pipeline.data.loaders import LoaderSettings
from pipeline.data.manifest import Manifest
from pipeline.data.order import steps_remaining
from pipeline.export.timm_format import save_safetensors
from pipeline.fsutil import atomic_write_json, canonical_json
from pipeline.stage import StageContext
from pipeline.train import rng
from pipeline.train.checkpoint import Checkpointer, CheckpointSettings, read_meta
from pipeline.train.engine import BatchPlan, Precision, build_engine, gathered_parameters, init_distributed
from pipeline.train.faults import FaultSettings
from pipeline.train.optim import OptimSettings
from pipeline.train.schedules import ScheduleSettings, build_schedule
from pipeline.train.tasks import ClipSettings, DinoSettings, SupervisedSettings, create_task
from pipeline.train.tensorboard import ScalarLog
from pipeline.train.trainer import LoopSettings, Trainer

Mode = Literal["supervised", "dino", "clip"]
RESUME_SAFE_KEYS = ("checkpoint", "log_every_steps", "faults")
RESUME_SAFE_LOADER_KEYS = ("num_workers", "prefetch_factor", "pin_memory", "index_cache_dir")


@dataclass
class ModelSettings:
    name: str = setting("vit_kope_small_patch16_224", help="timm model name (open_clip config name for clip)")
    kwargs: dict[str, Any] = setting(default_factory=dict, help="extra arguments of the model factory")


@dataclass
class Settings:
    data: InputPath = setting(help="sharded training set (a folder with manifest.json), e.g. '@shard/train'")
    mode: Mode = setting("supervised", help="supervised, dino or clip")
    model: ModelSettings = field(default_factory=ModelSettings)
    global_batch_size: int = setting(1024, ge=1, help="samples per optimizer step over all ranks")
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    steps: int = setting(0, ge=0, help="optimizer steps to train (set one of steps, epochs, samples)")
    epochs: float = setting(0.0, ge=0, help="loader epochs to train")
    samples: int = setting(0, ge=0, help="samples to train on, over all ranks")
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    zero_stage: int = setting(0, ge=0, le=3, help="DeepSpeed ZeRO stage 0-3")
    precision: Literal["auto", "fp32", "bf16", "bf16_autocast"] = setting(
        "auto", help="auto: bf16_autocast on GPUs, fp32 on CPUs (see pipeline.train.engine)")
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    log_every_steps: int = setting(50, ge=1, help="steps between log lines and TensorBoard points")
    faults: FaultSettings = field(default_factory=FaultSettings)
    seed: int | None = setting(None, ge=0, help="seed of initialisation, data order and augmentation "
                                                "(default: the pipeline's seed)")
    supervised: SupervisedSettings = field(default_factory=SupervisedSettings)
    dino: DinoSettings = field(default_factory=DinoSettings)
    clip: ClipSettings = field(default_factory=ClipSettings)


def resume_config(settings: Settings, seed: int) -> dict[str, Any]:
    """The settings a checkpoint must agree with: all but logging, checkpointing and loader workers, and only
    the active mode's block."""
    tree = json.loads(canonical_json(dataclasses.asdict(settings)))
    for key in (*RESUME_SAFE_KEYS, *(mode for mode in typing.get_args(Mode) if mode != settings.mode)):
        tree.pop(key)
    for key in RESUME_SAFE_LOADER_KEYS:
        tree["loader"].pop(key)
    tree["seed"] = seed
    return tree


def total_steps(settings: Settings, plan: BatchPlan, steps_per_epoch: int) -> int:
    """Optimizer steps of the run from whichever of steps, epochs, samples is set."""
    chosen = [name for name in ("steps", "epochs", "samples") if getattr(settings, name)]
    if len(chosen) != 1:
        raise ValueError(f"pretrain: set exactly one of steps, epochs, samples (got {chosen or 'none'})")
    if settings.steps:
        return settings.steps
    if settings.epochs:
        steps = round(settings.epochs * steps_per_epoch / plan.accumulation)
    else:
        steps = settings.samples // plan.global_batch
    if steps < 1:
        raise ValueError(f"pretrain: {chosen[0]} = {getattr(settings, chosen[0])} is less than one optimizer step "
                         f"of {plan.global_batch} samples")
    return steps


def _resolve_precision(precision: str, device: torch.device) -> Precision:
    if precision == "auto":
        return "bf16_autocast" if device.type == "cuda" else "fp32"
    return precision  # type: ignore[return-value]


def _epoch_steps(settings: Settings, plan: BatchPlan, data_dir: Path) -> tuple[int, int]:
    """(micro-steps per loader epoch, epoch length in samples)."""
    epoch_length = settings.loader.samples_per_epoch or Manifest.load(data_dir).num_samples
    per_micro_step = plan.per_rank * plan.world_size
    micro_steps = steps_remaining(0, per_micro_step, epoch_length, settings.loader.drop_last)
    if micro_steps < 1:
        raise ValueError(f"{data_dir}: an epoch of {epoch_length} samples is less than one micro-batch over all ranks "
                         f"({per_micro_step})")
    return micro_steps, epoch_length


def _export(task: Any, engine: Any, checkpointer: Checkpointer, settings: Settings, steps: int, scalars: ScalarLog,
            ctx: StageContext) -> dict[str, float]:
    """``model.safetensors`` and ``model.json`` on rank 0, then the task's evaluation of them, if it has one."""
    with gathered_parameters(engine):
        weights = {name: tensor.detach().cpu().clone() for name, tensor in task.parameters_for_export(engine)}
    results: dict[str, float] = {}
    if ctx.is_main:
        save_safetensors(weights, ctx.out_dir / "model.safetensors")
        atomic_write_json(ctx.out_dir / "model.json", {
            **task.model_spec(), "mode": settings.mode, "weights": "model.safetensors",
            "checkpoint": f"checkpoints/{checkpointer.latest()}", "steps": steps,
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


def run(settings: Settings, ctx: StageContext) -> dict[str, Any]:
    seed = ctx.seed if settings.seed is None else settings.seed
    device = init_distributed(ctx.rank, ctx.world_size, ctx.local_rank)
    precision = _resolve_precision(settings.precision, device)
    plan = BatchPlan.derive(settings.global_batch_size, settings.loader.batch_size, ctx.world_size)
    data_dir = ctx.input_path(settings.data)
    micro_steps_per_epoch, epoch_length = _epoch_steps(settings, plan, data_dir)
    steps = total_steps(settings, plan, micro_steps_per_epoch)
    mode_settings = getattr(settings, settings.mode)
    if settings.mode == "supervised" and mode_settings.val_data:
        mode_settings = dataclasses.replace(mode_settings, val_data=str(ctx.input_path(mode_settings.val_data)))
    ctx.log.info("%s: %s, %s, ZeRO stage %d, %s, %d optimizer steps (%.2f epochs of %d samples)", settings.mode,
                 settings.model.name, plan.describe(), settings.zero_stage, precision, steps,
                 steps * plan.accumulation / micro_steps_per_epoch, epoch_length)

    task = create_task(settings.mode, mode_settings, model=settings.model.name, model_kwargs=settings.model.kwargs,
                       data_dir=data_dir, loader=settings.loader, seed=seed, total_steps=steps,
                       zero_stage=settings.zero_stage)
    rng.seed_all(seed)
    module = task.build_module()
    loader = task.build_loader(ctx.rank, ctx.world_size)
    schedule = build_schedule(settings.schedule, settings.optim.lr, settings.optim.weight_decay, steps,
                              micro_steps_per_epoch // plan.accumulation, plan.global_batch)
    engine = build_engine(module, settings.optim, plan, settings.zero_stage, precision, device)

    checkpointer = Checkpointer(ctx.out_dir / "checkpoints", settings.checkpoint.keep, ctx.rank, ctx.world_size)
    latest = checkpointer.latest()
    scalars = ScalarLog(ctx.out_dir / "tensorboard", enabled=ctx.is_main,
                        resume_step=read_meta(checkpointer.directory, latest)["step"] if latest else 0)
    loop = LoopSettings(total_steps=steps, checkpoint_every=settings.checkpoint.every_steps,
                        log_every=settings.log_every_steps,
                        max_nonfinite_in_a_row=settings.faults.max_nonfinite_in_a_row, seed=seed)
    trainer = Trainer(task, engine, loader, plan, schedule, checkpointer, loop, resume_config(settings, seed), scalars,
                      ctx.log, ctx.rank)
    try:
        trainer.resume()
        summary = trainer.run()
        results = _export(task, engine, checkpointer, settings, summary["steps"], scalars, ctx)
    finally:
        scalars.close()
    rel = ctx.out_dir.relative_to(ctx.run_dir)
    return {"model": str(rel / "model.json"), "weights": str(rel / "model.safetensors"),
            "checkpoints": str(rel / "checkpoints"), "tensorboard": str(rel / "tensorboard"),
            **summary, **results}
