"""Benchmark the loaders against a plain PIL RandomResizedCrop recipe measured in the same run; prints one JSON.

The loader runs as training reads it (``stream()``: one set of workers for every epoch, pinned batches where
CUDA is), for float and for uint8 batches.

Per worker (this process, one thread, CPU time: what one dedicated core does, even on a busy machine):

* ``decode``: PIL's full decode, its draft mode, torchvision's decode_jpeg (and CUDA's when present);
* ``plain_recipe``: PIL decode, torchvision RandomResizedCrop(224, bicubic), flip, ToTensor, Normalize;
* every mode's sample pipeline (supervised DeiT-III, eval, DINO multi-crop, CLIP);
* ``supervised_breakdown``: where the supervised pipeline's time per image goes, each step alone on the same
  images: decode, the crop with its bicubic resize, 3-Augment, colour jitter, float32 conversion and
  normalisation, the loader's per-sample seeding, the tar read, and float32 against uint8 collation.

The whole loader (``loader``): ``ResumableLoader`` with N DataLoader workers, measured in wall-clock
images/s over whole batches (no estimate), the same for the plain recipe through the same loader, and the
read system calls each delivered sample costs (in one process: Linux's per-process I/O accounting), for
shards with their index and without it (a header scan per shard per worker per epoch).

Without ``--dataset`` the images are photo-like JPEGs of ImageNet's size and entropy (400x350, quality 90,
about 90 KB; :mod:`pipeline.data.rehearsal_data`) written by the shard writer; pass a dataset made by
``shard_imagenet`` for real figures.

    python tools/bench_loader.py --images 200 --workers 2
    python tools/bench_loader.py --dataset runs/demo/shard_imagenet/train --seconds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

from pipeline.data.loaders import LoaderSettings, ResumableLoader, _seeded_globals
from pipeline.data.loaders_samples import clip_samples, dino_samples, supervised_samples
from pipeline.data.loaders_tar import ShardReader
from pipeline.data.manifest import ClassInfo, Manifest
from pipeline.data.order import EpochOrder, OrderSpec
from pipeline.data.rehearsal_data import photo_jpeg
from pipeline.data.shard_writer import Sample, finish_dataset, write_shard
from pipeline.data.tar_index import index_path
from pipeline.data.transforms import ClipAugSettings, DinoAugSettings, SupervisedAugSettings, decode_image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Job:
    """A shard of synthetic samples for the real shard writer (classification, with a caption in the json)."""

    kind = "classification"

    def __init__(self, index: int, jpegs: list[bytes]):
        self.index, self.jpegs = index, jpegs

    def fingerprint(self) -> str:
        return f"bench-{self.index}-{len(self.jpegs)}"

    def items(self):
        for i, data in enumerate(self.jpegs):
            image = Image.open(io.BytesIO(data))
            yield Sample(f"{self.index:05d}{i:05d}", data, i % 10, f"u{self.index}-{i}", image.width,
                         image.height, {"caption": f"synthetic image {i}"})


class _Plan:
    def __init__(self, shards: list[list[bytes]]):
        self.shards = shards
        self.num_shards = len(shards)
        self.skipped, self.skipped_samples = Counter(), []


def write_synthetic_dataset(root: Path, images: int, width: int, height: int, quality: int,
                            per_shard: int = 100) -> Path:
    """Photo-like JPEGs in shards written (with their index) by the project's shard writer."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    jpegs = [photo_jpeg(rng, width, height, quality) for _ in range(images)]
    plan = _Plan([jpegs[i:i + per_shard] for i in range(0, images, per_shard)])
    stats = [write_shard(root, _Job(index, shard)) for index, shard in enumerate(plan.shards)]
    classes = [ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(10)]
    finish_dataset(root, plan, stats, name="bench", kind="classification", split="train", config={},
                   classes=classes)
    return root


def load_members(dataset: Path, limit: int) -> list[dict[str, bytes]]:
    manifest = Manifest.load(dataset)
    members = []
    for path, info in zip(manifest.shard_paths(dataset), manifest.shards):
        reader = ShardReader(path, info.samples, info.sha256)
        extensions = tuple(e for e in ("jpg", "cls", "txt") if e in reader.extensions())
        members += [reader.read(i, extensions) for i in range(min(info.samples, limit - len(members)))]
        reader.close()
        if len(members) >= limit:
            break
    return members


def rate(work: Callable[[object], object], items: list, seconds: float) -> float:
    """Items per CPU-second of this process over whole passes through ``items``, for at least ``seconds``."""
    work(items[0])
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for item in items:
            work(item)
        done += len(items)
    return done / (time.process_time() - start)


