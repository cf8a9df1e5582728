"""KoPE ViTs as open_clip vision towers, built through open_clip's own model-config mechanism.

open_clip builds a timm vision tower from ``vision_cfg.timm_model_name`` alone: it passes no extra timm
arguments (only drop-path and patch-drop rates) and not even the image size. So the KoPE settings a CLIP
tower needs are carried by timm names registered here, each building the matching ``vit_kope_*`` model with γ
fixed (the paper's CLIP recipe), the tower's input size and no classifier:

- ``vit_kope_{tiny,small,base}_patch16_clip_*`` and ``vit_kope_demo_patch8_clip_64``: the authors' CLIP tower
  (open_clip's vision transformer with KoPE, their ``ViT-KoPE-B-16``), as timm names its CLIP towers: a
  LayerNorm after the patch and position embeddings (``norm_pre``, their ``ln_pre``), LayerNorm eps 1e-5
  throughout and a patch convolution without bias. The ``ViT-KoPE-*`` configs use these.
- ``vit_kope_*_timm_clip_*``: the timm KoPE ViT unchanged as a tower (no pre-norm, eps 1e-6, patch bias),
  what this package's CLIP configs built before they followed the authors.

The JSON configs beside this module (``open_clip_configs/ViT-KoPE-*.json``) name the towers next to open_clip's
own text tower; ``register_open_clip_configs`` adds them to open_clip's registry.

In those configs ``timm_pool: "token"`` pools the CLS token and ``timm_proj: "linear"`` adds a bias-free
projection to the joint embedding, as open_clip's own ViT does. ``timm_model_pretrained`` is overwritten by
open_clip's factory (``pretrained_image``); the KoPE towers have no downloadable weights, so leave it false.

Importing this module needs only torch and timm; open_clip is imported by the functions that use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from pipeline.models import kope_vit  # noqa: F401  (registers the vit_kope_* models the towers build)

__all__ = ["OPEN_CLIP_CONFIG_DIR", "kope_clip_config_names", "register_open_clip_configs", "create_kope_clip"]

OPEN_CLIP_CONFIG_DIR = Path(__file__).with_name("open_clip_configs")

_TOWER_SETTINGS = {"learnable_gamma": False, "num_classes": 0}
"""What every CLIP tower fixes: γ is a buffer (not trained), and open_clip adds its own projection."""

AUTHORS_SCAFFOLD = {"pre_norm": True, "norm_eps": 1e-5}
"""open_clip's ViT around the KoPE blocks: ``ln_pre`` (timm's ``norm_pre``, which also drops the patch bias)
and LayerNorm eps 1e-5."""

DEMO = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
"""A 2-block, 64-wide ViT/8: small enough to learn the demo data in minutes on a CPU."""


def _cfg(image_size: int) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, image_size, image_size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


_TOWERS = {  # name stem -> (registered KoPE ViT it builds, input size, size options)
    "vit_kope_tiny_patch16_{}_64": ("vit_kope_tiny_patch16_224", 64, {}),
    "vit_kope_demo_patch8_{}_64": ("vit_kope_tiny_patch16_224", 64, DEMO),
    "vit_kope_small_patch16_{}_224": ("vit_kope_small_patch16_224", 224, {}),
    "vit_kope_base_patch16_{}_224": ("vit_kope_base_patch16_224", 224, {}),
}
default_cfgs = generate_default_cfgs(
    {stem.format(kind): _cfg(size) for stem, (_, size, _) in _TOWERS.items() for kind in ("clip", "timm_clip")}
)


def _create_clip_tower(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build the tower ``variant`` (a name from ``_TOWERS``) with the tower settings and its own pretrained cfg."""
    kind = "timm_clip" if "_timm_clip_" in variant else "clip"
    base, _, size_options = _TOWERS[variant.replace(f"_{kind}_", "_{}_")]
    pretrained_cfg = resolve_pretrained_cfg(
        variant, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    )
    scaffold = AUTHORS_SCAFFOLD if kind == "clip" else {}
    settings = dict(_TOWER_SETTINGS, img_size=pretrained_cfg.input_size[-1], **scaffold, **size_options) | kwargs
    return timm.create_model(base, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **settings)


