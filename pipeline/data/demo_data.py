"""Deterministic demo data from scikit-learn's bundled handwritten digits (no download).

Each image is two different digits side by side on a 64x64 canvas, in grey ink of random brightness on a
random dark background, with small random changes of size and position. The class is the ordered pair
(left digit, right digit): ``digits * (digits - 1)`` classes (90 with all ten digits) that cannot be told
apart without recognising both digits and their order. Training and validation images use different
writers' handwriting. The same images come as an ImageNet-style tree and as a DataComp-style captioned set
("a 3 left of a 7"), with ``zeroshot_classnames.txt`` phrasing each class the way the captions do, for
zero-shot evaluation. With ``segmentation`` the training and validation images also come in ADE20K's layout
(``segmentation/images/{training,validation}/*.jpg``, ``segmentation/annotations/...*.png``) with masks that
label each pixel by the digit whose ink covers it at least half (digit ``d`` as ``d + 1``, background 0), and
``classes.txt``: a dense task in which the two digits of an image must be told apart.

The nuisances are kept small on purpose: the demo trains tiny ViTs for a few hundred CPU steps, and with
free placement and coloured ink neither the self-supervised nor the CLIP model rose above chance in that
budget (a supervised one barely did).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.fsutil import atomic_write_json

CANVAS = 64
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DONE_MARKER = "demo.json"
GLYPH_SIZES = (26, 30)  # pixels, inclusive
JITTER = 3  # pixels either way from the centre of the digit's half


def _jittered(rng: np.random.Generator, centre: int, size: int) -> int:
    return min(max(centre + int(rng.integers(-JITTER, JITTER + 1)), 0), CANVAS - size)


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 0
    train_per_class: int = 20
    val_per_class: int = 5
    captioned: int = 1000
    jpeg_quality: int = 90
    digits: int = 10
    segmentation: bool = True

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
    """The class in the captions' words (a line of the class-names file)."""
    return f"a {pair[0]} left of a {pair[1]}"


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

    def paint(self, rng: np.random.Generator, pair: tuple[int, int], split: str
              ) -> tuple[Image.Image, str, np.ndarray]:
        """An RGB image of ``pair``, its caption and its mask (uint8: digit d + 1 where its ink covers at least
        half of a pixel, else 0; the mask takes no random draws, so images are the same with or without it)."""
        canvas = np.empty((CANVAS, CANVAS, 3), np.float32)
        labels = np.zeros((CANVAS, CANVAS), np.uint8)
        canvas[:] = rng.integers(0, 70, size=3)
        canvas += rng.normal(0, 6, size=canvas.shape)
        half = CANVAS // 2
        for slot, digit in enumerate(pair):
            size = int(rng.integers(GLYPH_SIZES[0], GLYPH_SIZES[1] + 1))
            glyph = Image.fromarray((self.sample(rng, digit, split) * 255).astype(np.uint8))
            mask = np.asarray(glyph.resize((size, size), Image.BILINEAR), np.float32)[..., None] / 255.0
            x = _jittered(rng, slot * half + (half - size) // 2, size)
            y = _jittered(rng, (CANVAS - size) // 2, size)
            ink = float(rng.integers(170, 256))
            region = canvas[y:y + size, x:x + size]
            region[:] = region * (1 - mask) + ink * mask
            labels[y:y + size, x:x + size][mask[..., 0] >= 0.5] = digit + 1
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
        return image, f"a {pair[0]} left of a {pair[1]}", labels


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _write_imagenet_tree(root: Path, painter: DigitPainter, spec: DemoSpec, segmentation: Path | None) -> None:
    """The ImageNet-style tree under ``root`` and, if ``segmentation`` is given, the same images with their masks
    in ADE20K's layout there."""
    pairs = class_pairs(spec.digits)
    ade_splits = {"train": "training", "val": "validation"}
    for split, per_class, salt in (("train", spec.train_per_class, 1), ("val", spec.val_per_class, 2)):
        rng = np.random.default_rng([spec.seed, salt])
        for index, pair in enumerate(pairs):
            folder = root / split / wnid(pair)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image, _, mask = painter.paint(rng, pair, split)
                stem, data = f"{wnid(pair)}_{index * per_class + i:06d}", _jpeg(image, spec.jpeg_quality)
                (folder / f"{stem}.JPEG").write_bytes(data)
                if segmentation is not None:
                    for kind, suffix, content in (("images", ".jpg", data), ("annotations", ".png", _png(mask))):
                        target = segmentation / kind / ade_splits[split] / f"{stem}{suffix}"
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(content)
    lines = [f"{index}\t{wnid(pair)}\t{class_name(pair)}" for index, pair in enumerate(pairs)]
    (root / "classes.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "zeroshot_classnames.txt").write_text("".join(f"{zeroshot_names(pair)}\n" for pair in pairs),
                                                  encoding="utf-8")
    if segmentation is not None:
        names = ["background", *DIGIT_NAMES[:spec.digits]]
        (segmentation / "classes.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")


def _write_captioned(root: Path, painter: DigitPainter, spec: DemoSpec) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([spec.seed, 3])
    pairs = class_pairs(spec.digits)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"uid": [], "url": [], "text": [], "original_width": [], "original_height": []}
    for _ in range(spec.captioned):
        pair = pairs[int(rng.integers(len(pairs)))]
        image, caption, _ = painter.paint(rng, pair, "train")
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
    """Write ``root/imagenet``, ``root/datacomp`` (and ``root/segmentation``); a no-op when ``root`` already
    holds this spec's data.

    Everything is built in ``root/.partial`` and moved into place before the marker file is written, so
    an interrupted run leaves nothing that looks finished.
    """
    root = Path(root)
    if is_complete(root, spec):
        return root
    partial = root / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    painter = DigitPainter()
    segmentation = partial / "segmentation" if spec.segmentation else None
    _write_imagenet_tree(partial / "imagenet", painter, spec, segmentation)
    _write_captioned(partial / "datacomp", painter, spec)
    for name in ("imagenet", "datacomp", "segmentation"):
        shutil.rmtree(root / name, ignore_errors=True)
        if (partial / name).exists():
            (partial / name).rename(root / name)
    partial.rmdir()
    atomic_write_json(root / DONE_MARKER, asdict(spec))
    return root
