"""Image decoding and the augmentations of the three training modes, built from timm, torchvision, open_clip.

* supervised: DeiT-III — RandomResizedCrop (bicubic), flip, 3-Augment (one of grayscale, solarize,
  Gaussian blur: timm's ``3a`` policy) and ColorJitter; Mixup/CutMix on the batch via ``timm.data.Mixup``.
* DINO: 2 global + N local crops with DINO's colour, blur and solarize augmentations (DINOv2's recipe),
  and iBOT block masks for the global crops.
* CLIP: open_clip's ``image_transform`` and tokenizer.

Random draws come from the global ``random``/``numpy``/``torch`` generators, which the loader seeds per
sample, and from the ``numpy`` generator passed in (masks), so every augmentation is reproducible.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torchvision import transforms as T

from pipeline.core.config.types import setting
from pipeline.data.settings import DinoAugSettings, SupervisedAugSettings

ImageTransform = Callable[[Image.Image], torch.Tensor]


def decode_image(data: bytes, draft_size: int = 0) -> Image.Image:
    """Decode to RGB. ``draft_size`` > 0 lets libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides
    stay >= draft_size: much faster for large JPEGs, at the cost of detail in small random crops."""
    image = Image.open(io.BytesIO(data))
    if draft_size:
        image.draft("RGB", (draft_size, draft_size))
    return image.convert("RGB")


def eval_transform(
    image_size: int,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    uint8: bool = False,
) -> ImageTransform:
    """Resize the shorter side to image_size / crop_pct, centre-crop image_size (timm's eval transform);
    ``uint8`` stops before normalising (see :class:`ImageNormalizer`)."""
    return create_transform(
        input_size=image_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
        mean=mean, std=std, use_prefetcher=uint8,
    )


class ImageNormalizer:
    """uint8 ``[B, 3, H, W]`` batches (``uint8_images``) to normalised fp32 on their device: what ``ToTensor`` and
    ``Normalize`` compute on the loader's workers, done after the copy to the device instead, which then moves a
    quarter of the bytes. The same uint8 pixels either way, so the results differ only by float rounding. The
    constants are made once per device (no host-to-device copy per batch)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = tuple(255.0 * float(m) for m in mean)
        self.std = tuple(255.0 * float(s) for s in std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                                       torch.tensor(self.std, device=device).view(1, -1, 1, 1))
        return self._constants[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (uint8_images: true), got {images.dtype}")
        mean, std = self._on(images.device)
        return (images.float() - mean) / std


def supervised_train_transform(aug: SupervisedAugSettings) -> ImageTransform:
    return create_transform(
        input_size=aug.image_size,
        is_training=True,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        color_jitter=aug.color_jitter or None,
        auto_augment=aug.auto_augment or ("3a" if aug.three_augment else None),
        interpolation=aug.interpolation,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
        use_prefetcher=aug.uint8_images,
    )


def supervised_eval_transform(aug: SupervisedAugSettings) -> ImageTransform:
    return eval_transform(aug.image_size, aug.eval_crop_pct, aug.interpolation, tuple(aug.mean), tuple(aug.std),
                          uint8=aug.uint8_images)


def make_mixup(aug: SupervisedAugSettings, num_classes: int) -> Mixup | None:
    """Batch-level Mixup/CutMix for the training step (needs an even batch); None when both are off."""
    if aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=aug.mixup_alpha,
        cutmix_alpha=aug.cutmix_alpha,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )


def block_mask(
    grid: tuple[int, int],
    num_patches: int,
    rng: np.random.Generator,
    min_block: int = 4,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """A boolean patch grid with about ``num_patches`` patches masked as a union of random rectangles
    (BEiT/iBOT block masking). It stops short of the target when no further rectangle fits."""
    height, width = grid
    mask = np.zeros(grid, dtype=bool)
    max_block = max_block or num_patches
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    masked = 0
    while masked < num_patches:
        budget = min(num_patches - masked, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, budget), budget)
            ratio = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if not (0 < h < height and 0 < w < width):
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= budget:
                mask[top:top + h, left:left + w] = True
                added = new
                break
        if added == 0:
            break
        masked += added
    return mask


class RandomGaussianBlur:
    """DINO's blur: PIL's Gaussian blur with radius uniform in ``radius``, applied with probability ``p``.
    PIL blurs the image in place of torchvision's tensor round trip: several times faster on 224-px crops."""

    def __init__(self, p: float, radius: tuple[float, float] = (0.1, 2.0)):
        self.p = p
        self.radius = radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))