def per_image_ms(work: Callable[[object], object], items: list, seconds: float) -> float:
    return round(1000 / rate(work, items, seconds), 3)


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


class PlainSamples:
    """The plain recipe as a sample pipeline, to run through the same loader."""

    extensions = ("jpg", "cls")

    def __init__(self, size: int):
        self.transform = plain_transform(size)

    def make(self, key: str, members: dict[str, bytes], rng: np.random.Generator) -> dict:
        return {"key": key, "image": self.transform(decode_image(members["jpg"])), "label": int(members["cls"])}

    def collate(self, samples: list[dict]) -> dict:
        return {"key": [s["key"] for s in samples], "image": default_collate([s["image"] for s in samples]),
                "label": torch.tensor([s["label"] for s in samples])}


def plain_transform(size: int) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def loader_rate(dataset: Path, samples, workers: int, batch: int, seconds: float) -> float:
    """The whole resumable loader, images per wall-clock second over whole batches (the first batch, which
    includes starting the workers, left out)."""
    settings = LoaderSettings(batch_size=batch, num_workers=workers, window_shards=4)
    batches = ResumableLoader(dataset, samples, settings).stream()
    next(batches)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += len(next(batches)["key"])
    return done / (time.perf_counter() - start)


class ReadCounter:
    """Read system calls of this process (Linux's per-process I/O accounting)."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/io", os.O_RDONLY)

    def now(self) -> int:
        text = os.pread(self._fd, 4096, 0).decode()
        return int(next(line for line in text.splitlines() if line.startswith("syscr:")).split()[1])


def reads_per_sample(dataset: Path, batch: int, batches: int) -> float:
    """Read system calls per delivered sample over ``batches`` batches of the loader in this process, raw
    bytes only (no decoding: what the loader itself reads)."""

    class RawSamples:
        extensions = ("jpg", "cls")

        def make(self, key, members, rng):
            return {"key": key}

        def collate(self, samples):
            return {"key": [s["key"] for s in samples]}

    settings = LoaderSettings(batch_size=batch, num_workers=0, window_shards=4, shuffle=True)
    counter = ReadCounter()
    start, delivered = counter.now(), 0
    for i, got in enumerate(ResumableLoader(dataset, RawSamples(), settings)):
        delivered += len(got["key"])
        if i + 1 == batches:
            break
    return (counter.now() - start) / delivered


def breakdown(members: list[dict[str, bytes]], size: int, seconds: float) -> dict[str, float]:
    """Milliseconds per image of each step of the supervised pipeline, alone, on decoded images where the step
    starts from one."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    jpegs = [m["jpg"] for m in members]
    images = [decode_image(j) for j in jpegs]
    aug = SupervisedAugSettings(image_size=size)
    full = supervised_samples(aug).transform.transforms  # timm: crop, flip, 3-Augment, jitter, ToTensor, Normalize
    crop = RandomResizedCropAndInterpolation(size, interpolation="bicubic")
    crops = [crop(image) for image in images]
    three = next(t for t in full if type(t).__name__ == "AutoAugment")
    jitter = next(t for t in full if type(t).__name__ == "ColorJitter")
    tensors = [T.ToTensor()(c) for c in crops]
    order = EpochOrder(OrderSpec((len(members),), seed=0), 0)

    def seeded(position: int) -> None:
        seed = order.augment_seeds(np.array([position]))[0]
        with _seeded_globals(seed, restore=False):
            np.random.default_rng(seed)

    uint8 = [T.PILToTensor()(c) for c in crops]
    return {
        "decode": per_image_ms(decode_image, jpegs, seconds),
        "decode_draft": per_image_ms(lambda j: decode_image(j, size), jpegs, seconds),
        "crop_bicubic_resize": per_image_ms(crop, images, seconds),
        "three_augment": per_image_ms(three, crops, seconds),
        "color_jitter": per_image_ms(jitter, crops, seconds),
        "to_float32_and_normalize": per_image_ms(
            lambda c: T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(c)), crops, seconds),
        "to_uint8": per_image_ms(T.PILToTensor(), crops, seconds),
        "per_sample_seeding": per_image_ms(seeded, list(range(len(members))), seconds),
        "collate_float32": per_image_ms(lambda i: default_collate(tensors), [0], seconds) / len(tensors),
        "collate_uint8": per_image_ms(lambda i: default_collate(uint8), [0], seconds) / len(uint8),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="a shard folder with manifest.json (default: synthetic)")
    parser.add_argument("--images", type=int, default=200, help="distinct images to cycle through")
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=350)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--size", type=int, default=224, help="training crop size")
    parser.add_argument("--local-crops", type=int, default=10, help="DINO local crops")
    parser.add_argument("--draft", type=int, default=0, help="draft size for the *_draft runs (default: --size)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers for the loader runs")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    draft = args.draft or args.size

    with tempfile.TemporaryDirectory() as scratch:
        dataset = args.dataset or write_synthetic_dataset(Path(scratch) / "indexed", args.images, args.width,
                                                          args.height, args.quality)
        members = load_members(dataset, args.images)
        jpegs = [m["jpg"] for m in members]
        rng = np.random.default_rng(0)
        supervised = SupervisedAugSettings(image_size=args.size)
        dino = DinoAugSettings(global_size=args.size, local_crops=args.local_crops)
        pipelines = {
            "supervised_train": supervised_samples(supervised),
            "supervised_train_draft": supervised_samples(supervised, draft_size=draft),
            "supervised_eval": supervised_samples(supervised, train=False),
            "supervised_train_uint8": supervised_samples(
                SupervisedAugSettings(image_size=args.size, uint8_images=True)),
            "dino": dino_samples(dino),
            "dino_draft": dino_samples(dino, draft_size=draft),
            "dino_uint8": dino_samples(dataclasses.replace(dino, uint8_images=True)),
            "clip": clip_samples(ClipAugSettings(image_size=args.size)),
        }
        plain = PlainSamples(args.size)
        decode = {
            "pil": rate(lambda j: decode_image(j), jpegs, args.seconds),
            "pil_draft": rate(lambda j: decode_image(j, draft), jpegs, args.seconds),
            "torchvision_cpu": rate(
                lambda j: torchvision.io.decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)),
                jpegs, args.seconds),
        }
        captioned = [{**m, "txt": m.get("txt", b"a synthetic image")} for m in members]
        plain_rate = rate(lambda m: plain.make("k", m, rng), members, args.seconds)
        modes = {name: rate(lambda m, p=p: p.make("k", m, rng), captioned, args.seconds)
                 for name, p in pipelines.items()}
        steps = breakdown(members, args.size, args.seconds / 3)
        workers = max(args.workers, 1)
        loader = loader_rate(dataset, pipelines["supervised_train"], workers, args.batch, args.seconds)
        loader_uint8 = loader_rate(dataset, pipelines["supervised_train_uint8"], workers, args.batch, args.seconds)
        loader_plain = loader_rate(dataset, plain, workers, args.batch, args.seconds)
        reads_indexed = reads_per_sample(dataset, args.batch, 4)
        unindexed = Path(scratch) / "unindexed"
        shutil.copytree(dataset, unindexed)
        for path in unindexed.glob("*.tar"):
            index_path(path).unlink(missing_ok=True)
        reads_scanned = reads_per_sample(unindexed, args.batch, 4)

    sizes = [len(j) for j in jpegs]
    pil = decode["pil"]
    report = {
        "images": len(jpegs), "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1024, 1),
        "first_image_size": list(Image.open(io.BytesIO(jpegs[0])).size), "crop": args.size, "draft": draft,
        "cpu": os.cpu_count(), "torch_threads_per_worker": torch.get_num_threads(),
        "decode_images_per_cpu_s": {k: round(v, 1) for k, v in decode.items()},
        "torchvision_cuda_decode_images_per_s": None if (cuda := cuda_decode_rate(jpegs, args.seconds)) is None
        else round(cuda, 1),
        "per_worker_images_per_cpu_s": {"plain_recipe": round(plain_rate, 1),
                                        **{k: round(v, 1) for k, v in modes.items()}},
        "per_worker_vs_plain_recipe": {k: round(v / plain_rate, 3) for k, v in modes.items()},
        "per_worker_vs_pil_decode": {"plain_recipe": round(plain_rate / pil, 3),
                                     **{k: round(v / pil, 3) for k, v in modes.items()}},
        "supervised_breakdown_ms_per_image": steps,
        "loader": {
            "workers": workers, "batch": args.batch,
            "supervised_train_images_per_s": round(loader, 1),
            "supervised_train_per_worker": round(loader / workers, 1),
            "supervised_train_uint8_images_per_s": round(loader_uint8, 1),
            "uint8_vs_float": round(loader_uint8 / loader, 3),
            "plain_recipe_images_per_s": round(loader_plain, 1),
            "supervised_vs_plain_recipe": round(loader / loader_plain, 3),
            "read_syscalls_per_sample": {"indexed": round(reads_indexed, 2), "header_scan": round(reads_scanned, 2)},
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
