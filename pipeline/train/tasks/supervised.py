"""Supervised classification (DeiT-III recipe): Mixup/CutMix with binary cross-entropy, or cross-entropy with
label smoothing, and an EMA of the weights that becomes the exported model.

BCE follows DeiT-III: with Mixup/CutMix every class present in a mixed image gets target 1
(``bce_binarize``). EMA needs the full weights on every rank, so it is refused under ZeRO-3.

With ``aug.uint8_images`` the loader sends uint8 pixels; they are normalised on the training device, and
Mixup/CutMix mix the normalised images there (mixing commutes with the per-channel affine normalisation, so this
is what mixing the loader's float images computes).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from pipeline.checkpoint.files import CheckpointError
from pipeline.data.loaders import ResumableLoader
from pipeline.data.loaders_samples import supervised_samples
from pipeline.data.manifest import Manifest
from pipeline.data.settings import LoaderSettings
from pipeline.data.transforms import ImageNormalizer, make_mixup
from pipeline.models import kope_vit  # noqa: F401  (registers the vit_kope_* models)
from pipeline.train.ema import ModelEma
from pipeline.train.engine import forward_precision
from pipeline.train.metrics import kope_metrics
from pipeline.train.probe import ProbeModule
from pipeline.train.scalar_params import restore_scalars, vectorize_scalar_parameters_
from pipeline.train.settings import SupervisedSettings, WeightsChoice

PROBE_IMAGES = 8


def _criterion(settings: SupervisedSettings, mixing: bool) -> nn.Module:
    smoothing = settings.aug.label_smoothing
    if settings.loss == "bce":
        threshold = 0.0 if settings.bce_binarize and mixing else None
        return BinaryCrossEntropy(smoothing=0.0 if mixing else smoothing, target_threshold=threshold)
    return SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=smoothing)


@dataclass(frozen=True)
class TimmModel:
    """The timm model a supervised run trains: built by name, or from an export folder's architecture and
    weights (fine-tuning), which timm loads itself (``local-dir:``), with a new classifier and position
    embeddings resampled to the training size."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    init: Path | None = None  # an export folder to start from
    init_args: dict[str, Any] = field(default_factory=dict)  # that export's model arguments

    def create(self, **extra: Any) -> nn.Module:
        if self.init is None:
            return timm.create_model(self.name, **self.kwargs, **extra)
        return timm.create_model(f"local-dir:{self.init.resolve()}", pretrained=True, **self.kwargs, **extra)

    def spec(self, **extra: Any) -> dict[str, Any]:
        """How to rebuild the trained model without the export it started from (for ``model.json``)."""
        return {"library": "timm", "name": self.name, "kwargs": {**self.init_args, **self.kwargs, **extra}}


