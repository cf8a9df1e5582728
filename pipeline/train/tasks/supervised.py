"""Supervised classification (DeiT-III recipe): Mixup/CutMix with binary cross-entropy, or cross-entropy with
label smoothing, and an EMA of the weights that becomes the exported model.

BCE follows DeiT-III: with Mixup/CutMix every class present in a mixed image gets target 1
(``bce_binarize``). EMA needs the full weights on every rank, so it is refused under ZeRO-3.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from pipeline.config.types import InputPath, setting
from pipeline.data.loaders import LoaderSettings, ResumableLoader
from pipeline.data.loaders_samples import supervised_samples
from pipeline.data.manifest import Manifest
from pipeline.data.transforms import SupervisedAugSettings, make_mixup
from pipeline.models import kope_vit  # noqa: F401  (registers the vit_kope_* models)
from pipeline.train.ema import ModelEma
from pipeline.train.engine import forward_precision, gathered_parameters
from pipeline.train.metrics import kope_metrics
from pipeline.train.scalar_params import restore_scalars, vectorize_scalar_parameters_

PROBE_IMAGES = 8


@dataclass
class SupervisedSettings:
    """Loss, EMA and augmentation of supervised training; defaults are the paper's DeiT-III recipe."""

    loss: Literal["bce", "ce"] = setting("bce", help="bce (DeiT-III) or ce (cross-entropy)")
    bce_binarize: bool = setting(True, help="bce: targets of every class present in a mixed image set to 1")
    ema_decay: float = setting(0.99996, ge=0, lt=1, help="EMA of the weights (0: off; needs zero_stage <= 2)")
    aug: SupervisedAugSettings = field(default_factory=SupervisedAugSettings)
    val_data: InputPath | None = setting(None, help="sharded validation set: top-1 of the exported model at the end")
    val_batch_size: int = setting(256, ge=1, help="evaluation batch size")


def _criterion(settings: SupervisedSettings, mixing: bool) -> nn.Module:
    smoothing = settings.aug.label_smoothing
    if settings.loss == "bce":
        threshold = 0.0 if settings.bce_binarize and mixing else None
        return BinaryCrossEntropy(smoothing=0.0 if mixing else smoothing, target_threshold=threshold)
    return SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=smoothing)


class SupervisedTask:
    """The ``supervised`` mode of the engine (see :class:`pipeline.train.task.Task`)."""

    name = "supervised"

    def __init__(self, settings: SupervisedSettings, *, model: str, model_kwargs: Mapping[str, Any],
                 data_dir: str | Path, loader: LoaderSettings, seed: int, total_steps: int, zero_stage: int):
        if settings.ema_decay > 0 and zero_stage == 3:
            raise ValueError("supervised.ema_decay > 0 needs zero_stage 0, 1 or 2: ZeRO-3 shards the weights the "
                             "EMA follows; set ema_decay: 0 or zero_stage: 2")
        self.settings = settings
        self.model_name = model
        self.model_kwargs = dict(model_kwargs)
        self.data_dir = Path(data_dir)
        self.loader_settings = loader
        self.seed = seed
        self.num_classes = len(Manifest.load(self.data_dir).classes)
        if self.num_classes < 2:
            raise ValueError(f"{self.data_dir}: supervised training needs a classification dataset with classes")
        self.mixup = make_mixup(settings.aug, self.num_classes)
        if self.mixup is not None and loader.batch_size % 2:
            raise ValueError(f"Mixup/CutMix pairs images within a batch: loader.batch_size {loader.batch_size} "
                             "must be even")
        self.criterion = _criterion(settings, self.mixup is not None)
        self.ema: ModelEma | None = None
        self.scalar_names: set[str] = set()
        self._probe: torch.Tensor | None = None

    def model_spec(self) -> dict[str, Any]:
        kwargs = {**self.model_kwargs, "num_classes": self.num_classes, "img_size": self.settings.aug.image_size}
        return {"library": "timm", "name": self.model_name, "kwargs": kwargs}

    def create_model(self) -> nn.Module:
        spec = self.model_spec()
        return timm.create_model(spec["name"], **spec["kwargs"])

    def build_module(self) -> nn.Module:
        module = self.create_model()
        self.scalar_names = vectorize_scalar_parameters_(module)
        if self.settings.ema_decay > 0:
            self.ema = ModelEma(module, self.settings.ema_decay)
        return module

    def build_loader(self, rank: int, world_size: int) -> ResumableLoader:
        samples = supervised_samples(self.settings.aug, train=True, draft_size=self.loader_settings.draft_size)
        return ResumableLoader(self.data_dir, samples, self.loader_settings, seed=self.seed, rank=rank,
                               world_size=world_size)

    def compute_loss(self, engine: Any, batch: Mapping[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"].to(engine.device)
        targets = batch["label"].to(engine.device)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with forward_precision(engine) as dtype:
            images = images.to(dtype)
        self._probe = images[:PROBE_IMAGES].detach()
        logits = engine(images)
        return self.criterion(logits.float(), targets), {}

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        if self.ema is not None:
            self.ema.update(engine.module)

    def extra_metrics(self, engine: Any) -> dict[str, float]:
        if self._probe is None:
            return {}
        with gathered_parameters(engine), forward_precision(engine):
            return kope_metrics(engine.module, self._probe)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state.get("ema") is None) != (self.ema is None):
            raise ValueError("checkpoint and settings disagree on whether an EMA of the weights is kept")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def parameters_for_export(self, engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """The EMA weights when an EMA is kept (DeiT-III evaluates those), else the trained ones."""
        weights = self.ema.weights_for(engine.module) if self.ema is not None else engine.module.state_dict()
        for name, tensor in restore_scalars(weights.items(), self.scalar_names):
            yield name, tensor.detach().float() if tensor.is_floating_point() else tensor.detach()

    @torch.no_grad()
    def evaluate(self, weights: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, float]:
        """Top-1 and top-5 accuracy (fractions, as the evaluate stage reports them) of ``weights`` on
        ``val_data`` (centre crops), in this process alone."""
        if self.settings.val_data is None:
            return {}
        model = self.create_model().to(device).eval()
        model.load_state_dict(weights)
        samples = supervised_samples(self.settings.aug, train=False, draft_size=self.loader_settings.draft_size)
        settings = replace(self.loader_settings, batch_size=self.settings.val_batch_size, shuffle=False,
                           drop_last=False, repeats=1, resampled=False, samples_per_epoch=0)
        correct1 = correct5 = seen = 0
        for batch in ResumableLoader(self.settings.val_data, samples, settings, seed=self.seed):
            logits = model(batch["image"].to(device))
            labels = batch["label"].to(device)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top5[:, 0] == labels).sum())
            correct5 += int((top5 == labels[:, None]).any(dim=1).sum())
            seen += len(labels)
        return {"val_top1": correct1 / seen, "val_top5": correct5 / seen, "val_samples": float(seen)}

