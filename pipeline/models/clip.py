"""KoPE ViTs as open_clip vision towers, built through open_clip's own model-config mechanism.

open_clip builds a timm vision tower from ``vision_cfg.timm_model_name`` alone: it passes no extra timm
arguments (only drop-path and patch-drop rates) and not even the image size. So the KoPE settings a CLIP
tower needs are carried by timm names registered here, ``vit_kope_{tiny,small,base}_patch16_clip_*``:
each builds the matching ``vit_kope_*`` model with γ fixed (the paper's CLIP recipe), the tower's input size
and no classifier. The JSON configs beside this module (``open_clip_configs/ViT-KoPE-*.json``) name those
towers next to open_clip's own text tower; ``register_open_clip_configs`` adds them to open_clip's registry.

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


default_cfgs = generate_default_cfgs(
    {
        "vit_kope_tiny_patch16_clip_64": _cfg(64),
        "vit_kope_demo_patch8_clip_64": _cfg(64),
        "vit_kope_small_patch16_clip_224": _cfg(224),
        "vit_kope_base_patch16_clip_224": _cfg(224),
    }
)


def _create_clip_tower(variant: str, base: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build ``base`` (a registered KoPE ViT) with the tower's settings and its own pretrained cfg."""
    pretrained_cfg = resolve_pretrained_cfg(
        variant, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    )
    settings = dict(_TOWER_SETTINGS, img_size=pretrained_cfg.input_size[-1]) | kwargs
    return timm.create_model(base, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **settings)


@register_model
def vit_kope_tiny_patch16_clip_64(pretrained: bool = False, **kwargs) -> nn.Module:
    """KoPE ViT-Ti/16 CLIP tower at 64 px (CPU demos and tests)."""
    return _create_clip_tower("vit_kope_tiny_patch16_clip_64", "vit_kope_tiny_patch16_224", pretrained, **kwargs)


@register_model
def vit_kope_demo_patch8_clip_64(pretrained: bool = False, **kwargs) -> nn.Module:
    """A 2-block, 64-wide KoPE ViT/8 CLIP tower at 64 px: small enough to learn the demo data in minutes on a CPU."""
    demo = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2} | kwargs
    return _create_clip_tower("vit_kope_demo_patch8_clip_64", "vit_kope_tiny_patch16_224", pretrained, **demo)


@register_model
def vit_kope_small_patch16_clip_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """KoPE ViT-S/16 CLIP tower at 224 px."""
    return _create_clip_tower("vit_kope_small_patch16_clip_224", "vit_kope_small_patch16_224", pretrained, **kwargs)


@register_model
def vit_kope_base_patch16_clip_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """KoPE ViT-B/16 CLIP tower at 224 px (the paper's CLIP vision tower)."""
    return _create_clip_tower("vit_kope_base_patch16_clip_224", "vit_kope_base_patch16_224", pretrained, **kwargs)


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
