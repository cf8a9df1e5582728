"""Summarise a shard folder (counts, sizes, skipped and converted samples) and draw random samples.

    python tools/inspect_shards.py runs/demo/shard_imagenet/train --grid grid.png --count 16 --verify

Prints the summary as JSON. ``--grid`` writes a PNG of random samples with their class or caption;
``--verify`` re-hashes every shard against the manifest.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_write_bytes, sha256_file
from pipeline.data.manifest import Manifest

TILE = 160
TEXT_LINES = 3
LINE_HEIGHT = 13
COLUMNS = 4


def summarize(directory: Path, verify: bool = False) -> dict[str, Any]:
    manifest = Manifest.load(directory)
    counts = [shard.samples for shard in manifest.shards]
    summary: dict[str, Any] = {
        "name": manifest.name, "kind": manifest.kind, "split": manifest.split, "samples": manifest.num_samples,
        "shards": len(manifest.shards), "bytes": sum(shard.bytes for shard in manifest.shards),
        "samples_per_shard": {"min": min(counts, default=0), "max": max(counts, default=0),
                              "mean": round(sum(counts) / max(len(counts), 1), 1)},
        "skipped": manifest.skipped, "converted": manifest.converted, "created_by": manifest.created_by,
    }
    if manifest.kind == "classification":
        summary["classes"] = len(manifest.classes)
    if verify:
        summary["corrupt_shards"] = [shard.name for shard, path in zip(manifest.shards, manifest.shard_paths(directory))
                                     if not path.is_file() or sha256_file(path) != shard.sha256]
    return summary


def pick_samples(directory: Path, count: int, seed: int) -> list[tuple[bytes, str]]:
    """``count`` random samples (image bytes, label text), chosen from the per-shard parquets."""
    manifest = Manifest.load(directory)
    target = "label" if manifest.kind == "classification" else "caption"
    rows = []
    for shard in manifest.shards:
        table = pq.read_table(directory / shard.name.replace(".tar", ".parquet"), columns=["key", target])
        rows += [(shard.name, key, value) for key, value in zip(*table.to_pydict().values())]
    chosen = random.Random(seed).sample(rows, min(count, len(rows)))
    names = {info.index: info.name for info in manifest.classes}
    images = {}
    for shard_name in sorted({shard for shard, _, _ in chosen}):
        wanted = {f"{key}.jpg" for shard, key, _ in chosen if shard == shard_name}
        with tarfile.open(directory / shard_name) as archive:
            for member in archive:
                if member.name in wanted:
                    images[(shard_name, member.name)] = archive.extractfile(member).read()
    return [(images[(shard, f"{key}.jpg")], f"{value}: {names.get(value, '')}" if names else str(value))
            for shard, key, value in chosen]


def draw_grid(samples: list[tuple[bytes, str]], columns: int = COLUMNS) -> Image.Image:
    rows = max(1, -(-len(samples) // columns))
    cell_height = TILE + TEXT_LINES * LINE_HEIGHT + 4
    grid = Image.new("RGB", (columns * TILE, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)
    for number, (data, text) in enumerate(samples):
        x, y = (number % columns) * TILE, (number // columns) * cell_height
        image = ImageOps.contain(Image.open(io.BytesIO(data)).convert("RGB"), (TILE - 4, TILE - 4))
        grid.paste(image, (x + (TILE - image.width) // 2, y + (TILE - image.height) // 2))
        for line_number, line in enumerate(textwrap.wrap(text, 26)[:TEXT_LINES]):
            draw.text((x + 3, y + TILE + line_number * LINE_HEIGHT), line, fill="black", font=font)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="a dataset folder (with manifest.json)")
    parser.add_argument("--grid", type=Path, help="write a PNG grid of random samples here")
    parser.add_argument("--count", type=int, default=16, help="samples in the grid")
    parser.add_argument("--seed", type=int, default=0, help="which random samples")
    parser.add_argument("--verify", action="store_true", help="re-hash every shard against the manifest")
    args = parser.parse_args()
    try:
        summary = summarize(args.dataset, args.verify)
        if args.grid:
            buffer = io.BytesIO()
            draw_grid(pick_samples(args.dataset, args.count, args.seed)).save(buffer, format="PNG")
            atomic_write_bytes(args.grid, buffer.getvalue())
            summary["grid"] = str(args.grid)
    except KopeError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(summary, indent=2))
    if summary.get("corrupt_shards"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
