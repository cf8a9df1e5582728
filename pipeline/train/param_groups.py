"""Parameter groups: which parameters get weight decay, and each parameter's learning-rate multiplier.

* No weight decay on 1-d parameters (norms, biases, LayerScale γ, the learnable Kuramoto step's ρ, query
  scales), nor on the names the module lists in timm's ``no_weight_decay()`` (position embeddings, class and
  register tokens, mask tokens).
* Layer-wise lr decay (BEiT/DINOv2): with timm's ``group_matcher()`` the stem is layer 0, block i layer
  i + 1, and the rest (final norm, heads, KoPE's shared coupling) the top layer; layer l gets
  ``layer_decay ** (top - l)``.
* Per-module multipliers on top, keyed by a dotted module path that may sit anywhere in a parameter's name
  (``patch_embed`` matches ``patch_embed.proj.weight`` and ``backbone.patch_embed.proj.weight``).

Each group carries ``lr_scale`` and ``wd_scale``; the engine sets ``lr = schedule · lr_scale`` and
``weight_decay = schedule · wd_scale`` before every step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from timm.models import group_parameters
from torch import nn


def no_weight_decay_names(module: nn.Module) -> set[str]:
    listed = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    return {name for name, param in module.named_parameters() if param.ndim <= 1 or name in listed}


def layer_ids(module: nn.Module) -> tuple[dict[str, int], int]:
    """(layer of every parameter, number of layers) from the module's ``group_matcher``; one layer without it."""
    names = [name for name, _ in module.named_parameters()]
    if not hasattr(module, "group_matcher"):
        return dict.fromkeys(names, 0), 1
    mapping = group_parameters(module, module.group_matcher(coarse=False), reverse=True)
    top = max(mapping.values()) if mapping else 0
    return {name: mapping.get(name, top) for name in names}, top + 1


def _multiplier(name: str, multipliers: Mapping[str, float]) -> float:
    scale = 1.0
    for path, factor in multipliers.items():
        if re.search(rf"(^|\.){re.escape(path)}\.", name):
            scale *= factor
    return scale


def build_param_groups(module: nn.Module, layer_decay: float = 1.0,
                       lr_multipliers: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Groups of trainable parameters sharing (lr_scale, wd_scale), each with its ``names`` for logging."""
    multipliers = dict(lr_multipliers or {})
    unknown = [path for path in multipliers
               if not any(re.search(rf"(^|\.){re.escape(path)}\.", name) for name, _ in module.named_parameters())]
    if unknown:
        raise ValueError(f"optim.lr_multipliers: no parameter lies under {', '.join(map(repr, unknown))}")
    no_decay = no_weight_decay_names(module)
    layers, count = layer_ids(module) if layer_decay != 1.0 else ({}, 1)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lr_scale = layer_decay ** (count - 1 - layers.get(name, count - 1)) * _multiplier(name, multipliers)
        wd_scale = 0.0 if name in no_decay else 1.0
        group = groups.setdefault((lr_scale, wd_scale), {"params": [], "names": [], "lr_scale": lr_scale,
                                                         "wd_scale": wd_scale})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def describe_groups(groups: list[dict[str, Any]]) -> str:
    """One line per group for the log: scales, tensor and element counts, a few names."""
    lines = []
    for group in sorted(groups, key=lambda g: (-g["lr_scale"], -g["wd_scale"])):
        count = sum(p.numel() for p in group["params"])
        names = ", ".join(group["names"][:3]) + (", ..." if len(group["names"]) > 3 else "")
        lines.append(f"lr x{group['lr_scale']:.4g} wd x{group['wd_scale']:g}: {len(group['params'])} tensors, "
                     f"{count:,} values ({names})")
    return "\n".join(lines)
