"""Per-mode sample pipelines: which tar members a mode needs, how one sample is made, how a batch is collated.

Batches are dicts (``key`` always holds the sample keys, in batch order); tensors are stacked with
``default_collate``, which in a worker writes straight into shared memory (no second copy to send it):

* supervised: ``image`` float [B, 3, S, S] (uint8 with ``uint8_images``), ``label`` int64 [B];
* DINO: ``global_crops`` [2B, 3, G, G] and ``local_crops`` [N·B, 3, L, L] (uint8 with ``uint8_images``),
  crop-major (all samples' first crop, then all samples' second crop, as DINOv2 collates), ``masks`` bool
  [2B, (G/patch)²] in the order of ``global_crops``, and the same masks as index lists (DINOv2's): ``mask_indices``
  int64 [M], the flat (crop · patches + patch) index of every masked patch in row-major order, and
  ``mask_weights`` fp32 [M], 1 / (masked patches of its crop). Built here, on the workers, so training selects
  masked patches with ``index_select`` of a size the host knows, not boolean indexing (a device sync and a
  data-dependent shape every step);
* CLIP: ``image`` float [B, 3, S, S], ``text`` int64 [B, context length] from open_clip's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import default_collate

from pipeline.data.transforms import (
    ClipAugSettings,
    DinoAugSettings,
    DinoMultiCrop,
    ImageTransform,
    SupervisedAugSettings,
    clip_image_transform,
    clip_tokenizer,
    decode_image,
    supervised_eval_transform,
    supervised_train_transform,
)

Sample = dict[str, Any]


class SamplePipeline(Protocol):
    extensions: tuple[str, ...]

    def make(self, key: str, members: dict[str, bytes], rng: np.random.Generator) -> Sample: ...

    def collate(self, samples: list[Sample]) -> dict[str, Any]: ...


def _label(data: bytes) -> int:
    text = data.decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise ValueError(f"class label {text[:20]!r} is not a non-negative integer")
    return int(text)


class SupervisedSamples:
    extensions = ("jpg", "cls")

    def __init__(self, transform: ImageTransform, draft_size: int = 0):
        self.transform = transform
        self.draft_size = draft_size

    def make(self, key: str, members: dict[str, bytes], rng: np.random.Generator) -> Sample:
        image = self.transform(decode_image(members["jpg"], self.draft_size))
        return {"key": key, "image": image, "label": _label(members["cls"])}

    def collate(self, samples: list[Sample]) -> dict[str, Any]:
        return {
            "key": [s["key"] for s in samples],
            "image": default_collate([s["image"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        }


def masked_patch_index(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``masks`` (crops, patches) bool as the flat indices of the masked patches (row-major) and each one's weight,
    1 / (masked patches of its crop): every masked crop then weighs one in iBOT's loss, whatever its mask size."""
    indices = masks.flatten().nonzero().flatten()
    counts = masks.sum(-1).clamp_min(1).float()
    return indices, (1.0 / counts)[indices // masks.shape[-1]]


def _crop_major(samples: list[Sample], field: str) -> list[torch.Tensor]:
    count = len(samples[0][field])
    return [s[field][i] for i in range(count) for s in samples]


class DinoSamples:
    extensions = ("jpg",)

    def __init__(self, multicrop: DinoMultiCrop, draft_size: int = 0):
        self.multicrop = multicrop
        self.draft_size = draft_size

    def make(self, key: str, members: dict[str, bytes], rng: np.random.Generator) -> Sample:
        return {"key": key, **self.multicrop(decode_image(members["jpg"], self.draft_size), rng)}

    def collate(self, samples: list[Sample]) -> dict[str, Any]:
        local = _crop_major(samples, "local_crops")
        aug = self.multicrop.aug
        empty = torch.empty(0, 3, aug.local_size, aug.local_size, dtype=torch.uint8 if aug.uint8_images else None)
        masks = default_collate(_crop_major(samples, "masks"))
        indices, weights = masked_patch_index(masks)
        return {
            "key": [s["key"] for s in samples],
            "global_crops": default_collate(_crop_major(samples, "global_crops")),
            "local_crops": default_collate(local) if local else empty,
            "masks": masks,
            "mask_indices": indices,
            "mask_weights": weights,
        }


class ClipSamples:
    extensions = ("jpg", "txt")

    def __init__(self, transform: ImageTransform, tokenizer: Callable[[list[str]], torch.Tensor],
                 draft_size: int = 0):
        self.transform = transform
        self.tokenizer = tokenizer
        self.draft_size = draft_size

    def make(self, key: str, members: dict[str, bytes], rng: np.random.Generator) -> Sample:
        image = self.transform(decode_image(members["jpg"], self.draft_size))
        return {"key": key, "image": image, "caption": members["txt"].decode("utf-8")}

    def collate(self, samples: list[Sample]) -> dict[str, Any]:
        return {
            "key": [s["key"] for s in samples],
            "image": default_collate([s["image"] for s in samples]),
            "text": self.tokenizer([s["caption"] for s in samples]),
        }


def supervised_samples(aug: SupervisedAugSettings, train: bool = True, draft_size: int = 0) -> SupervisedSamples:
    transform = supervised_train_transform(aug) if train else supervised_eval_transform(aug)
    return SupervisedSamples(transform, draft_size)


def dino_samples(aug: DinoAugSettings, draft_size: int = 0) -> DinoSamples:
    return DinoSamples(DinoMultiCrop(aug), draft_size)


def clip_samples(aug: ClipAugSettings, train: bool = True, draft_size: int = 0) -> ClipSamples:
    return ClipSamples(clip_image_transform(aug, train), clip_tokenizer(aug), draft_size)
