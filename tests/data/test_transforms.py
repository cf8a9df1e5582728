"""Transforms of the three modes: shapes, dtypes, what each augmentation visibly does, masks, Mixup targets."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import (
    ClipAugSettings,
    DinoAugSettings,
    DinoMultiCrop,
    ImageNormalizer,
    SupervisedAugSettings,
    block_mask,
    clip_image_transform,
    clip_normalizer,
    clip_tokenizer,
    decode_image,
    eval_transform,
    make_mixup,
    supervised_eval_transform,
    supervised_train_transform,
)


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def colourful(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    blocks = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.BILINEAR)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_decode_gives_rgb_from_any_mode_and_draft_decodes_smaller():
    assert decode_image(encode(Image.new("L", (20, 10), 128))).mode == "RGB"
    assert decode_image(encode(Image.new("P", (20, 10)), "PNG")).mode == "RGB"
    data = encode(colourful(400, 300))
    assert decode_image(data).size == (400, 300)
    assert decode_image(data, draft_size=100).size == (200, 150), "1/4 would make the height 75 < 100"
    assert decode_image(data, draft_size=40).size == (100, 75), "1/8 would make the height 38 < 40"
    assert decode_image(data, draft_size=37).size == (50, 38)


def test_supervised_train_transform_shape_and_randomness():
    aug = SupervisedAugSettings(image_size=32)
    transform = supervised_train_transform(aug)
    image = colourful()
    seed_all(0)
    first = transform(image)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    seed_all(0)
    assert torch.equal(transform(image), first), "seeded generators reproduce the augmentation"
    assert not torch.equal(transform(image), first)


@pytest.mark.parametrize("train", [True, False])
def test_uint8_images_normalised_later_equal_the_float_transform(train):
    image = colourful()
    outputs = {}
    for uint8 in (False, True):
        aug = SupervisedAugSettings(image_size=24, uint8_images=uint8)
        transform = supervised_train_transform(aug) if train else supervised_eval_transform(aug)
        seed_all(2)
        outputs[uint8] = transform(image)
    assert outputs[True].dtype == torch.uint8 and outputs[True].shape == (3, 24, 24)
    normalised = ImageNormalizer(aug.mean, aug.std)(outputs[True][None])[0]
    assert normalised.dtype == torch.float32 and torch.allclose(normalised, outputs[False], atol=1e-5)
    with pytest.raises(ValueError, match="expected uint8 images"):
        ImageNormalizer(aug.mean, aug.std)(outputs[False][None])


def unnormalise(tensor: torch.Tensor, aug: SupervisedAugSettings) -> torch.Tensor:
    return tensor * torch.tensor(aug.std).view(3, 1, 1) + torch.tensor(aug.mean).view(3, 1, 1)


def is_grey(tensor: torch.Tensor) -> bool:
    return bool((tensor.max(0).values - tensor.min(0).values).max() < 0.02)


def test_three_augment_turns_some_images_grey_and_without_it_none():
    image = colourful()
    for three_augment, expect_grey in [(True, True), (False, False)]:
        aug = SupervisedAugSettings(image_size=24, three_augment=three_augment, color_jitter=0.0)
        transform = supervised_train_transform(aug)
        seed_all(1)
        greys = sum(is_grey(unnormalise(transform(image), aug)) for _ in range(30))
        assert (greys >= 3) if expect_grey else (greys == 0), greys


def test_eval_transform_centre_crop_ratio():
    """A square image, green inside its central half, red outside: crop 1.0 sees both, 0.5 only green."""
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[16:48, 16:48] = (0, 255, 0)
    image = Image.fromarray(pixels)
    whole = eval_transform(32, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))(image)
    centre = eval_transform(32, crop_pct=0.5, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert whole.shape == centre.shape == (3, 32, 32)
    assert whole[0, 0, 0] > 0.9 and whole[1, 16, 16] > 0.9
    assert centre[0].max() < 0.1 and centre[1].min() > 0.9
    assert supervised_eval_transform(SupervisedAugSettings(image_size=40))(colourful()).shape == (3, 40, 40)


def test_mixup_mixes_images_and_targets_sum_to_one():
    aug = SupervisedAugSettings(label_smoothing=0.1)
    mixup = make_mixup(aug, num_classes=5)
    images = torch.rand(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    np.random.seed(0)
    mixed, targets = mixup(images.clone(), labels)
    assert targets.shape == (8, 5)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets > 0.1).sum(1).max() >= 2, "a target mixes two labels"
    assert not torch.equal(mixed, images)
    assert make_mixup(SupervisedAugSettings(mixup_alpha=0, cutmix_alpha=0), 5) is None


def test_dino_multicrop_shapes_and_masks():
    aug = DinoAugSettings(global_size=32, local_size=16, local_crops=3, patch_size=8, mask_prob=1.0)
    seed_all(0)
    out = DinoMultiCrop(aug)(colourful(), np.random.default_rng(0))
    assert [c.shape for c in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(m.dtype == torch.bool and m.shape == (16,) and m.any() for m in out["masks"])
    assert not torch.equal(out["global_crops"][0], out["global_crops"][1])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DinoMultiCrop(DinoAugSettings(global_size=30, patch_size=8))


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_dino_crops_flip_only_as_configured(hflip):
    """Bright left half, dark right half: jitter, grayscale and blur keep the order, a flip swaps it."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = 230
    aug = DinoAugSettings(global_size=32, local_size=16, local_crops=2, patch_size=8, hflip=hflip,
                          global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    crop = DinoMultiCrop(aug)
    seed_all(0)
    for _ in range(10):
        out = crop(Image.fromarray(pixels), np.random.default_rng(0))
        for view in [out["global_crops"][0], *out["local_crops"]]:
            half = view.shape[-1] // 2
            left_brighter = bool(view[..., :half].mean() > view[..., half:].mean())
            assert left_brighter == (hflip == 0.0)


def test_dino_masks_about_half_the_crops_within_the_ratio():
    crop = DinoMultiCrop(DinoAugSettings(global_size=224, patch_size=16))
    rng = np.random.default_rng(3)
    masks = [m for _ in range(100) for m in crop.masks(rng)]
    assert all(m.shape == (196,) and m.dtype == torch.bool for m in masks)
    ratios = [float(m.float().mean()) for m in masks if m.any()]
    assert 80 <= len(ratios) <= 120, "mask_prob 0.5 of 200 global crops"
    assert max(ratios) <= 0.5 and min(ratios) > 0.0
    assert 0.2 < np.mean(ratios) <= 0.3, "targets average 0.3; blocks may stop a little short"


def test_block_mask_never_exceeds_its_target_and_is_blocky():
    rng = np.random.default_rng(0)
    for target in (5, 20, 60, 98):
        mask = block_mask((14, 14), target, rng, max_block=98)
        assert 0 < mask.sum() <= target
        rows = mask.any(1).sum()
        assert rows < mask.sum(), "patches come in rectangles, not scattered"


def test_clip_transform_and_tokenizer():
    aug = ClipAugSettings(image_size=32, context_length=12)
    assert clip_image_transform(aug, train=True)(colourful()).shape == (3, 32, 32)
    assert clip_image_transform(aug, train=False)(colourful(50, 30)).shape == (3, 32, 32)
    tokens = clip_tokenizer(aug)(["a photo of a café", "dog"])
    assert tokens.shape == (2, 12) and tokens.dtype == torch.long
    assert (tokens[0] != 0).sum() > (tokens[1] != 0).sum()


@pytest.mark.parametrize("train", [True, False])
def test_clip_uint8_images_normalised_later_equal_open_clips_transform(train):
    outputs = {}
    for uint8 in (False, True):
        aug = ClipAugSettings(image_size=32, uint8_images=uint8)
        seed_all(4)
        outputs[uint8] = clip_image_transform(aug, train=train)(colourful())
    assert outputs[True].dtype == torch.uint8 and outputs[True].shape == (3, 32, 32)
    torch.testing.assert_close(clip_normalizer(aug)(outputs[True][None])[0], outputs[False], rtol=1e-5, atol=1e-5)
