"""Benchmark the loaders: decode + augment images/s per worker for each mode, against bare PIL decoding of the
same JPEG bytes in the same run, plus PIL draft mode, torchvision's decode_jpeg (CPU, and CUDA when present)
and the whole resumable loader with N workers, as training reads it (``stream()``: one set of workers for every
epoch, pinned batches where CUDA is), for float and for uint8 batches. Prints one JSON object.

Per-worker figures run in this process with one thread, as a DataLoader worker does, and count CPU time, so
they stand for one dedicated core even on a busy machine; the loader run counts wall time. Without ``--dataset``
the images are synthetic (smooth colour fields with noise, ImageNet-like size and JPEG size); pass a
dataset made by ``shard_imagenet`` for real figures.

    python tools/bench_loader.py --images 200 --workers 2
    python tools/bench_loader.py --dataset runs/demo/shard_imagenet/train --seconds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from pipeline.data.loaders import LoaderSettings, ResumableLoader
from pipeline.data.loaders_samples import clip_samples, dino_samples, supervised_samples
from pipeline.data.loaders_tar import ShardReader
from pipeline.data.manifest import ClassInfo, Manifest, ShardInfo, shard_name
from pipeline.data.transforms import ClipAugSettings, DinoAugSettings, SupervisedAugSettings, decode_image


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    low = rng.integers(0, 256, size=(18, 24, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noisy = (smooth + rng.normal(0, 16, smooth.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_synthetic_dataset(root: Path, images: int, width: int, height: int, quality: int) -> Path:
    """A one-shard classification dataset with captions-free samples: enough for every mode but CLIP's text."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for index in range(images):
            for ext, data in [("jpg", synthetic_jpeg(rng, width, height, quality)),
                              ("cls", str(index % 10).encode()), ("txt", f"synthetic image {index}".encode())]:
                info = tarfile.TarInfo(f"{index:09d}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    (root / shard_name(0)).write_bytes(data)
    shard = ShardInfo(shard_name(0), images, len(data), hashlib.sha256(data).hexdigest())
    classes = [ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(10)]
    Manifest(name="bench", kind="classification", shards=[shard], classes=classes).save(root)
    return root


def load_members(dataset: Path, limit: int) -> list[dict[str, bytes]]:
    manifest = Manifest.load(dataset)
    members = []
    for path, info in zip(manifest.shard_paths(dataset), manifest.shards):
        reader = ShardReader(path, info.samples)
        extensions = tuple(e for e in ("jpg", "cls", "txt") if e in reader.index.extensions)
        members += [reader.read(i, extensions) for i in range(min(info.samples, limit - len(members)))]
        reader.close()
        if len(members) >= limit:
            break
    return members


def rate(work: Callable[[bytes], object], items: list, seconds: float) -> float:
    """Items per CPU-second of this process over whole passes through ``items``, for at least ``seconds``
    of CPU time: what one dedicated core does, even on a machine shared with other jobs."""
    work(items[0])
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for item in items:
            work(item)
        done += len(items)
    return done / (time.process_time() - start)


def cuda_decode_rate(jpegs: list[bytes], seconds: float) -> float | None:
    """Batched GPU decoding, images per wall-clock second."""
    if not torch.cuda.is_available():
        return None
    tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    torchvision.io.decode_jpeg(tensors[:2], device="cuda")
    torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torchvision.io.decode_jpeg(tensors, device="cuda")
        torch.cuda.synchronize()
        done += len(tensors)
    return done / (time.perf_counter() - start)


def loader_rate(dataset: Path, samples, workers: int, batch: int, seconds: float) -> float:
    """The whole resumable loader's stream: images per wall-clock second with workers, per CPU-second without
    (then it includes tar reads, per-sample seeding and collation, to compare with the bare pipeline)."""
    clock = time.perf_counter if workers else time.process_time
    settings = LoaderSettings(batch_size=batch, num_workers=workers, window_shards=4)
    batches = ResumableLoader(dataset, samples, settings).stream()
    next(batches)
    done, start = 0, clock()
    while clock() - start < seconds:
        done += len(next(batches)["key"])
    return done / (clock() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="a shard folder with manifest.json (default: synthetic)")
    parser.add_argument("--images", type=int, default=200, help="distinct images to cycle through")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--size", type=int, default=224, help="training crop size")
    parser.add_argument("--local-crops", type=int, default=10, help="DINO local crops")
    parser.add_argument("--draft", type=int, default=0, help="draft size for the *_draft runs (default: --size)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers for the loader run")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    draft = args.draft or args.size

    with tempfile.TemporaryDirectory() as scratch:
        dataset = args.dataset or write_synthetic_dataset(Path(scratch), args.images, args.width, args.height,
                                                          args.quality)
        members = load_members(dataset, args.images)
        jpegs = [m["jpg"] for m in members]
        rng = np.random.default_rng(0)
        supervised = SupervisedAugSettings(image_size=args.size)
        dino = DinoAugSettings(global_size=args.size, local_crops=args.local_crops)
        pipelines = {
            "supervised_train": supervised_samples(supervised),
            "supervised_train_draft": supervised_samples(supervised, draft_size=draft),
            "supervised_train_uint8": supervised_samples(
                SupervisedAugSettings(image_size=args.size, uint8_images=True)),
            "supervised_eval": supervised_samples(supervised, train=False),
            "dino": dino_samples(dino),
            "dino_draft": dino_samples(dino, draft_size=draft),
            "dino_uint8": dino_samples(dataclasses.replace(dino, uint8_images=True)),
        }
        if all("txt" in m for m in members):
            pipelines["clip"] = clip_samples(ClipAugSettings(image_size=args.size))

        pil = rate(lambda j: decode_image(j), jpegs, args.seconds)
        decode = {
            "pil": pil,
            "pil_draft": rate(lambda j: decode_image(j, draft), jpegs, args.seconds),
            "torchvision_cpu": rate(
                lambda j: torchvision.io.decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)),
                jpegs, args.seconds),
        }
        cuda = cuda_decode_rate(jpegs, args.seconds)
        modes = {name: rate(lambda m, p=p: p.make("k", m, rng), members, args.seconds)
                 for name, p in pipelines.items()}
        workers = max(args.workers, 1)
        in_process = loader_rate(dataset, pipelines["supervised_train"], 0, args.batch, args.seconds)
        loader = loader_rate(dataset, pipelines["supervised_train"], workers, args.batch, args.seconds)
        loader_uint8 = loader_rate(dataset, pipelines["supervised_train_uint8"], workers, args.batch, args.seconds)

    sizes = [len(j) for j in jpegs]
    first = Image.open(io.BytesIO(jpegs[0]))
    report = {
        "images": len(jpegs), "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1024, 1),
        "first_image_size": list(first.size), "crop": args.size, "draft": draft,
        "cpu": os.cpu_count(), "torch_threads_per_worker": torch.get_num_threads(),
        "decode_images_per_cpu_s": {k: round(v, 1) for k, v in decode.items()},
        "decode_vs_pil": {k: round(v / pil, 3) for k, v in decode.items()},
        "torchvision_cuda_decode_images_per_s": None if cuda is None else round(cuda, 1),
        "per_worker_images_per_cpu_s": {k: round(v, 1) for k, v in modes.items()},
        "per_worker_vs_pil_decode": {k: round(v / pil, 3) for k, v in modes.items()},
        "loader_supervised_train": {
            "in_process_images_per_cpu_s": round(in_process, 1),
            "in_process_vs_bare_pipeline": round(in_process / modes["supervised_train"], 3),
            "workers": workers, "batch": args.batch, "images_per_s": round(loader, 1),
            "per_worker": round(loader / workers, 1),
        },
        "loader_supervised_train_uint8": {
            "workers": workers, "batch": args.batch, "images_per_s": round(loader_uint8, 1),
            "per_worker": round(loader_uint8 / workers, 1), "vs_float": round(loader_uint8 / loader, 3),
        },
        "estimate_16_workers_supervised": {
            k: round(16 * modes[k])
            for k in ("supervised_train", "supervised_train_draft", "supervised_train_uint8")
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
