"""Image checks and conversions: every bad kind gets its reason, every odd encoding becomes an RGB JPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import BadImage, ImageOptions, prepare_image
from tests.data.shard_fixtures import CONVERTED_FILES, SKIPPED_FILES, jpeg, picture


@pytest.mark.parametrize("kind", sorted(SKIPPED_FILES))
def test_bad_bytes_are_rejected_with_their_reason(kind):
    maker, reason = SKIPPED_FILES[kind]
    with pytest.raises(BadImage) as caught:
        prepare_image(maker(7), ImageOptions())
    assert caught.value.reason == reason


@pytest.mark.parametrize("kind", sorted(CONVERTED_FILES))
def test_odd_encodings_become_rgb_jpegs(kind):
    maker, source = CONVERTED_FILES[kind]
    original = Image.open(io.BytesIO(maker(3)))
    result = prepare_image(maker(3), ImageOptions())
    assert result.converted_from == source
    stored = Image.open(io.BytesIO(result.data))
    assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", original.size)
    reference = np.asarray(picture(3).convert("RGB"), np.float32)
    if kind == "grey":
        reference = np.repeat(np.asarray(picture(3).convert("L"), np.float32)[..., None], 3, axis=2)
    if kind == "rgba":  # half-transparent over white
        reference = reference * (128 / 255) + 255 * (1 - 128 / 255)
    assert np.abs(np.asarray(stored, np.float32) - reference).mean() < 12


def test_rgb_jpeg_bytes_are_kept_exactly():
    data = jpeg(5, (64, 48))
    result = prepare_image(data, ImageOptions(resize_shorter=64))
    assert result.data == data and result.converted_from is None
    assert (result.width, result.height) == (64, 48)


def test_resize_sets_the_shorter_side_and_keeps_the_aspect_ratio():
    data = jpeg(5, (400, 300))
    result = prepare_image(data, ImageOptions(resize_shorter=120, quality=85))
    stored = Image.open(io.BytesIO(result.data))
    assert stored.size == (160, 120) == (result.width, result.height)
    assert (result.original_width, result.original_height) == (400, 300)
    expected = np.asarray(picture(5, (400, 300)).resize((160, 120), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(np.asarray(stored, np.float32) - expected).mean() < 8
    portrait = prepare_image(jpeg(6, (300, 500)), ImageOptions(resize_shorter=120))
    assert (portrait.width, portrait.height) == (120, 200)


def test_pixel_limit_and_minimum_size_are_enforced():
    data = jpeg(1, (100, 80))
    with pytest.raises(BadImage, match="too_many_pixels"):
        prepare_image(data, ImageOptions(max_pixels=100 * 80 - 1))
    assert prepare_image(data, ImageOptions(max_pixels=100 * 80)).width == 100
    with pytest.raises(BadImage, match="image_too_small"):
        prepare_image(data, ImageOptions(min_size=81))
