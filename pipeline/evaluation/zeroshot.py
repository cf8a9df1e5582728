"""Zero-shot classification with a CLIP model: class text embeddings from names and prompt templates.

Class names come from open_clip's ImageNet list for 1000-class ImageNet datasets, from the dataset's class
index otherwise, or from a names file (one line per class in class-index order; several names for one class
separated by `` | `` are averaged, like templates). Templates are open_clip's OpenAI ImageNet prompts by
default, or any ``str.format`` strings with one ``{}`` for the name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core.errors import KopeError
from pipeline.evaluation.settings import TEMPLATE_SETS

SYNONYM_SEPARATOR = " | "


def templates_by_name(name: str) -> tuple[Callable[[str], str], ...]:
    """open_clip's template sets: ``openai_imagenet`` (80 prompts) or ``simple_imagenet`` (7 prompts)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}
    if name not in sets:
        raise KopeError(f"unknown template set {name!r}; choose one of {', '.join(TEMPLATE_SETS)} or list templates")
    return tuple(sets[name])


def read_classnames(path: Path, num_classes: int) -> list[list[str]]:
    """Names per class from a file with one line per class (``a | b`` gives two names for one class)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != num_classes:
        raise KopeError(f"{path}: {len(lines)} class names for a dataset of {num_classes} classes")
    return [[name.strip() for name in line.split(SYNONYM_SEPARATOR.strip()) if name.strip()] for line in lines]


def default_classnames(dataset_names: Sequence[str]) -> list[list[str]]:
    """open_clip's ImageNet names for a 1000-class dataset (ImageNet order), else the dataset's own names."""
    if len(dataset_names) == 1000:
        from open_clip import IMAGENET_CLASSNAMES

        return [[name] for name in IMAGENET_CLASSNAMES]
    return [[name] for name in dataset_names]


@torch.no_grad()
def zero_shot_weights(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[Sequence[str]],
    templates: Sequence[Callable[[str], str] | str],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(D, C)`` unit-norm class embeddings: open_clip's classifier over every (class, name), averaged per class."""
    from open_clip import build_zero_shot_classifier

    flat = [name for names in classnames for name in names]
    owner = torch.tensor([i for i, names in enumerate(classnames) for _ in names], device=device)
    per_name = build_zero_shot_classifier(model, tokenizer, flat, list(templates), device=device)
    summed = torch.zeros(per_name.shape[0], len(classnames), device=per_name.device, dtype=per_name.dtype)
    summed.index_add_(1, owner, per_name)
    return F.normalize(summed, dim=0)


def zero_shot_logits(image_features: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (N×C) of normalised image features with the class embeddings."""
    return F.normalize(image_features.float(), dim=-1) @ class_weights.float().to(image_features.device)