class SupervisedTask:
    """The ``supervised`` mode of the engine (see :class:`pipeline.train.task.Task`)."""

    name = "supervised"

    def __init__(self, settings: SupervisedSettings, *, model: TimmModel, data_dir: str | Path,
                 loader: LoaderSettings, seed: int, val_dir: str | Path | None = None):
        """``val_dir``: the resolved ``settings.val_data``, where the exported model's top-1 is measured."""
        self.settings = settings
        self.model = model
        self.data_dir = Path(data_dir)
        self.val_dir = Path(val_dir) if val_dir is not None else None
        self.loader_settings = loader
        self.seed = seed
        self.num_classes = len(Manifest.load(self.data_dir).classes)
        if self.num_classes < 2:
            raise ValueError(f"{self.data_dir}: supervised training needs a classification dataset with classes")
        self.mixup = make_mixup(settings.aug, self.num_classes)
        self.normalize = ImageNormalizer(settings.aug.mean, settings.aug.std) if settings.aug.uint8_images else None
        self.criterion = _criterion(settings, self.mixup is not None)
        self.ema: ModelEma | None = None
        self.zero_stage = 0
        self.probe_module: ProbeModule | None = None
        self.scalar_names: set[str] = set()
        self._probe: torch.Tensor | None = None
        self._rank = 0
        self._steps_done = self._total_steps = 0  # for val_every_steps

    def begin(self, total_steps: int, zero_stage: int = 0) -> None:
        """The validation cadence depends on the run's length (a point at the last step); the ZeRO stage decides
        where the logging probe (and the validation during training) runs."""
        self._total_steps = total_steps
        self.zero_stage = zero_stage

    def _size_args(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "img_size": self.settings.aug.image_size}

    def model_spec(self) -> dict[str, Any]:
        return self.model.spec(**self._size_args())

    def create_model(self) -> nn.Module:
        return self.model.create(**self._size_args())

    def build_module(self) -> nn.Module:
        module = self.create_model()
        self.scalar_names = vectorize_scalar_parameters_(module)
        self.probe_module = ProbeModule(module, self.zero_stage)
        if self.settings.ema_decay > 0:
            self.ema = ModelEma(module, self.settings.ema_decay)
        return module

    def build_loader(self, rank: int, world_size: int) -> ResumableLoader:
        self._rank = rank
        samples = supervised_samples(self.settings.aug, train=True, draft_size=self.loader_settings.draft_size)
        return ResumableLoader(self.data_dir, samples, self.loader_settings, seed=self.seed, rank=rank,
                               world_size=world_size)

    def images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch of images on ``device`` as normalised fp32 (uint8 batches are normalised there)."""
        images = images.to(device, non_blocking=True)
        return self.normalize(images) if self.normalize is not None else images.float()

    def compute_loss(self, engine: Any, batch: Mapping[str, Any], step: int
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        images = self.images(batch["image"], engine.device)
        targets = batch["label"].to(engine.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with forward_precision(engine) as dtype:
            images = images.to(dtype)
        self._probe = images[:PROBE_IMAGES].detach()
        self._steps_done = step + 1
        logits = engine(images)
        return self.criterion(logits.float(), targets), {}

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        if self.ema is not None:
            self.ema.update(engine.module)

    def extra_metrics(self, engine: Any) -> dict[str, float]:
        if self._probe is None:
            return {}
        with self.probe_module(engine, engine.module) as module, forward_precision(engine) as dtype:
            metrics = kope_metrics(module, self._probe)
            if self._rank == 0 and self._val_due():
                val = self._val_accuracy(module, engine.device, workers=0, dtype=dtype)
                metrics["val_top1"] = val["val_top1"]
            return metrics

    def _val_due(self) -> bool:
        every = self.settings.val_every_steps
        return bool(every) and (self._steps_done % every == 0 or self._steps_done == self._total_steps)

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

    @staticmethod
    def inference_weights(module_state: Mapping[str, torch.Tensor], task_state: Mapping[str, Any],
                          choice: WeightsChoice) -> tuple[dict[str, torch.Tensor], str]:
        """From a consolidated checkpoint: the EMA weights when kept (and ``choice`` allows), else the trained
        ones, as the timm model's state dict; and which they are."""
        ema = task_state.get("ema")
        if choice == "trained" or (ema is None and choice == "auto"):
            return dict(module_state), "trained"
        if ema is None:
            raise CheckpointError("weights: averaged requested, but this run kept no EMA of the weights")
        unaveraged = set(module_state) - set(ema)
        if not set(ema) <= set(module_state) or any(module_state[name].is_floating_point() for name in unaveraged):
            raise CheckpointError(f"the EMA's {len(ema)} tensors do not match the {len(module_state)} trained "
                                  "tensors by name")
        return {name: ema.get(name, tensor).float() if tensor.is_floating_point() else tensor
                for name, tensor in module_state.items()}, "ema"

    def evaluate(self, weights: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, float]:
        """Top-1 and top-5 accuracy (fractions, as the evaluate stage reports them) of ``weights`` on
        ``val_data`` (centre crops), in this process alone."""
        if self.val_dir is None:
            return {}
        spec = self.model_spec()
        model = timm.create_model(spec["name"], **spec["kwargs"]).to(device)
        model.load_state_dict(weights)
        return self._val_accuracy(model, device, workers=self.loader_settings.num_workers)

    @torch.no_grad()
    def _val_accuracy(self, model: nn.Module, device: torch.device, workers: int,
                      dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Accuracy of ``model`` on ``val_data`` in eval mode (its training mode is restored), images in ``dtype``;
        ``workers`` loader processes (0 during training: none started at every logging step)."""
        samples = supervised_samples(self.settings.aug, train=False, draft_size=self.loader_settings.draft_size)
        settings = replace(self.loader_settings, batch_size=self.settings.val_batch_size, shuffle=False,
                           drop_last=False, repeats=1, resampled=False, samples_per_epoch=0, num_workers=workers)
        correct1 = correct5 = seen = 0
        was_training = model.training
        model.eval()
        try:
            for batch in ResumableLoader(self.val_dir, samples, settings, seed=self.seed):
                logits = model(self.images(batch["image"], device).to(dtype))
                labels = batch["label"].to(device)
                top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                correct1 += int((top5[:, 0] == labels).sum())
                correct5 += int((top5 == labels[:, None]).any(dim=1).sum())
                seen += len(labels)
        finally:
            model.train(was_training)
        return {"val_top1": correct1 / seen, "val_top5": correct5 / seen, "val_samples": float(seen)}
