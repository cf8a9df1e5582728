"""Deterministic demo data from scikit-learn's bundled handwritten digits (no download).

Each image is two different digits on a 64x64 canvas, side by side or stacked, with random sizes,
positions and colours. The class is the ordered pair (first digit in reading order, second digit):
``digits * (digits - 1)`` classes (90 with all ten digits) that cannot be told apart without recognising
both digits and their order. Training and validation images use different writers' handwriting. The same
images come as an ImageNet-style tree and as a DataComp-style captioned set ("a 3 left of a 7": the colours
are left out, so that a CLIP model must read the digits), with ``zeroshot_classnames.txt`` phrasing each
class the way the captions do, for zero-shot evaluation.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.fsutil import atomic_write_json

CANVAS = 64
COLOURS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "orange": (250, 140, 20), "purple": (170, 60, 220), "cyan": (40, 220, 230), "white": (245, 245, 245),
}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DONE_MARKER = "demo.json"


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 0
    train_per_class: int = 20
    val_per_class: int = 5
    captioned: int = 1000
    jpeg_quality: int = 90
    digits: int = 10

    def __post_init__(self) -> None:
        if not 2 <= self.digits <= 10:
            raise ValueError(f"demo data: digits must be between 2 and 10, got {self.digits}")


def class_pairs(digits: int = 10) -> list[tuple[int, int]]:
    """The ordered pairs of different digits below ``digits``; the list index is the class index."""
    return [(a, b) for a in range(digits) for b in range(digits) if a != b]


def wnid(pair: tuple[int, int]) -> str:
    return f"n{10 * pair[0] + pair[1]:08d}"


def class_name(pair: tuple[int, int]) -> str:
    return f"{DIGIT_NAMES[pair[0]]} then {DIGIT_NAMES[pair[1]]}"


def zeroshot_names(pair: tuple[int, int]) -> str:
    """The class in the captions' words, both layouts as synonyms (the class-names file format)."""
    return f"a {pair[0]} left of a {pair[1]} | a {pair[0]} above a {pair[1]}"


class DigitPainter:
    """Draws two-digit images from the digits data, keeping train and val handwriting apart."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = digits.images.astype(np.float32) / 16.0
        self.by_digit = {d: np.flatnonzero(digits.target == d) for d in range(10)}

    def sample(self, rng: np.random.Generator, digit: int, split: str) -> np.ndarray:
        pool = self.by_digit[digit]
        half = len(pool) // 2
        pool = pool[:half] if split == "train" else pool[half:]
        return self.images[rng.choice(pool)]

    def paint(self, rng: np.random.Generator, pair: tuple[int, int], split: str) -> tuple[Image.Image, str]:
        """An RGB image of ``pair`` and its caption."""
        background = rng.integers(0, 70, size=3)
        canvas = np.empty((CANVAS, CANVAS, 3), np.float32)
        canvas[:] = background
        canvas += rng.normal(0, 6, size=canvas.shape)
        stacked = bool(rng.integers(0, 2))
        names = list(COLOURS)
        colour_ids = rng.choice(len(names), size=2, replace=False)
        half = CANVAS // 2
        for slot, (digit, colour_id) in enumerate(zip(pair, colour_ids)):
            size = int(rng.integers(18, 31))
            glyph = Image.fromarray((self.sample(rng, digit, split) * 255).astype(np.uint8))
            mask = np.asarray(glyph.resize((size, size), Image.BILINEAR), np.float32)[..., None] / 255.0
            along = int(rng.integers(0, half - size + 1)) + slot * half if size <= half else slot * (CANVAS - size)
            across = int(rng.integers(0, CANVAS - size + 1))
            y, x = (along, across) if stacked else (across, along)
            region = canvas[y:y + size, x:x + size]
            region[:] = region * (1 - mask) + np.asarray(COLOURS[names[colour_id]], np.float32) * mask
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
        relation = "above" if stacked else "left of"
        caption = f"a {pair[0]} {relation} a {pair[1]}"
        return image, caption


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_imagenet_tree(root: Path, painter: DigitPainter, spec: DemoSpec) -> None:
    pairs = class_pairs(spec.digits)
    for split, per_class, salt in (("train", spec.train_per_class, 1), ("val", spec.val_per_class, 2)):
        rng = np.random.default_rng([spec.seed, salt])
        for index, pair in enumerate(pairs):
            folder = root / split / wnid(pair)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image, _ = painter.paint(rng, pair, split)
                (folder / f"{wnid(pair)}_{index * per_class + i:06d}.JPEG").write_bytes(_jpeg(image, spec.jpeg_quality))
    lines = [f"{index}\t{wnid(pair)}\t{class_name(pair)}" for index, pair in enumerate(pairs)]
    (root / "classes.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "zeroshot_classnames.txt").write_text("".join(f"{zeroshot_names(pair)}\n" for pair in pairs),
                                                  encoding="utf-8")


def _write_captioned(root: Path, painter: DigitPainter, spec: DemoSpec) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([spec.seed, 3])
    pairs = class_pairs(spec.digits)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"uid": [], "url": [], "text": [], "original_width": [], "original_height": []}
    for _ in range(spec.captioned):
        pair = pairs[int(rng.integers(len(pairs)))]
        image, caption = painter.paint(rng, pair, "train")
        uid = rng.bytes(16).hex()
        (root / "images" / f"{uid}.jpg").write_bytes(_jpeg(image, spec.jpeg_quality))
        for key, value in (("uid", uid), ("url", f"images/{uid}.jpg"), ("text", caption),
                           ("original_width", CANVAS), ("original_height", CANVAS)):
            rows[key].append(value)
    pq.write_table(pa.table(rows), root / "metadata.parquet")


def is_complete(root: Path, spec: DemoSpec) -> bool:
    marker = Path(root) / DONE_MARKER
    return marker.exists() and json.loads(marker.read_text(encoding="utf-8")) == asdict(spec)


def make_demo_data(root: Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write ``root/imagenet`` and ``root/datacomp``; a no-op when ``root`` already holds this spec's data.

    Everything is built in ``root/.partial`` and moved into place before the marker file is written, so
    an interrupted run leaves nothing that looks finished.
    """
    root = Path(root)
    if is_complete(root, spec):
        return root
    partial = root / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    painter = DigitPainter()
    _write_imagenet_tree(partial / "imagenet", painter, spec)
    _write_captioned(partial / "datacomp", painter, spec)
    for name in ("imagenet", "datacomp"):
        shutil.rmtree(root / name, ignore_errors=True)
        (partial / name).rename(root / name)
    partial.rmdir()
    atomic_write_json(root / DONE_MARKER, asdict(spec))
    return root