class DinoMultiCrop:
    """One image to 2 global crops, N local crops and a block mask per global crop (flattened grid). Crops are
    normalised fp32, or the uint8 pixels with ``uint8_images`` (see :class:`ImageNormalizer`)."""

    def __init__(self, aug: DinoAugSettings):
        if aug.global_size % aug.patch_size:
            raise ValueError(f"global_size {aug.global_size} is not a multiple of patch_size {aug.patch_size}")
        self.aug = aug
        bicubic = T.InterpolationMode.BICUBIC
        colour = T.Compose([
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        finish = T.PILToTensor() if aug.uint8_images else T.Compose([T.ToTensor(), T.Normalize(aug.mean, aug.std)])
        global_crop = T.Compose([
            T.RandomResizedCrop(aug.global_size, scale=tuple(aug.global_scale), interpolation=bicubic),
            T.RandomHorizontalFlip(aug.hflip),
            colour,
        ])
        self.global_views = [
            T.Compose([global_crop, RandomGaussianBlur(1.0), finish]),
            T.Compose([global_crop, RandomGaussianBlur(0.1), T.RandomSolarize(128, p=0.2), finish]),
        ]
        self.local_view = T.Compose([
            T.RandomResizedCrop(aug.local_size, scale=tuple(aug.local_scale), interpolation=bicubic),
            T.RandomHorizontalFlip(aug.hflip),
            colour,
            RandomGaussianBlur(0.5),
            finish,
        ])
        side = aug.global_size // aug.patch_size
        self.grid = (side, side)

    def masks(self, rng: np.random.Generator) -> list[torch.Tensor]:
        """One flattened block mask per global crop: masked with probability ``mask_prob``, a ratio drawn
        uniformly from ``mask_ratio``. Drawn per crop (DINOv2 spreads the ratios over a batch instead), so
        a sample's masks depend only on its own seed, whatever batch it lands in."""
        patches = self.grid[0] * self.grid[1]
        masks = []
        for _ in self.global_views:
            mask = np.zeros(self.grid, dtype=bool)
            if rng.random() < self.aug.mask_prob:
                count = int(patches * rng.uniform(*self.aug.mask_ratio))
                mask = block_mask(self.grid, count, rng, max_block=max(patches // 2, 1))
            masks.append(torch.from_numpy(mask.reshape(-1)))
        return masks

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, list[torch.Tensor]]:
        return {
            "global_crops": [view(image) for view in self.global_views],
            "local_crops": [self.local_view(image) for _ in range(self.aug.local_crops)],
            "masks": self.masks(rng),
        }


@dataclass
class ClipAugSettings:
    """open_clip's image transform and tokenizer."""

    image_size: int = setting(224, ge=8, help="image size (pixels)")
    scale: tuple[float, float] = (0.9, 1.0)
    tokenizer: str = setting("ViT-B-16", help="open_clip model name whose tokenizer to use")
    context_length: int = setting(77, ge=2, help="text tokens per caption")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    uint8_images: bool = False


def clip_image_transform(aug: ClipAugSettings, train: bool) -> ImageTransform:
    """open_clip's transform: RandomResizedCrop(scale) when training, resize + centre crop otherwise; with
    ``uint8_images`` it stops before its ToTensor and Normalize (see :func:`clip_normalizer`)."""
    transform = open_clip.image_transform(
        aug.image_size, is_train=train, mean=aug.mean, std=aug.std,
        aug_cfg=open_clip.AugmentationCfg(scale=tuple(aug.scale)) if train else None,
    )
    if not aug.uint8_images:
        return transform
    *head, to_tensor, normalize = transform.transforms
    if not isinstance(normalize, T.Normalize) or "ToTensor" not in type(to_tensor).__name__:
        raise ValueError(f"open_clip's image transform no longer ends with ToTensor and Normalize: {transform}")
    return T.Compose([*head, T.PILToTensor()])


def clip_normalizer(aug: ClipAugSettings) -> ImageNormalizer:
    """The normalisation open_clip's transform ends with, for uint8 batches on the training device."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return ImageNormalizer(aug.mean or OPENAI_DATASET_MEAN, aug.std or OPENAI_DATASET_STD)


def clip_tokenizer(aug: ClipAugSettings) -> Callable[[list[str]], torch.Tensor]:
    return open_clip.get_tokenizer(aug.tokenizer, context_length=aug.context_length)
