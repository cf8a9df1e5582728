"""Joint image/mask augmentation for semantic segmentation: mmsegmentation's ADE20K pipeline, drawn from one
``numpy`` generator so that a sample's augmentation is a pure function of its seed (exact resume).

Training (mmseg ``RandomResize`` + ``RandomCrop`` + ``RandomFlip`` + ``PhotoMetricDistortion``):

* resize, keeping the aspect ratio, so the long side fits ``scale[0]·r`` and the short side ``scale[1]·r``,
  ``r ~ U(ratio_range)``; bilinear for the image, nearest for the mask (labels are never blended);
* a random ``crop_size`` crop, re-drawn up to 10 times while one class covers more than ``cat_max_ratio`` of
  the crop's labelled pixels (mmseg's ``cat_max_ratio``), smaller sides padded after normalisation (image 0,
  mask 255, as mmseg's data preprocessor pads);
* a horizontal flip of both with probability ``hflip``;
* photometric distortion of the image alone: brightness ±32, contrast and saturation ×[0.5, 1.5], hue ±18 of
  OpenCV's 180 (each with probability 1/2; contrast before or after the colour changes with probability 1/2).

Evaluation: the image resized (bilinear) to fit ``scale``; the mask kept at its own size, where predictions are
scored (mmseg resizes the logits back to the annotation).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data.settings import SegmentationAugSettings

IGNORE_INDEX = 255
CROP_TRIES = 10
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # of OpenCV's 0..180 hue; PIL's hue runs 0..255


def fit_size(width: int, height: int, scale: tuple[float, float]) -> tuple[int, int]:
    """(width, height) scaled by one factor so the long side fits ``max(scale)`` and the short ``min(scale)``
    (mmcv's ``rescale_size`` with ``keep_ratio``)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def resize_pair(image: Image.Image, mask: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    return image.resize(size, Image.Resampling.BILINEAR), mask.resize(size, Image.Resampling.NEAREST)


def crop_box(height: int, width: int, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a ``crop`` window (the whole side where it is shorter)."""
    top = int(rng.integers(0, max(height - crop, 0) + 1))
    left = int(rng.integers(0, max(width - crop, 0) + 1))
    return top, left


def random_crop(image: np.ndarray, mask: np.ndarray, crop: int, cat_max_ratio: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop`` window of both arrays; with ``cat_max_ratio`` < 1 re-drawn while one class dominates it."""
    top, left = crop_box(*mask.shape, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            labels, counts = np.unique(mask[top:top + crop, left:left + crop], return_counts=True)
            counts = counts[labels != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = crop_box(*mask.shape, crop, rng)
    return image[top:top + crop, left:left + crop], mask[top:top + crop, left:left + crop]


def _scaled(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on an RGB uint8 array (same draws, same order)."""
    if rng.integers(2):
        image = _scaled(image, beta=float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = _scaled(image, alpha=float(rng.uniform(*CONTRAST_RANGE)))
    hsv = np.array(Image.fromarray(image, "RGB").convert("HSV"))
    if rng.integers(2):
        hsv[..., 1] = _scaled(hsv[..., 1], alpha=float(rng.uniform(*SATURATION_RANGE)))
    if rng.integers(2):
        shift = int(rng.integers(-HUE_DELTA, HUE_DELTA + 1)) * 256 / 180
        hsv[..., 0] = np.round(hsv[..., 0].astype(np.float32) + shift).astype(np.int64) % 256
    image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and rng.integers(2):
        image = _scaled(image, alpha=float(rng.uniform(*CONTRAST_RANGE)))
    return image


def train_pair(image: Image.Image, mask: Image.Image, aug: SegmentationAugSettings,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The augmented RGB uint8 image (h, w, 3) and uint8 mask (h, w), at most ``crop_size`` on each side."""
    ratio = float(rng.uniform(*aug.ratio_range))
    size = fit_size(*image.size, (aug.scale[0] * ratio, aug.scale[1] * ratio))
    image, mask = resize_pair(image, mask, size)
    pixels, labels = random_crop(np.asarray(image), np.asarray(mask), aug.crop_size, aug.cat_max_ratio, rng)
    if rng.random() < aug.hflip:
        pixels, labels = pixels[:, ::-1], labels[:, ::-1]
    if aug.photometric:
        pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)
    return np.ascontiguousarray(pixels), np.ascontiguousarray(labels)


def eval_image(image: Image.Image, aug: SegmentationAugSettings) -> np.ndarray:
    """The evaluation input: the image resized to fit ``scale`` (RGB uint8, h × w × 3)."""
    return np.asarray(image.resize(fit_size(*image.size, aug.scale), Image.Resampling.BILINEAR))
