"""Image checks and conversions: every bad kind gets its reason, every odd encoding becomes an RGB JPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import BadImage, ImageOptions, prepare_image
from tests.data.shard_fixtures import CONVERTED_FILES, SKIPPED_FILES, encode, jpeg, picture, png16


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


def ramp(top: float, dtype: str, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    return np.linspace(0, top, size[0] * size[1]).reshape(size).astype(dtype)


GREY16 = ramp(65535, "uint16")
RGB16 = np.stack([GREY16, GREY16[::-1], GREY16[:, ::-1]], axis=2)
# name -> (bytes, what it is converted from, the 8-bit picture expected)
HIGH_DEPTH = {
    "png_gray16": (png16(GREY16), "png_gray16", GREY16 / 257),
    "png_rgb16": (png16(RGB16), "png", RGB16 / 257),
    "png_rgba16": (png16(np.concatenate([RGB16, np.full_like(GREY16, 65535)[..., None]], axis=2)), "png_rgba",
                   RGB16 / 257),
    "tiff_gray16": (encode(Image.fromarray(GREY16), "TIFF"), "tiff_gray16", GREY16 / 257),
    "tiff_float_unit": (encode(Image.fromarray(ramp(1.0, "float32"), "F"), "TIFF"), "tiff_float32",
                        ramp(255.0, "float32")),
    "tiff_float_255": (encode(Image.fromarray(ramp(200.0, "float32"), "F"), "TIFF"), "tiff_float32",
                       ramp(200.0, "float32")),
    "tiff_int32_wide": (encode(Image.fromarray(ramp(1e6, "int32") - 500_000, "I"), "TIFF"), "tiff_int32",
                        ramp(255.0, "float32")),  # no range to assume: its own minimum..maximum
}


@pytest.mark.parametrize("kind", sorted(HIGH_DEPTH))
def test_high_bit_depth_images_are_scaled_not_clipped(kind):
    data, source, expected = HIGH_DEPTH[kind]
    result = prepare_image(data, ImageOptions())
    assert result.converted_from == source
    stored = np.asarray(Image.open(io.BytesIO(result.data)), np.float32)
    if expected.ndim == 2:
        expected = np.repeat(expected[..., None], 3, axis=2)
    assert stored.shape == expected.shape
    assert np.abs(stored - expected).mean() < 2.5