@register_model
def vit_kope_tiny_patch16_clip_64(pretrained: bool = False, **kwargs) -> nn.Module:
    """The authors' KoPE CLIP tower at ViT-Ti/16 size, 64 px (CPU demos and tests)."""
    return _create_clip_tower("vit_kope_tiny_patch16_clip_64", pretrained, **kwargs)


@register_model
def vit_kope_demo_patch8_clip_64(pretrained: bool = False, **kwargs) -> nn.Module:
    """The authors' KoPE CLIP tower, 2 blocks 64 wide with patch 8 at 64 px (the demo pipeline's)."""
    return _create_clip_tower("vit_kope_demo_patch8_clip_64", pretrained, **kwargs)


@register_model
def vit_kope_small_patch16_clip_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """The authors' KoPE CLIP tower at ViT-S/16 size, 224 px."""
    return _create_clip_tower("vit_kope_small_patch16_clip_224", pretrained, **kwargs)


@register_model
def vit_kope_base_patch16_clip_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """The authors' ViT-KoPE-B-16 vision tower: ViT-B/16 at 224 px (the paper's CLIP tower)."""
    return _create_clip_tower("vit_kope_base_patch16_clip_224", pretrained, **kwargs)


@register_model
def vit_kope_tiny_patch16_timm_clip_64(pretrained: bool = False, **kwargs) -> nn.Module:
    """The timm KoPE ViT-Ti/16 as a CLIP tower at 64 px (no pre-norm, eps 1e-6, patch bias)."""
    return _create_clip_tower("vit_kope_tiny_patch16_timm_clip_64", pretrained, **kwargs)


@register_model
def vit_kope_demo_patch8_timm_clip_64(pretrained: bool = False, **kwargs) -> nn.Module:
    """The timm KoPE demo ViT/8 (2 blocks, 64 wide) as a CLIP tower at 64 px."""
    return _create_clip_tower("vit_kope_demo_patch8_timm_clip_64", pretrained, **kwargs)


@register_model
def vit_kope_small_patch16_timm_clip_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """The timm KoPE ViT-S/16 as a CLIP tower at 224 px."""
    return _create_clip_tower("vit_kope_small_patch16_timm_clip_224", pretrained, **kwargs)


@register_model
def vit_kope_base_patch16_timm_clip_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """The timm KoPE ViT-B/16 as a CLIP tower at 224 px."""
    return _create_clip_tower("vit_kope_base_patch16_timm_clip_224", pretrained, **kwargs)


def kope_clip_config_names() -> list[str]:
    """Names of the KoPE open_clip configs shipped with the package (``ViT-KoPE-B-16``, …)."""
    return sorted(path.stem for path in OPEN_CLIP_CONFIG_DIR.glob("*.json"))


def register_open_clip_configs() -> list[str]:
    """Add the KoPE configs to open_clip's registry (once) and return their names."""
    import open_clip

    names = kope_clip_config_names()
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
    return names


def create_kope_clip(name: str, **kwargs: Any):
    """``(model, preprocess_train, preprocess_val, tokenizer)`` for an open_clip config name.

    ``name`` is a KoPE config (``ViT-KoPE-B-16``) or any other open_clip config (for baselines); ``kwargs``
    go to ``open_clip.create_model_and_transforms`` (``pretrained=PATH`` loads a ``{"state_dict": ...}``
    checkpoint, ``precision``, ``device``, ``aug_cfg``, ...).
    """
    import open_clip

    kope_names = register_open_clip_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model config {name!r}; the KoPE configs are {', '.join(kope_names)}")
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name, **kwargs)
    tokenizer = open_clip.get_tokenizer(name, context_length=kwargs.get("force_context_length"))
    return model, preprocess_train, preprocess_val, tokenizer
