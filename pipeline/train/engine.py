"""The DeepSpeed engine every training mode runs on: process group and device, batch plan, ZeRO stage and its
communication, precision, clipping, optimizer and compilation, from the stage's settings.

Precision: ``fp32``; ``bf16`` (DeepSpeed's bf16 mode: bf16 weights, gradients and communication with fp32
master weights in the optimizer — the least memory); ``bf16_autocast`` (fp32 weights, the forward under
``torch.autocast`` — KoPE keeps its phase arithmetic in fp32 there, as the model code intends). All three
run on CPUs (gloo) and GPUs (NCCL). On GPUs, fp32 matrix products (fp32 training, KoPE's fp32 phase mix) use TF32
tensor cores.

Compilation (``compile:``): DeepSpeed's ``engine.compile()``, which compiles the wrapped module in place
(``nn.Module.compile``) after ``deepspeed.initialize``. Parameter names stay those of the module (no
``_orig_mod.`` prefix, as ``torch.compile(module)`` before ``initialize`` would add), so checkpoints, ZeRO
consolidation, the EMA and the exported weights are the same whether a run compiled or not; ZeRO-3's parameter
hooks are DeepSpeed's own, installed on the module it partitioned. Random draws inside the compiled graph
(stochastic depth) use the same generator calls as eager mode (inductor's ``fallback_random``), so compiling
changes results only by float rounding, and the compile caches (inductor's FX graph and AOTAutograd caches,
Triton's kernels) live in a folder kept across requeues (:func:`compile_cache`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
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
    process without a launcher gets a free port, so concurrent runs on one machine do not collide. On GPUs the
    device is :func:`bind_cuda_device`'s.
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
        bind_cuda_device(local_rank)
        allow_tf32_matmuls()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False)
    elif torch.distributed.get_world_size() != world_size:
        raise RuntimeError(f"this process already belongs to a group of {torch.distributed.get_world_size()} "
                           f"ranks, not {world_size}")
    return torch.device(accelerator.current_device_name())


def bind_cuda_device(local_rank: int) -> int:
    """Make CUDA device ``local_rank`` modulo the visible devices this process's device, and return its index.

    A node running one task per GPU with all GPUs visible gives local rank i device i; a cluster that binds one
    GPU per task (``--gpus-per-task=1``, GPU binding) shows every task only its own GPU, as ``cuda:0``
    (``CUDA_VISIBLE_DEVICES``, which ``torch.cuda`` already respects, names it). ``LOCAL_RANK`` is set to that
    index too: DeepSpeed reads it as a device index (the process group's device, the engine's device, ZeRO-3's
    gather device), so it must never name a device this process cannot see.
    """
    visible = torch.cuda.device_count()
    if visible < 1:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise RuntimeError(f"local rank {local_rank} sees no CUDA device (CUDA_VISIBLE_DEVICES={shown})")
    index = local_rank % visible
    torch.cuda.set_device(index)
    os.environ["LOCAL_RANK"] = str(index)
    return index


def allow_tf32_matmuls() -> None:
    """fp32 matrix products on TF32 tensor cores (fp32 training, and KoPE's phase mix, which stays fp32 under
    autocast): a 10-bit mantissa for the products, fp32 accumulation, as cuDNN convolutions already do."""
    torch.set_float32_matmul_precision("high")


def needs_guard(zero_stage: int, precision: Precision) -> bool:
    """DeepSpeed's ZeRO and bf16 optimizers skip non-finite steps and report the gradient norm; its plain
    fp32 path (stage 0 without bf16 mode) does neither, so our guard does it there."""
    return zero_stage == 0 and precision != "bf16"


BUCKET_MIN, BUCKET_MAX = 5_000_000, 200_000_000
"""Bounds of the ZeRO communication buckets, in elements (DeepSpeed's own default is 5e8: the whole of most
vision models in one bucket, so gradient reduction could only start once backward had finished)."""
PERSISTENCE_THRESHOLD = 100_000
"""ZeRO-3 keeps parameters smaller than this whole on every rank (norms, biases, phase mixes)."""


def bucket_elements(parameters: int) -> int:
    """About an eighth of the model per bucket, within :data:`BUCKET_MIN` and :data:`BUCKET_MAX`: the first
    buckets' reductions (and, under ZeRO-3, the next layers' gathers) run while backward (forward) computes, and
    each collective is still large enough to run at full bandwidth (ViT-B/16: 11 M elements, ViT-S: 5 M)."""
    return max(BUCKET_MIN, min(BUCKET_MAX, parameters // 8))


def zero_config(zero_stage: int, parameters: int) -> dict[str, Any]:
    """The ``zero_optimization`` section: communication overlapped with compute in buckets for stages 1–3."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 0:
        return zero
    bucket = bucket_elements(parameters)
    zero |= {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": bucket}
    if zero_stage < 3:
        zero["allgather_bucket_size"] = bucket
    else:
        zero |= {"stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
                 "stage3_gather_16bit_weights_on_model_save": False}
    return zero


def deepspeed_config(plan: BatchPlan, zero_stage: int, precision: Precision, grad_clip: float,
                     parameters: int = 0, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The generated DeepSpeed config for a model of ``parameters`` elements, with the ``deepspeed:`` mapping of
    the settings (``overrides``, checked when the config was loaded) merged into it: nested mappings key by key,
    anything else replacing the generated value."""
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.per_rank,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": zero_config(zero_stage, parameters),
        "bf16": {"enabled": precision == "bf16"},
        "torch_autocast": {"enabled": precision == "bf16_autocast", "dtype": "bfloat16"},
        "gradient_clipping": 0.0 if needs_guard(zero_stage, precision) else grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return _merged(config, overrides or {})


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], value) if both else value
    return out


def check_deepspeed_config(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """DeepSpeed's own parser (its pydantic models: ``zero_optimization``, ``compile``, ``comms_logger``, the
    monitors, ...) on the merged config; an error becomes one line naming the ``deepspeed:`` key."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        DeepSpeedConfig(dict(config))
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        head = problem["loc"][0] if problem["loc"] else None
        section = next((key for key, value in overrides.items() if isinstance(value, Mapping) and head in value),
                       None)
        key = f"deepspeed.{section}.{where}" if section else f"deepspeed ({error.title}) {where}"
        raise ValueError(f"{key}: {problem['msg']}") from None


def build_engine(module: nn.Module, optim: OptimSettings, plan: BatchPlan, zero_stage: int, precision: Precision,
                 device: torch.device, overrides: Mapping[str, Any] | None = None) -> Any:
    """``deepspeed.initialize`` with our parameter groups and a torch optimizer; ``overrides``: the settings'
    ``deepspeed:`` mapping."""
    import deepspeed

    groups = build_param_groups(module, optim.layer_decay, optim.lr_multipliers)
    log.info("parameter groups:\n%s", describe_groups(groups))
    guard_clip = optim.grad_clip if needs_guard(zero_stage, precision) else None
    optimizer = build_optimizer(groups, optim, zero_stage, device, guard_clip)
    parameters = sum(p.numel() for p in module.parameters())
    config = deepspeed_config(plan, zero_stage, precision, optim.grad_clip, parameters, overrides)
    if overrides:
        check_deepspeed_config(config, overrides)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def resolve_compile(choice: bool | str, device: torch.device) -> bool:
    """``compile: auto`` is on for CUDA devices and off elsewhere (inductor's CPU code runs, but compiling costs
    more than it saves in the short CPU runs of tests and demos)."""
    return device.type == "cuda" if choice == "auto" else bool(choice)


COMPILE_CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@contextlib.contextmanager
def compile_cache(folder: Path) -> Iterator[Path]:
    """Inductor's caches (FX graphs, AOTAutograd graphs, generated code) and Triton's compiled kernels in
    ``folder`` while the block runs, then the previous environment again: a requeued job with the same folder
    loads the compiled graphs instead of generating them again. Ranks may share the folder (both caches write
    files atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in COMPILE_CACHE_VARIABLES}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    try:
        yield folder
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def compile_engine(engine: Any) -> None:
    """Compile the engine's module in place (see the module docstring), with eager mode's random draws."""
    engine.compile(compile_kwargs={"options": {"fallback_random": True}})


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
