"""An open_clip model folder: ``open_clip_config.json`` (model and preprocess config) + ``open_clip_model.safetensors``.

This is the layout open_clip's own ``save_for_hf`` writes and ``create_model_and_transforms("local-dir:PATH")``
and ``get_tokenizer("local-dir:PATH")`` read (open_clip >= 3.0). The KoPE vision towers are timm models
registered by ``pipeline.models``, so that import must precede the open_clip call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pipeline.checkpoint.files import save_safetensors
from pipeline.core.fsutil import atomic_write_json

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """The image preprocessing open_clip records for a model (what its ``save_config_for_hf`` writes)."""
    recorded = getattr(model.visual, "preprocess_cfg", None) or {}
    config = {key: recorded[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in recorded}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def write_open_clip_folder(model: nn.Module, model_config: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write an open_clip ``CLIP`` model built from ``model_config`` (the dict open_clip's factory used)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out_dir / WEIGHTS_FILE)
    atomic_write_json(out_dir / CONFIG_FILE, {"model_cfg": model_config, "preprocess_cfg": preprocess_config(model)})
    return [out_dir / CONFIG_FILE, out_dir / WEIGHTS_FILE]
