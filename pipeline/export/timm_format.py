"""A timm model folder: ``config.json`` (architecture, model arguments, preprocessing) + ``model.safetensors``.

The config is written by timm's own ``save_config_for_hf``, so it holds exactly what
``timm.create_model("local-dir:PATH", pretrained=True)`` needs to rebuild the model with its arguments
(KoPE switches, image size, classes) and the evaluation transform it was trained for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pipeline.checkpoint.files import save_safetensors
from pipeline.core.fsutil import atomic_path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def write_timm_folder(
    model: nn.Module,
    out_dir: Path,
    *,
    data_config: dict[str, Any] | None = None,
    label_names: list[str] | None = None,
    label_descriptions: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``model`` (a timm model built by ``timm.create_model``) as ``config.json`` + ``model.safetensors``.

    ``data_config`` (``mean``, ``std``, ``crop_pct``, ``interpolation``, ``input_size``) overrides the
    preprocessing recorded for the weights; label names and descriptions go into timm's label fields. The
    input size defaults to the one the model was built for (its patch embedding's), not the registered 224.
    """
    from timm.models._hub import save_config_for_hf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if label_names:
        extra["label_names"] = list(label_names)
    if label_descriptions:
        extra["label_descriptions"] = dict(label_descriptions)
    built_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built_size is not None and "input_size" not in (data_config or {}):
        data_config = {**(data_config or {}), "input_size": (3, *built_size)}
    save_safetensors(model.state_dict(), out_dir / WEIGHTS_FILE)
    with atomic_path(out_dir / CONFIG_FILE) as tmp:
        save_config_for_hf(model, str(tmp), model_config=extra, data_config=data_config)
    return [out_dir / CONFIG_FILE, out_dir / WEIGHTS_FILE]
