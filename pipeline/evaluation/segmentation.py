"""The ``segmentation`` protocol: mIoU, per-class IoU and pixel accuracy of a segmenter export on a sharded
segmentation set, as mmsegmentation evaluates ADE20K, with torchmetrics doing the counting.

Inference (mmseg's ``whole`` and ``slide`` test modes): the image is resized to fit the export's ``scale``;
``whole`` runs it at once (padded to a multiple of the patch size), ``slide`` averages the logits of
crop-sized windows ``stride`` apart (mmseg's ``slide_inference``). Logits are resized bilinearly to the
annotation's size, where they are scored; pixels labelled 255 are ignored. mIoU averages the IoU of the
classes present in the annotations or the predictions (torchmetrics' macro average leaves out classes with an
empty union, as mmseg's ``nanmean``); pixel accuracy is the share of labelled pixels predicted right. The score
of predicting class 0 everywhere is recorded beside them, as the trivial baseline.

A few validation images are drawn to ``segmentation/NNN.png``: the image, ground truth, prediction and, for
KoPE backbones, the final patch phases of the first head's lowest-frequency oscillator as hues (the paper's
phase maps; the highest frequencies turn by about a radian per patch and draw stripes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from pipeline.core.fsutil import atomic_path
from pipeline.core.logs import get_logger
from pipeline.core.results import ResultsLog, evaluation_id
from pipeline.data.loaders import ResumableLoader
from pipeline.data.manifest import Manifest
from pipeline.data.segmentation_samples import SegmentationSamples
from pipeline.data.segmentation_transforms import IGNORE_INDEX
from pipeline.data.settings import LoaderSettings, SegmentationAugSettings
from pipeline.evaluation.exported import weights_sha256
from pipeline.evaluation.features import dataset_fingerprint
from pipeline.evaluation.settings import SegmentationEvalSettings
from pipeline.models.segmentation import WEIGHTS_FILE, Segmenter, load_segmenter

OVERLAY_DIR = "segmentation"
log = get_logger("evaluate")


def segmentation_metrics(num_classes: int) -> MetricCollection:
    """mIoU (macro over classes present), per-class IoU and pixel accuracy, with 255 ignored."""
    return MetricCollection({
        "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX),
        "iou": MulticlassJaccardIndex(num_classes, average="none", ignore_index=IGNORE_INDEX),
        "pixel_accuracy": MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX),
    }, compute_groups=False)


def summarise(metrics: MetricCollection, class_names: list[str]) -> dict[str, Any]:
    """Plain numbers: ``miou``, ``pixel_accuracy``, ``per_class_iou`` (``None`` for classes that appear in
    neither the annotations nor the predictions)."""
    values = metrics.compute()
    confmat = metrics["iou"].confmat
    present = (confmat.sum(0) + confmat.sum(1)) > 0
    per_class = {name: float(iou) if seen else None for name, iou, seen in
                 zip(class_names, values["iou"].tolist(), present.tolist())}
    return {"miou": float(values["miou"]), "pixel_accuracy": float(values["pixel_accuracy"]),
            "per_class_iou": per_class}


def _padded(image: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    return F.pad(image, (0, -width % multiple, 0, -height % multiple))


def whole_logits(model: Segmenter, image: torch.Tensor, patch: int) -> torch.Tensor:
    """Logits [1, C, h, w] of the whole image [1, 3, h, w] at once."""
    height, width = image.shape[-2:]
    return model(_padded(image, patch))["out"][..., :height, :width]


def slide_logits(model: Segmenter, image: torch.Tensor, crop: int, stride: int, patch: int) -> torch.Tensor:
    """Logits [1, C, h, w] averaged over ``crop`` windows ``stride`` apart (mmseg's ``slide_inference``)."""
    height, width = image.shape[-2:]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=image.device)
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride + crop, height), min(col * stride + crop, width)
            top, left = max(bottom - crop, 0), max(right - crop, 0)
            logits = whole_logits(model, image[..., top:bottom, left:right], patch)
            if total is None:
                total = torch.zeros(1, logits.shape[1], height, width, device=image.device)
            total[..., top:bottom, left:right] += logits
            count[..., top:bottom, left:right] += 1
    return total / count


@dataclass
class _Overlay:
    key: str
    pixels: np.ndarray
    mask: np.ndarray
    prediction: np.ndarray
    phases: np.ndarray | None


def palette() -> np.ndarray:
    """A fixed colour per class (index 255, ignored, is black)."""
    colours = np.random.default_rng(0).integers(40, 256, size=(256, 3)).astype(np.uint8)
    colours[IGNORE_INDEX] = 0
    return colours


def phase_colours(phases: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The first head's last (lowest-frequency) oscillator's final phase per patch as a hue (uint8 RGB on the
    patch grid)."""
    angles = phases[0, 0, :, -1].reshape(grid).float().cpu().numpy()
    hue = np.round((angles % (2 * math.pi)) / (2 * math.pi) * 255).astype(np.uint8)
    hsv = np.stack([hue, np.full_like(hue, 255), np.full_like(hue, 255)], axis=-1)
    return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))


def draw_overlay(item: _Overlay, colours: np.ndarray, path: Path) -> None:
    """Image | ground truth | prediction (| phase map), side by side at the annotation's size."""
    height, width = item.mask.shape
    image = np.array(Image.fromarray(item.pixels).resize((width, height), Image.Resampling.BILINEAR))
    panels = [image] + [(0.4 * image + 0.6 * colours[labels]).astype(np.uint8)
                        for labels in (item.mask, item.prediction)]
    if item.phases is not None:
        panels.append(np.array(Image.fromarray(item.phases).resize((width, height), Image.Resampling.NEAREST)))
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(panels, axis=1)).save(tmp, format="PNG")


