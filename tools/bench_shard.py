"""Shard writer throughput against a plain tar of the same files, measured in the same run; prints JSON.

    python tools/bench_shard.py --images 2000 --workers 4

Builds an ImageNet-like tree of synthetic photos (500x375 JPEGs, about ImageNet's average size) in a
temporary folder, reads it once so every contender starts from the page cache, then times:

* ``tarfile``: Python's tarfile writing the same files into one tar (the floor for any Python writer);
* ``tar_command``: ``tar -cf`` of the tree, when the command exists;
* ``kope_original_w1`` / ``_wN``: shard_imagenet's writer keeping original bytes (each image is still
  decoded once, in JPEG draft mode, to catch truncated files), with 1 and N worker processes (the pool's
  time includes starting its processes, so give it enough images);
* ``kope_resize256_w1``: the writer re-encoding with the shorter side at 256 pixels.

Each entry gives images/s, MB/s of source bytes, and its ratio to ``tarfile``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.imagenet_source import plan_split, read_classes
from pipeline.data.images import ImageOptions
from pipeline.data.shard_writer import build_shards, default_workers


def make_tree(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0) -> int:
    """``images`` synthetic photo-like JPEGs in ``train/<wnid>/``; returns their total bytes."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
    total = 0
    for i in range(images):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = base * rng.integers(40, 255, size=3) + rng.normal(0, 18, size=(height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        (folder / f"img_{i:07d}.JPEG").write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def plain_tarfile(root: Path, out: Path) -> None:
    with tarfile.open(out, "w") as archive:
        for path in sorted((root / "train").rglob("*.JPEG")):
            archive.add(path, arcname=str(path.relative_to(root)))


def kope_writer(root: Path, out: Path, workers: int, resize_shorter: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    classes = read_classes(root)
    plan = plan_split(root, "train", classes, seed=0, samples_per_shard=1000,
                      image=ImageOptions(resize_shorter=resize_shorter))
    stats = build_shards(out, plan, workers, logging.getLogger("bench"))
    if sum(shard.count for shard in stats) != len(plan.files):
        raise RuntimeError("the benchmark tree lost samples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=default_workers(0), help="default: one per CPU")
    parser.add_argument("--work-dir", type=Path, help="where to build the tree (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root, out = Path(tmp) / "tree", Path(tmp) / "out"
        total_bytes = make_tree(root, args.images, args.classes, (500, 375))
        for path in root.rglob("*.JPEG"):  # warm the page cache for every contender alike
            path.read_bytes()
        contenders = {"tarfile": lambda: plain_tarfile(root, Path(tmp) / "plain.tar")}
        if shutil.which("tar"):
            contenders["tar_command"] = lambda: subprocess.run(
                ["tar", "-cf", str(Path(tmp) / "cmd.tar"), "-C", str(root), "train"], check=True)
        contenders["kope_original_w1"] = lambda: kope_writer(root, out, 1, 0)
        if args.workers > 1:
            contenders[f"kope_original_w{args.workers}"] = lambda: kope_writer(root, out, args.workers, 0)
        contenders["kope_resize256_w1"] = lambda: kope_writer(root, out, 1, 256)
        seconds = {name: timed(run) for name, run in contenders.items()}
    results = {name: {"seconds": round(s, 3), "images_per_s": round(args.images / s, 1),
                      "mb_per_s": round(total_bytes / s / 1e6, 1), "ratio_vs_tarfile": round(seconds["tarfile"] / s, 3)}
               for name, s in seconds.items()}
    print(json.dumps({"images": args.images, "mean_image_kb": round(total_bytes / args.images / 1e3, 1),
                      "cpus": default_workers(0), "workers": args.workers, "results": results}, indent=2))


if __name__ == "__main__":
    main()
