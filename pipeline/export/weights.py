"""Which weights to export: the trained (student) weights or their average (EMA, DINO teacher), and which part.

A training task keeps its averaged copy of the engine module in the checkpoint's client state (the
supervised EMA, the DINO teacher). ``WeightsLayout`` says where that copy lives and under which prefix the
backbone sits in the module's state dict (``backbone.`` in the DINO student, ``visual.trunk.`` in an
open_clip model with a timm tower).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.export.safe_load import CheckpointError

WeightsChoice = Literal["auto", "averaged", "trained"]
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightsLayout:
    """Where a mode's weights live: the backbone's prefix and the client-state path of the averaged copy."""

    backbone_prefix: str = ""
    averaged_path: tuple[str, ...] = ()
    averaged_name: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightsLayout:
        path = data.get("averaged_path", ())
        path = tuple(path.split("/")) if isinstance(path, str) and path else tuple(path or ())
        return cls(str(data.get("backbone_prefix", "")), path, str(data.get("averaged_name", "")))


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _matching(averaged: Mapping[str, Any], trained: Mapping[str, torch.Tensor]) -> StateDict | None:
    """``averaged`` under the trained state dict's names (an EMA wrapper may add ``module.``), completed with
    the trained tensors it does not average (integer buffers), or None when the names do not match."""
    tensors = {name: value for name, value in averaged.items() if isinstance(value, torch.Tensor)}
    for prefix in ("", "module."):
        renamed = {name.removeprefix(prefix): value for name, value in tensors.items() if name.startswith(prefix)}
        unaveraged = set(trained) - set(renamed)
        if renamed and set(renamed) <= set(trained) and all(_is_integer(trained[name]) for name in unaveraged):
            return {name: renamed.get(name, trained[name]) for name in trained}
    return None


def _is_integer(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point()


def select_weights(
    trained: StateDict, client_state: Mapping[str, Any], layout: WeightsLayout, choice: WeightsChoice = "auto"
) -> tuple[StateDict, str]:
    """The full module state dict to export and its name (``trained`` or the averaged copy's name).

    ``auto`` takes the averaged copy when the checkpoint has one; ``averaged`` requires it.
    """
    if choice == "trained":
        return trained, "trained"
    averaged = _lookup(client_state, layout.averaged_path) if layout.averaged_path else None
    if averaged is None:
        if choice == "averaged":
            where = "/".join(layout.averaged_path) or "(this mode keeps none)"
            raise CheckpointError(f"weights: averaged requested, but the checkpoint has no averaged weights at {where}")
        return trained, "trained"
    if not isinstance(averaged, Mapping):
        raise CheckpointError(f"client state {'/'.join(layout.averaged_path)}: expected a state dict")
    renamed = _matching(averaged, trained)
    if renamed is None:
        raise CheckpointError(
            f"client state {'/'.join(layout.averaged_path)}: its {len(averaged)} tensors do not match the "
            f"{len(trained)} trained tensors by name"
        )
    full = {name: (tensor.detach().float() if tensor.is_floating_point() else tensor.detach()) for name, tensor in
            renamed.items()}
    return full, layout.averaged_name or "averaged"


def backbone_state_dict(state_dict: StateDict, prefix: str) -> StateDict:
    """The tensors below ``prefix``, renamed without it (all of them when the prefix is empty)."""
    if not prefix:
        return dict(state_dict)
    selected = {name[len(prefix):]: tensor for name, tensor in state_dict.items() if name.startswith(prefix)}
    if not selected:
        raise CheckpointError(f"no weights below prefix {prefix!r} in the checkpoint")
    return selected
