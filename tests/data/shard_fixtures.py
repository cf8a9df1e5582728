"""Real image bytes of every kind the sharding stages must handle, and small source trees built from them."""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.core.stage import StageContext


def picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth gradient with noise: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.integers(60, 255, size=3)
    pixels = ramp + np.linspace(0, 1, height)[:, None, None] * 40 + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(picture(seed, size), quality=90)


def truncated_jpeg(seed: int) -> bytes:
    data = jpeg(seed)
    return data[: int(len(data) * 0.6)]


def corrupt_jpeg(seed: int) -> bytes:
    """A JPEG whose headers are intact but whose scan data is garbage."""
    data = jpeg(seed)
    start = data.find(b"\xff\xda") + 14
    return data[:start] + np.random.default_rng(seed).bytes(len(data) - start)


def bomb_jpeg(seed: int, side: int = 40_000) -> bytes:
    """A small JPEG whose header claims ``side`` x ``side`` pixels: a decompression bomb."""
    data = bytearray(jpeg(seed))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(data)


def png(seed: int) -> bytes:
    return encode(picture(seed), "PNG")


def cmyk_jpeg(seed: int) -> bytes:
    return encode(picture(seed).convert("CMYK"), quality=90)


def grey_jpeg(seed: int) -> bytes:
    return encode(picture(seed).convert("L"), quality=90)


def palette_png(seed: int) -> bytes:
    return encode(picture(seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG")


def rgba_png(seed: int) -> bytes:
    image = picture(seed).convert("RGBA")
    image.putalpha(128)
    return encode(image, "PNG")


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count) written by hand: PIL cannot write the
    colour ones."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


GOOD = "good"
# planted bad file -> (bytes maker, the reason it is skipped for, or the name it is converted from)
SKIPPED_FILES = {
    "truncated": (truncated_jpeg, "truncated_image"),
    "corrupt": (corrupt_jpeg, "corrupt_image"),
    "empty": (lambda seed: b"", "empty_file"),
    "text": (lambda seed: b"this is not an image\n" * 3, "not_an_image"),
    "bomb": (bomb_jpeg, "too_many_pixels"),
}
CONVERTED_FILES = {
    "png": (png, "png"),
    "cmyk": (cmyk_jpeg, "cmyk"),
    "grey": (grey_jpeg, "grayscale"),
    "palette": (palette_png, "png_palette"),
    "rgba": (rgba_png, "png_rgba"),
}


def make_imagenet_tree(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 3,
                       plant: int = 1, size: tuple[int, int] = (48, 40)) -> dict[str, dict]:
    """``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``, ``classes.tsv``; with ``plant`` > 0, that many files of
    every bad and convertible kind in train, files outside any class folder and a val folder of an unknown
    class.

    Returns, per split, {relative path: expected outcome} where the outcome is ("kept", wnid, converted_from)
    or ("skipped", reason).
    """
    wnids = [f"n{1000 + i:08d}" for i in range(classes)]
    expected: dict[str, dict] = {"train": {}, "val": {}}
    seed = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for wnid in wnids:
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                seed += 1
                (folder / f"{wnid}_{i:05d}.JPEG").write_bytes(jpeg(seed, size))
                expected[split][f"{split}/{wnid}/{wnid}_{i:05d}.JPEG"] = ("kept", wnid, None)
    (root / "classes.tsv").write_text("".join(f"{i}\t{w}\tclass {i}\n" for i, w in enumerate(wnids)))
    if not plant:
        return expected
    (root / "val" / "n99999999").mkdir(parents=True)
    (root / "train" / wnids[0] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    for copy in range(plant):
        for number, (kind, (maker, reason)) in enumerate(SKIPPED_FILES.items()):
            path = f"train/{wnids[(number + copy) % classes]}/{kind}_{copy}.JPEG"
            (root / path).write_bytes(maker(100 + number + 10 * copy))
            expected["train"][path] = ("skipped", reason)
        for number, (kind, (maker, source)) in enumerate(CONVERTED_FILES.items()):
            wnid = wnids[(number + copy) % classes]
            path = f"train/{wnid}/{kind}_{copy}.JPEG"
            (root / path).write_bytes(maker(200 + number + 10 * copy))
            expected["train"][path] = ("kept", wnid, source)
        (root / "train" / f"stray_{copy}.JPEG").write_bytes(jpeg(300 + copy))
        expected["train"][f"train/stray_{copy}.JPEG"] = ("skipped", "missing_label")
        (root / "val" / "n99999999" / f"x_{copy}.JPEG").write_bytes(jpeg(301 + copy))
        expected["val"][f"val/n99999999/x_{copy}.JPEG"] = ("skipped", "unknown_class")
    return expected


def stage_context(tmp_path: Path, name: str, stage_dirs: dict[str, Path] | None = None) -> StageContext:
    run_dir = tmp_path / "run"
    return StageContext(name=name, run_dir=run_dir, out_dir=run_dir / name, seed=0, log=logging.getLogger(name),
                        stage_dirs=stage_dirs or {})


def read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as archive:
        return [(member, archive.extractfile(member).read()) for member in archive]


def write_img2dataset_shard(folder: Path, index: int, rows: list[dict], with_parquet: bool = True) -> None:
    """An input shard in img2dataset's layout. Each row: key, status, error_message, uid, caption, any other
    json fields, and for successes ``image`` (bytes) and optionally ``txt`` (raw caption bytes, default the
    caption's UTF-8)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{index:05d}"
    with tarfile.open(folder / f"{name}.tar", "w") as archive:
        for row in rows:
            if row["status"] != "success":
                continue
            meta = {k: v for k, v in row.items() if k not in ("image", "txt")}
            members = {"jpg": row.get("image"), "txt": row.get("txt", (row.get("caption") or "").encode()),
                       "json": json.dumps(meta).encode()}
            for ext, data in members.items():
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{row['key']}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    if with_parquet:
        columns = ("key", "status", "error_message", "uid", "caption", "url", "width", "height",
                   "original_width", "original_height")
        table = pa.table({c: [row.get(c) for row in rows] for c in columns})
        pq.write_table(table, folder / f"{name}.parquet")
