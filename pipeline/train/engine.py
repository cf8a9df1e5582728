"""The DeepSpeed engine every training mode runs on: process group, batch plan, ZeRO stage, precision,
clipping and optimizer, from the stage's settings.

Precision: ``fp32``; ``bf16`` (DeepSpeed's bf16 mode: bf16 weights, gradients and communication with fp32
master weights in the optimizer — the least memory); ``bf16_autocast`` (fp32 weights, the forward under
``torch.autocast`` — KoPE keeps its phase arithmetic in fp32 there, as the model code intends). All three
run on CPUs (gloo) and GPUs (NCCL).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline.core.logs import get_logger
from pipeline.core.ranks import free_port, rank_info_from_env
from pipeline.train.optim import OptimSettings, build_optimizer
from pipeline.train.param_groups import build_param_groups, describe_groups

Precision = Literal["fp32", "bf16", "bf16_autocast"]
log = get_logger("train")


@dataclass(frozen=True)
class BatchPlan:
    """Global batch = per-rank micro-batch × ranks × gradient accumulation steps."""

    global_batch: int
    per_rank: int
    world_size: int
    accumulation: int

    @classmethod
    def derive(cls, global_batch: int, per_rank: int, world_size: int) -> BatchPlan:
        """Accumulation steps from the global and per-rank batch sizes; they must divide exactly."""
        per_step = per_rank * world_size
        if global_batch % per_step:
            raise ValueError(f"global_batch_size {global_batch} is not a multiple of loader.batch_size {per_rank} "
                             f"x {world_size} ranks = {per_step}: change one of them")
        return cls(global_batch, per_rank, world_size, global_batch // per_step)

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_rank} per rank x {self.world_size} ranks x "
                f"{self.accumulation} gradient accumulation steps")


def init_distributed(rank: int, world_size: int, local_rank: int) -> torch.device:
    """Join (or reuse) the process group through DeepSpeed and return this rank's device.

    Whatever launched us (inline, local processes, torchrun, Slurm) is read by ``pipeline.core.ranks``; a single
    process without a launcher gets a free port, so concurrent runs on one machine do not collide.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    info = rank_info_from_env()
    env = info.export() | {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        env["MASTER_PORT"] = str(free_port())
    for key, value in env.items():
        os.environ.setdefault(key, value)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False)
    elif torch.distributed.get_world_size() != world_size:
        raise RuntimeError(f"this process already belongs to a group of {torch.distributed.get_world_size()} "
                           f"ranks, not {world_size}")
    return torch.device(accelerator.current_device_name())


def needs_guard(zero_stage: int, precision: Precision) -> bool:
    """DeepSpeed's ZeRO and bf16 optimizers skip non-finite steps and report the gradient norm; its plain
    fp32 path (stage 0 without bf16 mode) does neither, so our guard does it there."""
    return zero_stage == 0 and precision != "bf16"


def deepspeed_config(plan: BatchPlan, zero_stage: int, precision: Precision, grad_clip: float) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.per_rank,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "torch_autocast": {"enabled": precision == "bf16_autocast", "dtype": "bfloat16"},
        "gradient_clipping": 0.0 if needs_guard(zero_stage, precision) else grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(module: nn.Module, optim: OptimSettings, plan: BatchPlan, zero_stage: int, precision: Precision,
                 device: torch.device) -> Any:
    """``deepspeed.initialize`` with our parameter groups and a torch optimizer (nothing to compile)."""
    import deepspeed

    groups = build_param_groups(module, optim.layer_decay, optim.lr_multipliers)
    log.info("parameter groups:\n%s", describe_groups(groups))
    guard_clip = optim.grad_clip if needs_guard(zero_stage, precision) else None
    optimizer = build_optimizer(groups, optim, zero_stage, device, guard_clip)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                      config=deepspeed_config(plan, zero_stage, precision, optim.grad_clip))
    return engine


def set_schedule(optimizer: Any, lr: float, weight_decay: float) -> None:
    """Write this step's lr and weight decay into every group of ``optimizer`` (the engine's, which for ZeRO
    wraps ours and shares its groups), times the group's scales."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
        group["weight_decay"] = weight_decay * group["wd_scale"]


@contextlib.contextmanager
def gathered_parameters(engine: Any) -> Iterator[None]:
    """Full weights on every rank inside the block (a collective under ZeRO-3; nothing to do otherwise)."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        yield


@contextlib.contextmanager
def forward_precision(engine: Any) -> Iterator[torch.dtype]:
    """The dtype of floating inputs, with autocast on when the engine uses it: for forwards outside
    ``engine(...)`` (probes, evaluation)."""
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    autocast = engine.torch_autocast_enabled()
    with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=autocast):
        yield dtype
