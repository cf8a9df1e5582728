"""The export's ``README.md``: how to load it, what it is, how it was trained and how it scored so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from torch import nn


def kope_settings(model: nn.Module) -> dict[str, Any]:
    """The KoPE switches and step size of a ``KopeVisionTransformer`` (empty for other models)."""
    if not hasattr(model, "kope"):
        return {}
    if not model.kope:
        return {"kope": False}
    attn = model.blocks[0].attn
    coupling = model.coupling
    settings: dict[str, Any] = {
        "kope": True,
        "kuramoto": coupling is not None,
        "vo_rotation": bool(attn.vo_rotation),
        "phase_mix": attn.phase_mix is not None,
        "rope_base": float(model.rope_base),
        "oscillators_per_head": int(model.rot_dim),
    }
    if coupling is not None:
        settings.update(coupling=coupling.variant, gamma=round(float(coupling.gamma), 6),
                        learnable_gamma=isinstance(coupling.gamma_raw, nn.Parameter))
    return settings


@dataclass
class CardFacts:
    """Everything the card states; the export stage gathers it."""

    title: str
    mode: str
    architecture: str
    model_args: dict[str, Any]
    parameters: int
    kope: dict[str, Any]
    weights: str
    checkpoint: dict[str, Any]
    data: dict[str, Any]
    files: dict[str, str]
    load_timm: str
    load_open_clip: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def _table(rows: dict[str, Any]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows.items()]


def render_card(facts: CardFacts) -> str:
    lines = [f"# {facts.title}", "",
             f"A Vision Transformer with Kuramoto oscillatory Phase Encoding (KoPE), trained in **{facts.mode}** "
             f"mode; exported weights: **{facts.weights}**.", "", "## Load it", "",
             "Needs torch, timm (and open_clip for the CLIP model) and this package's model code, whose import "
             "registers the KoPE architectures:", "", "```python", facts.load_timm, "```", ""]
    if facts.load_open_clip:
        lines += ["```python", facts.load_open_clip, "```", ""]
    lines += ["## Model", ""] + _table({
        "architecture": f"`{facts.architecture}`",
        "model arguments": f"`{facts.model_args}`",
        "parameters": f"{facts.parameters:,}",
    }) + [""]
    if facts.kope:
        lines += ["### KoPE settings", ""] + _table({key: f"`{value}`" for key, value in facts.kope.items()}) + [""]
    lines += ["## Training", ""] + _table(facts.checkpoint) + [""]
    lines += ["### Data", ""] + _table(facts.data) + [""]
    lines += ["## Metrics so far", ""]
    lines += _table(facts.metrics) if facts.metrics else ["No evaluation recorded yet."]
    lines += ["", "## Files", "", "Checked by `sha256sum -c SHA256SUMS`:", ""]
    lines += [f"- `{name}` `{digest}`" for name, digest in facts.files.items()]
    if facts.config:
        lines += ["", "## Resolved training config", "", "```yaml",
                  yaml.safe_dump(facts.config, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


def load_snippets(folder_config: dict[str, Any], has_open_clip: bool) -> tuple[str, str]:
    """The two ways to load the folder with timm (and the open_clip call), as code for the card. Loading by name
    carries the folder's preprocessing (input size, normalisation, crop) into the pretrained config, so
    ``timm.data.resolve_data_config(model=model)`` builds the transform the model was trained for, not the
    registered default's 224 px one."""
    arch = folder_config["architecture"]
    args = folder_config.get("model_args", {})
    num_classes = folder_config.get("num_classes", 0)
    arg_text = "".join(f", {key}={value!r}" for key, value in args.items() if key != "num_classes")
    cfg = folder_config.get("pretrained_cfg", {})
    overlay = "".join(f", {key}={_literal(cfg[key])}" for key in PREPROCESSING_KEYS if key in cfg)
    timm_code = "\n".join([
        "import timm",
        "import pipeline.models  # registers the KoPE architectures with timm",
        "",
        'model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()',
        "# or, by name, with the weights file:",
        f'model = timm.create_model("{arch}", pretrained=True, pretrained_cfg_overlay=dict(',
        f'    file="path/to/this/folder/model.safetensors", num_classes={num_classes}{overlay}){arg_text})',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
    ])
    if not has_open_clip:
        return timm_code, ""
    clip_code = "\n".join([
        "import open_clip",
        "import pipeline.models  # registers the KoPE vision towers with timm",
        "",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:path/to/this/folder")',
        'tokenizer = open_clip.get_tokenizer("local-dir:path/to/this/folder")',
    ])
    return timm_code, clip_code


def _literal(value: Any) -> str:
    """A config value as Python source (JSON lists of the config back to the tuples timm uses)."""
    return repr(tuple(value)) if isinstance(value, list) else repr(value)
