"""Small datasets in the project's shard format, written here so loader tests do not need the sharding stages.

Shards follow the format exactly: members ``<key>.jpg``, ``<key>.cls`` or ``<key>.txt``, ``<key>.json`` in
that order, mtime 0, uid/gid 0, empty owner names, mode 0o444; beside each a parquet and a stats file;
and the manifest (with ``sizes.json``, ``_info.json``, ``classes.tsv``) written by ``Manifest.save``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.manifest import ClassInfo, Manifest, ShardInfo, shard_name

WORDS = ["red", "blue", "café", "tree", "river", "dog", "naïve", "sky", "stone", "bird"]


def sample_key(shard: int, index: int) -> str:
    return f"{shard * 10_000 + index:09d}"


def jpeg_bytes(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A distinct colourful image: random blocks, upsampled, so crops and colour jitter have work to do."""
    blocks = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def write_dataset(
    root: Path,
    kind: str = "classification",
    shard_sizes: tuple[int, ...] = (7, 5, 9, 6, 8),
    image_size: tuple[int, int] = (40, 32),
    num_classes: int = 3,
    seed: int = 0,
) -> Path:
    """Write a dataset folder and return it; labels are ``index % num_classes``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for shard, count in enumerate(shard_sizes):
        rows = []
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for index in range(count):
                key = sample_key(shard, index)
                width, height = image_size
                meta = {"uid": f"uid{key}", "source": "fixture", "width": width, "height": height}
                _add(archive, f"{key}.jpg", jpeg_bytes(rng, width, height))
                if kind == "classification":
                    label = index % num_classes
                    _add(archive, f"{key}.cls", str(label).encode())
                    rows.append({"key": key, "uid": meta["uid"], "label": label, "width": width, "height": height})
                else:
                    caption = " ".join(rng.choice(WORDS, size=4))
                    meta["caption"] = caption
                    _add(archive, f"{key}.txt", caption.encode("utf-8"))
                    rows.append({"key": key, "uid": meta["uid"], "caption": caption, "width": width,
                                 "height": height})
                _add(archive, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        data = buffer.getvalue()
        name = shard_name(shard)
        (root / name).write_bytes(data)
        pq.write_table(pa.Table.from_pylist(rows), root / name.replace(".tar", ".parquet"))
        stats = {"count": count, "skipped": {}}
        (root / name.replace(".tar", "_stats.json")).write_text(json.dumps(stats))
        shards.append(ShardInfo(name, count, len(data), hashlib.sha256(data).hexdigest()))
    classes = [ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(num_classes)]
    manifest = Manifest(
        name=f"fixture-{kind}", kind=kind, shards=shards,
        classes=classes if kind == "classification" else [],
        config={"shard_sizes": list(shard_sizes), "seed": seed},
    )
    manifest.save(root)
    return root
