"""Joint image/mask augmentation keeps the two aligned and never blends labels; the segmentation loader mode
resumes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.loaders import ResumableLoader
from pipeline.data.segmentation_samples import SegmentationSamples
from pipeline.data.segmentation_transforms import IGNORE_INDEX, fit_size, random_crop, train_pair
from pipeline.data.settings import LoaderSettings, SegmentationAugSettings, SegmentationShardSettings
from stages import shard_segmentation
from tests.data.shard_fixtures import encode, stage_context

LEVELS = np.array([20, 85, 150, 215], dtype=np.uint8)  # red level of each label, far apart


def blocks(seed: int, size: tuple[int, int] = (96, 72), block: int = 12) -> tuple[Image.Image, Image.Image]:
    """An image of square blocks whose label is a function of its pixels: red = LEVELS[label]; green and blue
    random per block (so flips and shifts are visible in them too)."""
    rng = np.random.default_rng(seed)
    rows, cols = size[1] // block, size[0] // block
    labels = np.kron(rng.integers(0, len(LEVELS), (rows, cols)), np.ones((block, block), int)).astype(np.uint8)
    pixels = np.zeros((*labels.shape, 3), np.uint8)
    pixels[..., 0] = LEVELS[labels]
    pixels[..., 1:] = np.kron(rng.integers(0, 256, (rows, cols, 2)), np.ones((block, block, 1), int))
    return Image.fromarray(pixels, "RGB"), Image.fromarray(labels, "L")


def labels_of(pixels: np.ndarray) -> np.ndarray:
    """The label each pixel's red level says (nearest level)."""
    return np.abs(pixels[..., 0:1].astype(int) - LEVELS.astype(int)).argmin(-1)


AUG = SegmentationAugSettings(crop_size=64, scale=(192, 96), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, hflip=0.5,
                              photometric=False)


@pytest.mark.parametrize("seed", range(12))
def test_augmented_mask_is_the_function_of_the_augmented_pixels(seed):
    image, mask = blocks(seed)
    pixels, labels = train_pair(image, mask, AUG, np.random.default_rng(seed))
    assert pixels.shape[:2] == labels.shape and max(labels.shape) <= AUG.crop_size
    assert set(np.unique(labels).tolist()) <= set(range(len(LEVELS)))  # nearest: no blended labels
    agreement = (labels_of(pixels) == labels).mean()
    assert agreement > 0.9  # only pixels on block edges, blended by the bilinear resize, may differ
    assert (labels_of(pixels[:, ::-1]) == labels).mean() < agreement - 0.2 or labels.shape[1] < 24  # a flip shows


def test_photometric_distortion_changes_pixels_not_masks_or_geometry():
    image, mask = blocks(3)
    plain = train_pair(image, mask, AUG, np.random.default_rng(7))
    distorted = train_pair(image, mask, SegmentationAugSettings(**{**AUG.__dict__, "photometric": True}),
                           np.random.default_rng(7))
    assert np.array_equal(plain[1], distorted[1])
    assert not np.array_equal(plain[0], distorted[0])


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    mask = np.zeros((256, 256), np.uint8)
    mask[:80, :80] = 1  # class 1 in one corner only
    image = np.zeros((256, 256, 3), np.uint8)

    def mixed_share(ratio: float) -> float:
        mixed = 0
        for seed in range(60):
            _, crop = random_crop(image, mask, 64, ratio, np.random.default_rng(seed))
            counts = np.bincount(crop.ravel(), minlength=2)
            mixed += counts.max() / counts.sum() < 0.75
        return mixed / 60

    off, on = mixed_share(1.0), mixed_share(0.75)
    assert off < 0.1 and on > 0.25 and on > 5 * off  # ten draws find a mixed crop where one rarely is


def test_small_images_are_padded_with_zero_and_ignored_labels():
    image, mask = blocks(1, size=(48, 36))
    aug = SegmentationAugSettings(crop_size=64, scale=(48, 36), ratio_range=(1.0, 1.0), hflip=0.0, photometric=False)
    sample = SegmentationSamples(aug).make("k", {"jpg": encode(image, "PNG"), "seg.png": encode(mask, "PNG")},
                                           np.random.default_rng(0))
    assert sample["image"].shape == (3, 64, 64) and sample["mask"].shape == (64, 64)
    assert (sample["mask"][36:] == IGNORE_INDEX).all() and (sample["mask"][:, 48:] == IGNORE_INDEX).all()
    assert (sample["image"][:, 36:] == 0).all() and (sample["mask"][:36, :48] != IGNORE_INDEX).all()
    assert fit_size(480, 360, (2048, 512)) == (683, 512)  # mmseg's ADE20K test scale keeps the ratio


def segmentation_shards(root: Path, count: int = 24) -> Path:
    """A sharded segmentation set of block images (through the real stage)."""
    images, masks = root / "src" / "images" / "training", root / "src" / "annotations" / "training"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for seed in range(count):
        image, mask = blocks(seed)
        (images / f"{seed:04d}.jpg").write_bytes(encode(image, "JPEG", quality=95))
        (masks / f"{seed:04d}.png").write_bytes(encode(mask, "PNG"))
    ctx = stage_context(root, "shard")
    settings = SegmentationShardSettings(source=str(root / "src"), splits={"training": "train"}, num_classes=4,
                                         reduce_zero_label=False, samples_per_shard=5, workers=1)
    shard_segmentation.run(settings, ctx)
    return ctx.out_dir / "train"


def test_loader_resumes_pixel_for_pixel_with_any_worker_count(tmp_path):
    data = segmentation_shards(tmp_path)
    aug = SegmentationAugSettings(crop_size=32, scale=(96, 72), ratio_range=(0.5, 1.5))
    settings = LoaderSettings(batch_size=4, num_workers=0, window_shards=2)
    whole = list(ResumableLoader(data, SegmentationSamples(aug), settings, seed=3))
    assert len(whole) == 6 and whole[0]["image"].shape == (4, 3, 32, 32) and whole[0]["mask"].dtype == torch.long

    first = ResumableLoader(data, SegmentationSamples(aug), settings, seed=3)
    iterator = iter(first)
    for _ in range(2):
        next(iterator)
    state = first.state_dict()
    resumed = ResumableLoader(data, SegmentationSamples(aug), LoaderSettings(batch_size=4, num_workers=2,
                                                                             window_shards=2), seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 4
    for expected, got in zip(whole[2:], rest):
        assert expected["key"] == got["key"]
        assert torch.equal(expected["image"], got["image"]) and torch.equal(expected["mask"], got["mask"])
    other_seed = list(ResumableLoader(data, SegmentationSamples(aug), settings, seed=4))
    assert not torch.equal(other_seed[0]["image"], whole[0]["image"])
