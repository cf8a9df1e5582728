"""Shard writer throughput against ``tar`` of the same files, measured in the same run, and its curve over
processes; prints JSON.

    python tools/bench_shard.py --images 2000 --workers 1 2 4 8 16

Builds an ImageNet-shaped tree of photo-like JPEGs (400x350 at quality 90, about 90 KB: ImageNet's size and
entropy, :mod:`pipeline.data.rehearsal_data`) in a temporary folder, reads it once so every contender starts
from the page cache, then times:

* ``tar_command``: ``tar -cf`` of the tree (the reference: no decoding, no hashing);
* ``tarfile``: Python's tarfile writing the same files into one tar;
* ``kope_original_wN``: shard_imagenet's writer keeping the original bytes (each image is still decoded once,
  in JPEG draft mode, to refuse truncated and corrupted files; the tar is hashed as it is written and its
  index written beside it) with N processes; the pool's start is included;
* ``kope_resize256_w1``: the writer re-encoding with the shorter side at 256 pixels.

Each entry gives images/s, MB/s of source bytes and its ratio to ``tar_command``; ``curve`` gives each
process count's speed-up over one process and its efficiency (speed-up / processes). ``pool_start_s``: how long
the writer pool takes to run its first call when the parent's main module imported torch, with the project's
light workers and with plain forkserver workers (which import the parent's main module again).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from pipeline.data.imagenet_source import plan_split, read_classes
from pipeline.data.images import ImageOptions
from pipeline.data.rehearsal_data import photo_jpeg
from pipeline.data.shard_writer import build_shards, default_workers

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0) -> int:
    """``images`` photo-like JPEGs in ``train/<wnid>/``; returns their total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(images):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = photo_jpeg(rng, *size)
        (folder / f"img_{i:07d}.JPEG").write_bytes(data)
        total += len(data)
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
    plan = plan_split(root, "train", classes, seed=0, samples_per_shard=100,
                      image=ImageOptions(resize_shorter=resize_shorter))
    stats = build_shards(out, plan, workers, logging.getLogger("bench"))
    if sum(shard.count for shard in stats) != len(plan.files):
        raise RuntimeError("the benchmark tree lost samples")


POOL_PROBE = textwrap.dedent("""
    import json, sys, time
    import torch  # a heavy main module, as a training script or a notebook has
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    from pipeline.data.pool import worker_context
    from pipeline.data.shard_writer import default_workers

    if __name__ == "__main__":
        contexts = {"light": worker_context(), "forkserver": multiprocessing.get_context("forkserver")}
        seconds = {}
        for name, context in contexts.items():
            start = time.perf_counter()
            with ProcessPoolExecutor(2, mp_context=context) as pool:
                list(pool.map(default_workers, [1, 1]))
            seconds[name] = round(time.perf_counter() - start, 3)
        print(json.dumps(seconds))
""")


def pool_start(folder: Path) -> dict[str, float]:
    script = folder / "pool_probe.py"
    script.write_text(POOL_PROBE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="process counts (default: 1 .. CPUs)")
    parser.add_argument("--work-dir", type=Path, help="where to build the tree (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    counts = args.workers or sorted({1, *range(2, default_workers(0) + 1, 2), default_workers(0)})
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root, out = Path(tmp) / "tree", Path(tmp) / "out"
        total_bytes = make_tree(root, args.images, args.classes, (400, 350))
        for path in root.rglob("*.JPEG"):  # warm the page cache for every contender alike
            path.read_bytes()
        contenders = {}
        if shutil.which("tar"):
            contenders["tar_command"] = lambda: subprocess.run(
                ["tar", "-cf", str(Path(tmp) / "cmd.tar"), "-C", str(root), "train"], check=True)
        contenders["tarfile"] = lambda: plain_tarfile(root, Path(tmp) / "plain.tar")
        for count in counts:
            contenders[f"kope_original_w{count}"] = lambda count=count: kope_writer(root, out, count, 0)
        contenders["kope_resize256_w1"] = lambda: kope_writer(root, out, 1, 256)
        seconds = {name: timed(run) for name, run in contenders.items()}
        pool = pool_start(Path(tmp))
    reference = seconds.get("tar_command", seconds["tarfile"])
    results = {name: {"seconds": round(s, 3), "images_per_s": round(args.images / s, 1),
                      "mb_per_s": round(total_bytes / s / 1e6, 1), "ratio_vs_tar": round(reference / s, 3)}
               for name, s in seconds.items()}
    one = seconds["kope_original_w1"]
    curve = {str(count): {"speedup": round(one / seconds[f"kope_original_w{count}"], 2),
                          "efficiency": round(one / seconds[f"kope_original_w{count}"] / count, 2)}
             for count in counts}
    print(json.dumps({"images": args.images, "mean_image_kb": round(total_bytes / args.images / 1e3, 1),
                      "cpus": default_workers(0), "reference": "tar_command" if "tar_command" in seconds else
                      "tarfile", "results": results, "curve": curve, "pool_start_s": pool}, indent=2))


if __name__ == "__main__":
    main()
