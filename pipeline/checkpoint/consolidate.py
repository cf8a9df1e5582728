"""One fp32 state dict from a DeepSpeed checkpoint, whatever its ZeRO stage and rank count.

ZeRO stages 1–3 keep the fp32 master weights in per-rank optimizer shards; DeepSpeed's
``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` reassembles them (ZeRO-3 partitions included).
Without ZeRO (stage 0) the module weights in the model-states file are the weights. The client state
(step, samples seen, EMA or teacher weights, ...) is read from rank 0's model-states file, and the training
stage's ``meta.json`` beside it (its resolved settings) when there is one. Every file is checked before it is
read (see :mod:`pipeline.checkpoint.files`).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.files import CheckpointError, check_file_integrity, load_checkpoint_file, weights_only_loading
from pipeline.checkpoint.layout import MODEL_STATES, read_meta, resolve_tag_dir
from pipeline.checkpoint.store import PARTS_KEY

DEEPSPEED_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "checkpoint_parallel_dimensions", "ds_config", "ds_version",
})


@dataclass
class ConsolidatedCheckpoint:
    """The engine module's fp32 weights (engine names) and the client state of one checkpoint."""

    directory: Path
    tag: str
    zero_stage: int
    world_size: int
    global_steps: int
    state_dict: dict[str, torch.Tensor]
    client_state: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source_dtype: str = "float32"

    @property
    def training_config(self) -> dict[str, Any]:
        """The training stage's settings as recorded with the checkpoint (empty when not recorded)."""
        settings = self.meta.get("identity", {}).get("settings")
        return settings if isinstance(settings, dict) else {}

    def part(self, name: str) -> dict[str, Any]:
        """A shared part of the training state saved with the checkpoint (``task``, ``progress``, ...)."""
        state = self.client_state.get(PARTS_KEY, {}).get(name)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.directory}: the checkpoint holds no '{name}' state")
        return state


def _model_states_file(tag_dir: Path) -> Path:
    for name in MODEL_STATES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{tag_dir}: no model-states file ({' or '.join(MODEL_STATES)})")


def _zero_stage(model_states: dict[str, Any], tag_dir: Path) -> int:
    config = model_states.get("ds_config") or {}
    stage = (config.get("zero_optimization") or {}).get("stage")
    if stage is None:
        return 1 if any(tag_dir.glob("*optim_states.pt")) else 0
    return int(stage)


def _fp32_from_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loading(), contextlib.redirect_stdout(io.StringIO()):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{tag_dir}: cannot consolidate the ZeRO shards: {first}") from None


def consolidate(tag_dir: Path) -> ConsolidatedCheckpoint:
    """Read checkpoint folder ``tag_dir`` (e.g. ``checkpoints/step_000100``) into fp32 tensors on the CPU."""
    tag_dir = Path(tag_dir)
    for path in sorted(tag_dir.glob("*.pt")):
        check_file_integrity(path)
    states_file = _model_states_file(tag_dir)
    model_states = load_checkpoint_file(states_file)
    if not isinstance(model_states, dict):
        raise CheckpointError(f"{states_file}: expected a dict of model states")
    stage = _zero_stage(model_states, tag_dir)
    if stage == 0:
        module = model_states.get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{states_file}: no module weights in a ZeRO-0 checkpoint")
        dtypes = {tensor.dtype for tensor in module.values() if tensor.is_floating_point()}
        source_dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "mixed"
        weights = module
    else:
        weights, source_dtype = _fp32_from_zero(tag_dir), "float32"
    state_dict = {
        name: (tensor.detach().float() if tensor.is_floating_point() else tensor.detach()).contiguous().clone()
        for name, tensor in weights.items()
    }
    return ConsolidatedCheckpoint(
        directory=tag_dir,
        tag=tag_dir.name,
        zero_stage=stage,
        world_size=int(model_states.get("dp_world_size") or 1),
        global_steps=int(model_states.get("global_steps") or 0),
        state_dict=state_dict,
        client_state={key: value for key, value in model_states.items() if key not in DEEPSPEED_KEYS},
        meta=read_meta(tag_dir),
        source_dtype=source_dtype,
    )


def module_weights(checkpoints_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The engine module's fp32 state dict of checkpoint ``tag`` (default: latest), whatever its ZeRO stage."""
    return consolidate(resolve_tag_dir(checkpoints_dir, tag)).state_dict
