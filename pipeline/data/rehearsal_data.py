"""Data shaped like the paper's, made on the spot for the scale rehearsal (``configs/pipelines/rehearsal.yaml``).

* ``imagenet/``: an ImageNet-1K-shaped tree: ``train/<wnid>/<wnid>_<n>.JPEG`` for ``classes`` real ImageNet
  classes (wnids and names from timm's ImageNet synsets, spread over the 1,000), ``LOC_synset_mapping.txt``,
  and a *flat* ``val/ILSVRC2012_val_<n>.JPEG`` labelled as the devkit does it: ``ILSVRC2012_validation_ground_
  truth.txt`` (one class id per line, line n for image n) with ``synsets.txt`` (one wnid per line in id order,
  the ids shuffled rather than sorted, as the devkit's are).
* ``datacomp/``: a DataComp-shaped metadata folder (two parquet files with uid, url, text, original sizes and
  CLIP scores; about 2 % of urls point nowhere, as real url lists do) and, in ``images/``, the images the urls
  name relative to it, for ``shard_datacomp``'s ``serve_local``.

Images are photo-like: noise with a natural image's 1/f² power spectrum, sensor noise on top, about 400x350
pixels (varied by up to 15 %) as JPEG quality 90: about 90 KB each, ImageNet's size and entropy, so decoding,
cropping and writing cost what they cost on the real data. Same seed, same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.fsutil import atomic_write_json

DONE_MARKER = ".rehearsal.json"
MISSING_URL_SHARE = 0.02
CAPTIONS = ("a photo of a {}.", "a close-up photo of the {}.", "{} in the wild", "my {} at home",
            "a blurry picture of a {}.", "the {}, seen from the side")


@dataclass(frozen=True)
class RehearsalSpec:
    seed: int = 0
    classes: int = 100
    train_per_class: int = 3
    val_per_class: int = 1
    captioned: int = 200
    width: int = 400
    height: int = 350
    quality: int = 90


def photo_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: three correlated channels of 1/f² noise (a natural image's spectrum) plus noise."""
    from scipy import fft  # single-precision transforms: twice numpy's speed

    fy = np.fft.fftfreq(height).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(width).astype(np.float32)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1.0
    shape = (4, height, width // 2 + 1)
    spectrum = rng.standard_normal(shape, np.float32) + 1j * rng.standard_normal(shape, np.float32)
    spectrum /= frequency
    channels = fft.irfft2(0.6 * spectrum[:1] + 0.4 * spectrum[1:], s=(height, width))
    pixels = (channels - channels.mean()) / (channels.std() + 1e-9)
    pixels = 128 + 48 * pixels.transpose(1, 2, 0) + 6 * rng.standard_normal((height, width, 3), np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def imagenet_classes(count: int) -> list[tuple[str, str]]:
    """``count`` (wnid, name) pairs of ImageNet-1K, evenly spread over its 1,000 classes, in wnid order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids, names = info.label_names(), info.label_descriptions()
    if not 1 <= count <= len(wnids):
        raise ValueError(f"classes must lie in 1..{len(wnids)}, got {count}")
    picked = np.linspace(0, len(wnids) - 1, count).round().astype(int)
    return [(wnids[i], names[i]) for i in picked]


def is_complete(root: Path, spec: RehearsalSpec) -> bool:
    marker = Path(root) / DONE_MARKER
    return marker.exists() and json.loads(marker.read_text(encoding="utf-8")) == asdict(spec)


def make_rehearsal_data(root: Path, spec: RehearsalSpec = RehearsalSpec()) -> Path:
    """Write ``root/imagenet`` and ``root/datacomp``; a no-op when ``root`` already holds this spec's data.
    Everything is built in ``root/.partial`` and moved into place before the marker file is written."""
    root = Path(root)
    if is_complete(root, spec):
        return root
    partial = root / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    classes = imagenet_classes(spec.classes)
    _write_imagenet(partial / "imagenet", classes, spec)
    _write_datacomp(partial / "datacomp", classes, spec)
    for name in ("imagenet", "datacomp"):
        shutil.rmtree(root / name, ignore_errors=True)
        (partial / name).rename(root / name)
    partial.rmdir()
    atomic_write_json(root / DONE_MARKER, asdict(spec))
    return root


def _size(rng: np.random.Generator, spec: RehearsalSpec) -> tuple[int, int]:
    width, height = (round(side * rng.uniform(0.85, 1.15)) for side in (spec.width, spec.height))
    return (width, height) if rng.random() < 0.8 else (height, width)  # some portrait images


def _write_imagenet(root: Path, classes: list[tuple[str, str]], spec: RehearsalSpec) -> None:
    rng = np.random.default_rng([spec.seed, 1])
    for wnid, _ in classes:
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for n in range(spec.train_per_class):
            (folder / f"{wnid}_{n}.JPEG").write_bytes(photo_jpeg(rng, *_size(rng, spec), spec.quality))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid} {name}\n" for wnid, name in classes),
                                                 encoding="utf-8")
    ids = rng.permutation(len(classes)) + 1  # the devkit's class ids follow WordNet, not the sorted wnids
    (root / "synsets.txt").write_text("".join(f"{wnid}\n" for _, (wnid, _) in sorted(zip(ids, classes))),
                                      encoding="utf-8")
    labels = np.repeat(ids, spec.val_per_class)
    rng.shuffle(labels)
    (root / "val").mkdir()
    for number, _ in enumerate(labels, start=1):
        (root / "val" / f"ILSVRC2012_val_{number:08d}.JPEG").write_bytes(
            photo_jpeg(rng, *_size(rng, spec), spec.quality))
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{label}\n" for label in labels))


def _write_datacomp(root: Path, classes: list[tuple[str, str]], spec: RehearsalSpec) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([spec.seed, 2])
    (root / "images").mkdir(parents=True)
    rows: dict[str, list] = {key: [] for key in ("uid", "url", "text", "original_width", "original_height",
                                                 "clip_b32_similarity_score", "clip_l14_similarity_score", "sha256")}
    for n in range(spec.captioned):
        uid = rng.bytes(16).hex()
        _, name = classes[int(rng.integers(len(classes)))]
        width, height = _size(rng, spec)
        if rng.random() < MISSING_URL_SHARE:
            url, digest = f"images/missing-{uid}.jpg", ""
        else:
            data = photo_jpeg(rng, width, height, spec.quality)
            (root / "images" / f"{uid}.jpg").write_bytes(data)
            url, digest = f"images/{uid}.jpg", hashlib.sha256(data).hexdigest()
        caption = CAPTIONS[n % len(CAPTIONS)].format(name.split(",")[0])
        score = float(rng.uniform(0.15, 0.4))
        for key, value in (("uid", uid), ("url", url), ("text", caption), ("original_width", width),
                           ("original_height", height), ("clip_b32_similarity_score", score),
                           ("clip_l14_similarity_score", score * 0.9), ("sha256", digest)):
            rows[key].append(value)
    half = spec.captioned // 2
    for part, rows_slice in enumerate((slice(0, half), slice(half, None))):
        pq.write_table(pa.table({key: values[rows_slice] for key, values in rows.items()}),
                       root / f"{part:08d}.parquet")
