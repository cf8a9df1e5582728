"""Semantic segmentation fine-tuning (SETR-PUP or a linear head on an exported ViT backbone): per-pixel
cross-entropy with 255 ignored, averaged over every pixel of the batch as mmseg does (a crop of ignored pixels
contributes zero instead of a NaN), plus ``aux_weight`` times each auxiliary head's loss.

Nothing is kept outside the engine: the exported model is the trained segmenter. Its BatchNorm layers become
``SyncBatchNorm`` when several CUDA ranks train (SETR's recipe); on CPUs each rank keeps its own statistics
and rank 0's are exported.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.data.loaders import ResumableLoader
from pipeline.data.manifest import Manifest
from pipeline.data.segmentation_samples import SegmentationSamples
from pipeline.data.segmentation_transforms import IGNORE_INDEX
from pipeline.data.settings import LoaderSettings
from pipeline.models.segmentation import SegmenterConfig, backbone_kwargs, create_segmenter
from pipeline.train.engine import forward_precision
from pipeline.train.metrics import kope_metrics
from pipeline.train.probe import ProbeModule
from pipeline.train.scalar_params import restore_scalars, vectorize_scalar_parameters_
from pipeline.train.settings import SegmentationSettings, WeightsChoice
from pipeline.train.task import trained_weights_only
from pipeline.train.tasks.supervised import TimmModel

PROBE_IMAGES = 4


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per pixel, ignored pixels counting zero, averaged over all pixels (mmseg's default)."""
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="none").mean()


class SegmentationTask:
    """The ``segmentation`` mode of the engine (see :class:`pipeline.train.task.Task`)."""

    name = "segmentation"

    def __init__(self, settings: SegmentationSettings, *, backbone: TimmModel, data_dir: str | Path,
                 loader: LoaderSettings, seed: int):
        self.settings = settings
        self.backbone = backbone
        self.data_dir = Path(data_dir)
        self.loader_settings = loader
        self.seed = seed
        manifest = Manifest.load(self.data_dir)
        if manifest.kind != "segmentation" or not manifest.classes:
            raise ValueError(f"{self.data_dir}: segmentation training needs a segmentation dataset with classes, "
                             f"this one holds {manifest.kind}")
        self.classes = [info.name for info in manifest.classes]
        self.scalar_names: set[str] = set()
        self._probe: torch.Tensor | None = None
        self.zero_stage = 0
        self.probe_module: ProbeModule | None = None

    @property
    def config(self) -> SegmenterConfig:
        """How to rebuild the segmenter: the backbone's arguments at the training crop, and the heads."""
        settings = self.settings
        kwargs = {**self.backbone.init_args, **self.backbone.kwargs, "img_size": settings.aug.crop_size}
        return SegmenterConfig(self.backbone.name, kwargs, len(self.classes), settings.head,
                               list(settings.out_indices), settings.channels, settings.num_convs, settings.aux_convs,
                               settings.aux_weight, settings.dropout)

    def begin(self, total_steps: int, zero_stage: int = 0) -> None:
        """Nothing depends on the run's length; the ZeRO stage decides where the logging probe runs."""
        self.zero_stage = zero_stage

    def model_spec(self) -> dict[str, Any]:
        return {"library": "kope", "name": "segmenter", "kwargs": asdict(self.config)}

    def build_module(self) -> nn.Module:
        backbone = self.backbone.create(**backbone_kwargs({}), img_size=self.settings.aug.crop_size)
        patch = backbone.patch_embed.patch_size[0]
        if self.settings.aug.crop_size % patch:
            raise ValueError(f"segmentation.aug.crop_size {self.settings.aug.crop_size} is not a multiple of the "
                             f"backbone's patch size {patch}")
        module: nn.Module = create_segmenter(self.config, backbone)
        if dist.is_initialized() and dist.get_world_size() > 1 and torch.cuda.is_available():
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self.scalar_names = vectorize_scalar_parameters_(module)
        self.probe_module = ProbeModule(module.backbone, self.zero_stage)
        return module

    def build_loader(self, rank: int, world_size: int) -> ResumableLoader:
        return ResumableLoader(self.data_dir, SegmentationSamples(self.settings.aug, train=True),
                               self.loader_settings, seed=self.seed, rank=rank, world_size=world_size)

    def compute_loss(self, engine: Any, batch: Mapping[str, Any], step: int
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        images = batch["image"].to(engine.device, non_blocking=True)
        masks = batch["mask"].to(engine.device, non_blocking=True)
        with forward_precision(engine) as dtype:
            images = images.to(dtype)
        self._probe = images[:PROBE_IMAGES].detach()
        out = engine(images)
        loss = pixel_loss(out["out"], masks)
        if not out.get("aux"):
            return loss, {}
        aux = sum(pixel_loss(logits, masks) for logits in out["aux"])
        return loss + self.settings.aux_weight * aux, {"loss_decode": loss.detach(), "loss_aux": aux.detach()}

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        """Nothing is averaged or followed."""

    def extra_metrics(self, engine: Any) -> dict[str, float]:
        if self._probe is None:
            return {}
        with self.probe_module(engine, engine.module.backbone) as backbone, forward_precision(engine):
            return kope_metrics(backbone, self._probe)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing is kept outside the engine."""

    def parameters_for_export(self, engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in restore_scalars(engine.module.state_dict().items(), self.scalar_names):
            yield name, tensor.detach().float() if tensor.is_floating_point() else tensor.detach()

    @staticmethod
    def inference_weights(module_state: Mapping[str, torch.Tensor], task_state: Mapping[str, Any],
                          choice: WeightsChoice) -> tuple[dict[str, torch.Tensor], str]:
        """The trained weights: a segmentation run keeps no averaged copy."""
        return trained_weights_only(module_state, choice, "a segmentation run")
