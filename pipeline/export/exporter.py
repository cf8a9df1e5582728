"""Export one training checkpoint: consolidate, pick the weights, write the folders, check them, describe them.

The written folder holds ``config.json`` + ``model.safetensors`` (timm: the backbone, or the CLIP vision
tower) and, for CLIP runs, ``open_clip_config.json`` + ``open_clip_model.safetensors`` beside them, so both
``timm.create_model("local-dir:PATH")`` and ``open_clip.create_model_and_transforms("local-dir:PATH")`` work
on the same folder. Each written model is reloaded through its library's own call and its outputs compared
with the model built from the checkpoint before the export counts as done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint.consolidate import ConsolidatedCheckpoint, consolidate
from pipeline.checkpoint.files import CheckpointError
from pipeline.checkpoint.layout import resolve_tag_dir
from pipeline.core.errors import KopeError
from pipeline.export import open_clip_format, timm_format
from pipeline.export.recipe import ModelRecipe
from pipeline.train.settings import WeightsChoice

RUNTIME_KWARGS = frozenset({"pretrained", "precision", "device", "jit", "cache_dir", "output_dict"})


@dataclass
class TrainedModel:
    """The model of one checkpoint, rebuilt and loaded: the whole model and its timm part."""

    model: nn.Module
    timm_model: nn.Module
    weights: str
    checkpoint: ConsolidatedCheckpoint


@dataclass
class ExportResult:
    folder: Path
    files: list[Path]
    max_abs_diff: dict[str, float] = field(default_factory=dict)


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state_dict``; 1-element tensors for 0-dim parameters (how the engine trains scalars)
    get their shape back. A mismatch raises one line naming the source and the first differing keys."""
    expected = model.state_dict()
    adapted = {}
    for name, tensor in state_dict.items():
        target = expected.get(name)
        if target is not None and target.dim() == 0 and tensor.numel() == 1:
            tensor = tensor.reshape(())
        adapted[name] = tensor
    missing, unexpected = sorted(set(expected) - set(adapted)), sorted(set(adapted) - set(expected))
    shapes = [name for name in set(expected) & set(adapted) if expected[name].shape != adapted[name].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {names[:3]}" for label, names in (("missing", missing), ("unexpected", unexpected),
                                                            ("shape mismatch", sorted(shapes))) if names]
        raise CheckpointError(f"{source}: weights do not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(adapted, strict=True)


def _probe_images(model: nn.Module, batch: int) -> torch.Tensor:
    """Fixed random images of the size the timm model was built for (not its pretrained cfg's default)."""
    from timm.models import get_model_input_config

    size = get_model_input_config(model)["input_size"]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *size, generator=generator)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def check_timm_folder(folder: Path, model: nn.Module, batch: int = 2) -> float:
    """Reload ``folder`` with ``timm.create_model("local-dir:...")``; max |difference| of the outputs."""
    import timm

    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = _probe_images(model, batch)
    return _max_diff(model.eval()(images), reloaded(images))


@torch.no_grad()
def check_open_clip_folder(folder: Path, model: nn.Module, batch: int = 2) -> float:
    """Reload ``folder`` with open_clip's ``local-dir:`` call; max |difference| of image and text features."""
    import open_clip

    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    reloaded.eval()
    model.eval()
    images = _probe_images(model.visual.trunk, batch) if hasattr(model.visual, "trunk") else torch.randn(
        batch, 3, *model.visual.image_size)
    text = tokenizer(["a photo of a digit", "two numbers side by side"][:batch])
    return max(_max_diff(model.encode_image(images), reloaded.encode_image(images)),
               _max_diff(model.encode_text(text), reloaded.encode_text(text)))


def open_clip_model_config(recipe: ModelRecipe) -> dict[str, Any]:
    config = recipe.open_clip_config()
    extra = {key: value for key, value in recipe.kwargs.items() if key not in RUNTIME_KWARGS}
    return {**config, **extra}


def load_trained_model(checkpoints_dir: Path, recipe: ModelRecipe, tag: str | None = None,
                       weights: WeightsChoice = "auto") -> TrainedModel:
    """Checkpoint ``tag`` (default: latest) consolidated, its weights chosen and loaded into ``recipe``'s model."""
    tag_dir = resolve_tag_dir(checkpoints_dir, tag)
    checkpoint = consolidate(tag_dir)
    state_dict, used = recipe.task.inference_weights(checkpoint.state_dict, checkpoint.part("task"), weights)
    model = recipe.build().eval()
    load_into(model, state_dict, str(tag_dir))
    timm_model = model
    if recipe.library == "open_clip":
        timm_model = getattr(model.visual, "trunk", None)
        if timm_model is None:
            raise KopeError(f"{recipe.name}: the open_clip vision tower is not a timm model; no timm export")
    return TrainedModel(model, timm_model, used, checkpoint)


def write_export(
    trained: TrainedModel,
    recipe: ModelRecipe,
    out_dir: Path,
    *,
    data_config: dict[str, Any] | None = None,
    label_names: list[str] | None = None,
    label_descriptions: dict[str, str] | None = None,
    tolerance: float = 1e-5,
) -> ExportResult:
    """Write the timm (and open_clip) folder, reload each with its library and compare outputs."""
    out_dir = Path(out_dir)
    files: list[Path] = []
    diffs: dict[str, float] = {}
    if recipe.library == "open_clip":
        files += open_clip_format.write_open_clip_folder(trained.model, open_clip_model_config(recipe), out_dir)
        diffs["open_clip"] = check_open_clip_folder(out_dir, trained.model)
    files += timm_format.write_timm_folder(trained.timm_model, out_dir, data_config=data_config,
                                           label_names=label_names, label_descriptions=label_descriptions)
    diffs["timm"] = check_timm_folder(out_dir, trained.timm_model)
    for library, diff in diffs.items():
        if not diff <= tolerance:
            raise KopeError(f"{out_dir}: the {library} export reloads with outputs {diff:.3g} away from the "
                            f"checkpoint's model (tolerance {tolerance:g})")
    return ExportResult(out_dir, files, diffs)