def _pixels(image: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """A normalised [3, h, w] image back to uint8 RGB."""
    restored = image.cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (restored.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def evaluate_segmenter(model: Segmenter, description: dict[str, Any], val_dir: Path,
                       settings: SegmentationEvalSettings, device: torch.device, out_dir: Path,
                       num_workers: int = 0) -> dict[str, Any]:
    """Every requested mode's scores (and the class-0 baseline's) on every sample of ``val_dir``; draws the
    first ``settings.overlays`` images into ``out_dir/segmentation``."""
    manifest = Manifest.load(val_dir)
    class_names = list(description["classes"])
    if manifest.kind != "segmentation" or len(manifest.classes) != len(class_names):
        raise ValueError(f"{val_dir}: expected a segmentation set of the export's {len(class_names)} classes, found "
                         f"{manifest.kind} with {len(manifest.classes)}")
    preprocess = description["preprocess"]
    crop = int(preprocess["crop_size"])
    stride = settings.stride or max(crop * 2 // 3, 1)
    aug = SegmentationAugSettings(crop_size=crop, scale=tuple(preprocess["scale"]), mean=tuple(preprocess["mean"]),
                                  std=tuple(preprocess["std"]))
    model = model.to(device).eval()
    patch = model.backbone.patch_embed.patch_size[0]
    scores = {mode: segmentation_metrics(len(class_names)).to(device) for mode in settings.modes}
    baseline = segmentation_metrics(len(class_names)).to(device)
    overlays: list[_Overlay] = []
    loader_settings = LoaderSettings(batch_size=1, num_workers=num_workers, shuffle=False, drop_last=False)
    for batch in ResumableLoader(val_dir, SegmentationSamples(aug, train=False), loader_settings):
        for key, image, mask in zip(batch["key"], batch["image"], batch["mask"]):
            image, mask = image[None].to(device), mask[None].to(device)
            prediction = None
            for mode, metrics in scores.items():
                logits = whole_logits(model, image, patch) if mode == "whole" else slide_logits(
                    model, image, crop, stride, patch)
                logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
                prediction = logits.argmax(1)
                metrics.update(prediction, mask)
            baseline.update(torch.zeros_like(mask), mask)
            if len(overlays) < settings.overlays and prediction is not None:
                overlays.append(_Overlay(key, _pixels(image[0], aug.mean, aug.std), mask[0].cpu().numpy(),
                                         prediction[0].cpu().numpy(), _phase_map(model, image, patch)))
    results: dict[str, Any] = {mode: summarise(metrics, class_names) for mode, metrics in scores.items()}
    headline = "slide" if "slide" in results else "whole"
    results.update(mode=headline, miou=results[headline]["miou"],
                   pixel_accuracy=results[headline]["pixel_accuracy"], class0_everywhere=summarise(baseline,
                                                                                                   class_names))
    if overlays:
        folder = out_dir / OVERLAY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        colours = palette()
        for number, item in enumerate(overlays):
            draw_overlay(item, colours, folder / f"{number:03d}.png")
        results["overlays"] = [f"{OVERLAY_DIR}/{number:03d}.png" for number in range(len(overlays))]
    return results


def _phase_map(model: Segmenter, image: torch.Tensor, patch: int) -> np.ndarray | None:
    padded = _padded(image, patch)
    phases = model.patch_phases(padded)
    if phases is None:
        return None
    return phase_colours(phases, (padded.shape[-2] // patch, padded.shape[-1] // patch))


def evaluate_segmentation_export(folder: Path, val_dir: Path, val_name: str, settings: SegmentationEvalSettings,
                                 results: ResultsLog, out_dir: Path, device: torch.device, num_workers: int = 0,
                                 record: dict[str, Any] | None = None) -> dict[str, float]:
    """Score the segmenter export ``folder`` unless ``results`` holds this evaluation already; returns the
    headline numbers (``miou``, ``pixel_accuracy``)."""
    model, description = load_segmenter(folder)
    sha256 = weights_sha256(folder, WEIGHTS_FILE)
    protocol_settings = {**asdict(settings), "overlays": None, "preprocess": description["preprocess"]}
    data = {"val": dataset_fingerprint(Manifest.load(val_dir))}
    eval_id = evaluation_id(sha256, "segmentation", protocol_settings, data)
    found = results.find(eval_id)
    if found is not None:
        log.info("segmentation on %s: already recorded (%s), skipped", val_name, eval_id)
        metrics = found["metrics"]
    else:
        metrics = evaluate_segmenter(model, description, val_dir, settings, device, out_dir, num_workers)
        results.append({**(record or {}), "id": eval_id, "protocol": "segmentation", "dataset": val_name,
                        "checkpoint_sha256": sha256, "settings": protocol_settings, "data": data,
                        "metrics": metrics})
        log.info("segmentation on %s: mIoU %.4f (%s), pixel accuracy %.4f; class 0 everywhere: mIoU %.4f",
                 val_name, metrics["miou"], metrics["mode"], metrics["pixel_accuracy"],
                 metrics["class0_everywhere"]["miou"])
    return {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"],
            **{f"miou_{mode}": metrics[mode]["miou"] for mode in settings.modes}}
