"""Export a segmentation run: its checkpoint consolidated to fp32 and written as a segmenter folder,
``segmenter.json`` (the :class:`pipeline.models.segmentation.SegmenterConfig`, class names, preprocessing) +
``model.safetensors`` + ``SHA256SUMS``. The folder is reloaded with
:func:`pipeline.models.segmentation.load_segmenter` (only torch, timm and ``pipeline.models``) and its logits
compared with the checkpoint's model before the export counts as done, as for the timm and open_clip exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.consolidate import consolidate
from pipeline.checkpoint.files import save_safetensors
from pipeline.checkpoint.layout import resolve_tag_dir
from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_write_json
from pipeline.export.checksums import write_checksums
from pipeline.export.exporter import load_into
from pipeline.models.segmentation import (
    SEGMENTER_FILE,
    WEIGHTS_FILE,
    SegmenterConfig,
    create_segmenter,
    load_segmenter,
    segmenter_description,
)
from pipeline.train.run import CHECKPOINTS, MODEL_JSON
from pipeline.train.tasks.segmentation import SegmentationTask


@torch.no_grad()
def reload_difference(folder: Path, model: torch.nn.Module, size: int, batch: int = 2) -> float:
    """Max |difference| between ``model``'s logits and the reloaded folder's on fixed random images."""
    reloaded, _ = load_segmenter(folder)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return float((model.eval()(images)["out"] - reloaded(images)["out"]).abs().max())


def export_segmenter(training_dir: Path, folder: Path, *, classes: list[str], preprocess: dict[str, Any],
                     tag: str | None = None, tolerance: float = 1e-5) -> dict[str, Any]:
    """Write ``folder`` from the checkpoint ``tag`` (default: latest) of the segmentation stage ``training_dir``."""
    spec = json.loads((Path(training_dir) / MODEL_JSON).read_text(encoding="utf-8"))
    config = SegmenterConfig(**spec["kwargs"])
    tag_dir = resolve_tag_dir(Path(training_dir) / CHECKPOINTS, tag)
    checkpoint = consolidate(tag_dir)
    state, used = SegmentationTask.inference_weights(checkpoint.state_dict, checkpoint.part("task"), "auto")
    model = create_segmenter(config).eval()
    load_into(model, state, str(tag_dir))
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), folder / WEIGHTS_FILE)
    atomic_write_json(folder / SEGMENTER_FILE, segmenter_description(config, classes, preprocess))
    difference = reload_difference(folder, model, int(preprocess["crop_size"]))
    if not difference <= tolerance:
        raise KopeError(f"{folder}: the segmenter export reloads with logits {difference:.3g} away from the "
                        f"checkpoint's model (tolerance {tolerance:g})")
    sums = write_checksums(folder, [folder / SEGMENTER_FILE, folder / WEIGHTS_FILE])
    return {"weights": used, "checkpoint": checkpoint.tag, "sha256": sums[WEIGHTS_FILE], "max_abs_diff": difference}
