"""CLIP training: an open_clip model with a KoPE vision tower, open_clip's contrastive loss across ranks.

The whole model (both towers and the learnable logit scale) is the module DeepSpeed wraps, so every ZeRO
stage 0–3 works. Features are gathered from all ranks *with* their gradients (open_clip's
``gather_with_grad``), so the loss is that of the global batch. With ``local_loss`` (default, as open_clip
recommends at scale) each rank scores only its own rows against all gathered features: the rank losses
average to the global loss, with B×(world·B) instead of (world·B)² logits per rank.

The logit scale (the inverse temperature, stored as its log) is clamped to at most ``max_logit_scale`` after
every optimizer step, as open_clip does; here the clamp reaches DeepSpeed's fp32 master copy and ZeRO
partitions too, so the next step starts from the clamped value.

No state lives outside the engine, so ``state_dict`` is empty. With ``uint8_images`` the loader sends open_clip's
crops as uint8 pixels, normalised on the training device with open_clip's mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.data.loaders import ResumableLoader
from pipeline.data.loaders_samples import clip_samples
from pipeline.data.settings import LoaderSettings
from pipeline.data.transforms import ClipAugSettings, clip_normalizer
from pipeline.models.clip import register_open_clip_configs
from pipeline.train.engine import forward_precision
from pipeline.train.metrics import kope_metrics
from pipeline.train.probe import ProbeModule
from pipeline.train.scalar_params import restore_scalars, vectorize_scalar_parameters_
from pipeline.train.settings import ClipSettings, WeightsChoice
from pipeline.train.task import trained_weights_only

PROBE_IMAGES = 8


@torch.no_grad()
def clamp_trained_parameter_(param: nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter in place everywhere DeepSpeed keeps it: the fp32 master copy (stages 1–3, bf16)
    and the working copy the next forward reads (the module tensor, or its ZeRO-3 partition).

    Call on every rank: reading the master copy is a collective under ZeRO 1–2. Under ZeRO-3 each rank clamps its
    own partition (a clamp is element-wise), since a one-element parameter has nothing on most ranks to scatter to.
    """
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    if hasattr(param, "ds_id"):
        master = safe_get_local_fp32_param(param)
        if master is not None and master.numel():
            safe_set_local_fp32_param(param, master.clamp(low, high))
    else:
        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(low, high))
    working = param.ds_tensor if hasattr(param, "ds_tensor") else param
    working.data.clamp_(low, high)


class ClipTask:
    """The ``clip`` mode of the engine (see :class:`pipeline.train.task.Task`)."""

    name = "clip"

    def __init__(self, settings: ClipSettings, *, model: str, model_kwargs: Mapping[str, Any],
                 data_dir: str | Path, loader: LoaderSettings, seed: int):
        self.settings = settings
        self.model = model
        self.model_kwargs = dict(model_kwargs)
        self.data_dir = Path(data_dir)
        self.loader_settings = loader
        self.seed = seed
        self._loss: nn.Module | None = None
        self._probe: torch.Tensor | None = None
        self.normalize = clip_normalizer(self.aug_settings()) if settings.uint8_images else None
        self.scalar_names: set[str] = set()
        self.zero_stage = 0
        self.probe_module: ProbeModule | None = None

    def begin(self, total_steps: int, zero_stage: int = 0) -> None:
        """Nothing depends on the run's length; the ZeRO stage decides where the logging probe runs."""
        self.zero_stage = zero_stage

    def model_spec(self) -> dict[str, Any]:
        return {"library": "open_clip", "name": self.model, "kwargs": dict(self.model_kwargs)}

    def build_module(self) -> nn.Module:
        import open_clip

        register_open_clip_configs()
        model = open_clip.create_model(self.model, output_dict=True, **self.model_kwargs)
        self.scalar_names = vectorize_scalar_parameters_(model)
        trunk = getattr(model.visual, "trunk", None)
        self.probe_module = ProbeModule(trunk, self.zero_stage) if trunk is not None else None
        return model

    def aug_settings(self) -> ClipAugSettings:
        """open_clip's transform and tokenizer at the model config's image size and context length."""
        import open_clip

        register_open_clip_configs()
        config = open_clip.get_model_config(self.model)
        if config is None:
            raise ValueError(f"unknown open_clip model config {self.model!r}")
        size = config["vision_cfg"]["image_size"]
        return ClipAugSettings(
            image_size=size if isinstance(size, int) else size[0],
            scale=tuple(self.settings.crop_scale),
            tokenizer=self.model,
            context_length=config.get("text_cfg", {}).get("context_length", 77),
            uint8_images=self.settings.uint8_images,
        )

    def build_loader(self, rank: int, world_size: int) -> ResumableLoader:
        samples = clip_samples(self.aug_settings(), train=True, draft_size=self.loader_settings.draft_size)
        return ResumableLoader(self.data_dir, samples, self.loader_settings, seed=self.seed, rank=rank,
                               world_size=world_size)

    @property
    def loss(self) -> nn.Module:
        """open_clip's ``ClipLoss`` over the default process group (made on first use, when it exists)."""
        if self._loss is None:
            from open_clip.loss import ClipLoss

            distributed = dist.is_available() and dist.is_initialized()
            self._loss = ClipLoss(
                local_loss=self.settings.local_loss,
                gather_with_grad=True,
                cache_labels=True,
                rank=dist.get_rank() if distributed else 0,
                world_size=dist.get_world_size() if distributed else 1,
            )
        return self._loss

    def compute_loss(self, engine: Any, batch: Mapping[str, Any], step: int
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        images = batch["image"].to(engine.device, non_blocking=True)
        if self.settings.uint8_images:
            images = self.normalize(images)
        with forward_precision(engine) as dtype:
            images = images.to(dtype)
            out = engine(images, batch["text"].to(engine.device, non_blocking=True))
        self._probe = images[:PROBE_IMAGES].detach()
        logit_scale = out["logit_scale"].float()
        loss = self.loss(out["image_features"].float(), out["text_features"].float(), logit_scale)
        return loss, {"logit_scale": logit_scale.detach().reshape(-1)[0]}

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        clamp_trained_parameter_(engine.module.logit_scale, 0.0, math.log(self.settings.max_logit_scale))

    def extra_metrics(self, engine: Any) -> dict[str, float]:
        """The vision tower's γ and phase synchrony on a few of the last images."""
        if self._probe is None or self.probe_module is None:
            return {}
        with self.probe_module(engine, engine.module.visual.trunk) as trunk, forward_precision(engine):
            return kope_metrics(trunk, self._probe)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"the clip task keeps no state, got keys {sorted(state)}")

    def parameters_for_export(self, engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole open_clip model's state dict: it loads into ``open_clip.create_model(name)``."""
        named = ((name, tensor.detach().float() if tensor.is_floating_point() else tensor.detach())
                 for name, tensor in engine.module.state_dict().items())
        return restore_scalars(named, self.scalar_names)

    @staticmethod
    def inference_weights(module_state: Mapping[str, torch.Tensor], task_state: Mapping[str, Any],
                          choice: WeightsChoice) -> tuple[dict[str, torch.Tensor], str]:
        """The whole open_clip model, as trained: CLIP training keeps no averaged copy."""
        return trained_weights_only(module_state, choice, "CLIP training")
