"""The segmentation sample pipeline for :class:`pipeline.data.loaders.ResumableLoader` (the loader's
``SamplePipeline`` contract): reads ``<key>.jpg`` + ``<key>.seg.png``, augments both together
(:mod:`pipeline.data.segmentation_transforms`) from the generator the loader seeds by position, so a resumed
run sees exactly the batches of an uninterrupted one.

Batches:

* training: ``image`` float [B, 3, C, C] (normalised, padded with 0 to the crop ``C``), ``mask`` int64 [B, C, C]
  (class indices, 255 ignored and padded);
* evaluation: ``image`` a list of float [3, h, w] (resized to fit ``scale``), ``mask`` a list of int64 [H, W] at
  the annotation's own size, where predictions are scored.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.segmentation_transforms import IGNORE_INDEX, eval_image, train_pair
from pipeline.data.settings import SegmentationAugSettings
from pipeline.data.transforms import decode_image

Sample = dict[str, Any]


def decode_mask(data: bytes, size: tuple[int, int]) -> Image.Image:
    """A stored mask (single-channel PNG of an image of ``size``), or ValueError saying what is wrong."""
    mask = Image.open(io.BytesIO(data))
    if mask.mode != "L" or mask.size != size:
        raise ValueError(f"mask is {mask.mode} {mask.size[0]}x{mask.size[1]}, expected L {size[0]}x{size[1]}")
    return mask


def normalised(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """RGB uint8 (h, w, 3) -> float [3, h, w], (x / 255 - mean) / std."""
    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float().div_(255)
    return (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class SegmentationSamples:
    """One sample's image and mask, augmented for training or resized for evaluation."""

    extensions = ("jpg", "seg.png")

    def __init__(self, aug: SegmentationAugSettings, train: bool = True):
        self.aug = aug
        self.train = train

    def make(self, key: str, members: dict[str, bytes], rng: np.random.Generator) -> Sample:
        image = decode_image(members["jpg"])
        mask = decode_mask(members["seg.png"], image.size)
        if not self.train:
            return {"key": key, "image": normalised(eval_image(image, self.aug), self.aug.mean, self.aug.std),
                    "mask": torch.from_numpy(np.array(mask, dtype=np.int64))}
        pixels, labels = train_pair(image, mask, self.aug, rng)
        crop = self.aug.crop_size
        padded = torch.zeros(3, crop, crop)
        padded_mask = torch.full((crop, crop), IGNORE_INDEX, dtype=torch.long)
        height, width = labels.shape
        padded[:, :height, :width] = normalised(pixels, self.aug.mean, self.aug.std)
        padded_mask[:height, :width] = torch.from_numpy(labels.astype(np.int64))
        return {"key": key, "image": padded, "mask": padded_mask}

    def collate(self, samples: list[Sample]) -> dict[str, Any]:
        keys = [s["key"] for s in samples]
        if not self.train:
            return {"key": keys, "image": [s["image"] for s in samples], "mask": [s["mask"] for s in samples]}
        return {"key": keys, "image": torch.stack([s["image"] for s in samples]),
                "mask": torch.stack([s["mask"] for s in samples])}
