"""Check and normalise image bytes before they go into a shard, so readers only ever meet RGB JPEGs.

Bytes that already are a complete RGB JPEG within the limits are kept exactly; they are still decoded once
(in JPEG draft mode, which reads every scan but skips most of the inverse DCT) so a truncated file is caught
here and not in a training run. Anything else is decoded and re-encoded:

* PNG, GIF, WebP and other formats, and CMYK or greyscale JPEGs become RGB JPEGs. The sample is kept and
  counted as *converted* (by what it was converted from: ``png_palette``, ``cmyk``...), not skipped: the
  picture is fine, only its encoding is unusual. Alpha is composited on white, as img2dataset does.
* High bit-depth images are scaled to 8 bits, never clipped (PIL's own conversion clips them at 255, which
  turns a 16-bit greyscale PNG almost white): 16-bit greyscale (``gray16``) by 255/65535; 32-bit integer
  (``int32``) likewise when its values fit 16 bits; 32-bit float (``float32``) from [0, 1] or [0, 255] when
  the values lie in one of them. Anything else (negative, larger) is stretched from its own minimum and
  maximum. PIL already reads 16-bit RGB(A) PNGs as 8-bit by keeping the high byte, which is a scaling.
* An empty file, a file that is not an image, a truncated or undecodable image, and an image with more
  pixels than the limit (a decompression bomb, refused from its header before any decoding) are rejected
  with a reason the caller counts.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.reasons import (
    CORRUPT_IMAGE,
    EMPTY_FILE,
    IMAGE_TOO_SMALL,
    NOT_AN_IMAGE,
    TOO_MANY_PIXELS,
    TRUNCATED_IMAGE,
    UNSUPPORTED_IMAGE,
)

PIL_DEFAULT_MAX_PIXELS = 89_478_485
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
MODE_NAMES = {"L": "grayscale", "1": "bilevel", "P": "palette", "CMYK": "cmyk", "YCbCr": "ycbcr",
              "I": "int32", "F": "float32", **{mode: "gray16" for mode in SIXTEEN_BIT_MODES}}


class BadImage(ValueError):
    """Image bytes that cannot go into a shard; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class ImageOptions:
    """How images are checked and stored; part of a shard's fingerprint."""

    max_pixels: int = PIL_DEFAULT_MAX_PIXELS
    min_size: int = 1
    resize_shorter: int = 0
    quality: int = 90


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    converted_from: str | None


def prepare_image(data: bytes, options: ImageOptions) -> PreparedImage:
    """Return the JPEG bytes to store for ``data``, or raise :class:`BadImage` with the reason."""
    if not data:
        raise BadImage(EMPTY_FILE)
    image = _open(data)
    width, height = image.size
    if width * height > options.max_pixels:
        raise BadImage(TOO_MANY_PIXELS, f"{width}x{height} > {options.max_pixels} pixels")
    if min(width, height) < options.min_size:
        raise BadImage(IMAGE_TOO_SMALL, f"{width}x{height}, shorter side < {options.min_size}")
    converted_from = conversion_source(image)
    target = resized_size(width, height, options.resize_shorter)
    if converted_from is None and target is None:
        image.draft(None, (max(1, width // 8), max(1, height // 8)))
        _load(image)
        return PreparedImage(data, width, height, width, height, None)
    if target is not None:
        image.draft(None, target)
    _load(image)
    try:
        image = to_rgb(image)
        if target is not None and image.size != target:
            image = image.resize(target, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=options.quality)
    except Exception as exc:  # e.g. a pixel mode PIL cannot convert to RGB
        raise BadImage(UNSUPPORTED_IMAGE, f"{image.mode}: {type(exc).__name__}: {exc}") from None
    return PreparedImage(out.getvalue(), image.width, image.height, width, height, converted_from)


def conversion_source(image: Image.Image) -> str | None:
    """What an image is converted from to become an RGB JPEG: its format when that is not JPEG, its pixel mode
    when that is not RGB (``png``, ``png_palette``, ``cmyk``, ``grayscale``...); ``None``: it already is one."""
    parts = [] if image.format == "JPEG" else [(image.format or "unknown").lower()]
    if image.mode != "RGB":
        parts.append(MODE_NAMES.get(image.mode, image.mode.lower()))
    return "_".join(parts) or None


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int] | None:
    """(width, height) with the shorter side at ``shorter``; ``None`` when no downscaling is asked for."""
    if shorter <= 0 or min(width, height) <= shorter:
        return None
    scale = shorter / min(width, height)
    if width <= height:
        return shorter, max(shorter, round(height * scale))
    return max(shorter, round(width * scale)), shorter


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F", *SIXTEEN_BIT_MODES):
        return Image.fromarray(to_8bit(np.asarray(image)), "L").convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def to_8bit(values: np.ndarray) -> np.ndarray:
    """High bit-depth greyscale as uint8, scaled from the range its type implies (see the module docstring)."""
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float32)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if is_float and low >= 0 and high <= 1:
        top = 1.0
    elif is_float and low >= 0 and high <= 255:
        top = 255.0
    elif low >= 0 and high <= 65535:
        top = 65535.0
    else:  # no range to assume: stretch the image's own
        values, top = values - low, max(high - low, 1e-12)
    values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise BadImage(TOO_MANY_PIXELS, str(exc)) from None
        except UnidentifiedImageError:
            raise BadImage(NOT_AN_IMAGE) from None
        except Exception as exc:  # PIL raises many types for a broken header
            raise BadImage(CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}") from None


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except OSError as exc:
        reason = TRUNCATED_IMAGE if "truncated" in str(exc) else CORRUPT_IMAGE
        raise BadImage(reason, str(exc)) from None
    except Exception as exc:
        raise BadImage(CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}") from None
