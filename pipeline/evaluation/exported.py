"""Load an export folder for evaluation, with the calls a downstream user would make.

A folder with ``open_clip_config.json`` is a CLIP model (loaded with open_clip, features are its normalised
image embeddings); otherwise ``config.json`` is a timm model (features are its pre-logits, the class token
for KoPE/ViT models, and its classifier gives logits when it has one). The evaluated weights are identified
by the sha256 of the weights file, read from ``SHA256SUMS`` when present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import KopeError
from pipeline.core.fsutil import sha256_file
from pipeline.export import open_clip_format, timm_format
from pipeline.export.checksums import SUMS_FILE, read_checksums


@dataclass
class EvalModel:
    """An exported model ready for evaluation (eval mode, on ``device``)."""

    kind: str
    model: nn.Module
    transform: Callable[[Any], torch.Tensor]
    weights_sha256: str
    path: Path
    device: torch.device
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    @property
    def backbone(self) -> nn.Module:
        """The vision transformer itself (the timm trunk of an open_clip tower)."""
        if self.kind == "open_clip":
            return getattr(self.model.visual, "trunk", self.model.visual)
        return self.model

    @property
    def num_classes(self) -> int:
        return 0 if self.kind == "open_clip" else int(getattr(self.model, "num_classes", 0))

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per image, the features k-NN and linear probes use and, with a classifier, the class logits."""
        images = images.to(self.device, non_blocking=True)
        with _autocast(self.device):
            if self.kind == "open_clip":
                return self.model.encode_image(images, normalize=True).float(), None
            tokens = self.model.forward_features(images)
            features = self.model.forward_head(tokens, pre_logits=True).float()
            logits = self.model.forward_head(tokens).float() if self.num_classes else None
        return features, logits


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def weights_sha256(folder: Path, weights_file: str) -> str:
    """The recorded sha256 of the weights file (``SHA256SUMS``), or a fresh hash when none is recorded."""
    if (folder / SUMS_FILE).is_file():
        recorded = read_checksums(folder).get(weights_file)
        if recorded:
            return recorded
    return sha256_file(folder / weights_file)


def load_export(folder: Path, device: torch.device | str = "cpu") -> EvalModel:
    """Load ``folder`` (written by the export or finetune stage) with timm's or open_clip's own call."""
    import pipeline.models  # noqa: F401  (registers the KoPE models both libraries build)

    folder = Path(folder)
    device = torch.device(device)
    if (folder / open_clip_format.CONFIG_FILE).is_file():
        import open_clip

        model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        kind, weights = "open_clip", open_clip_format.WEIGHTS_FILE
    elif (folder / timm_format.CONFIG_FILE).is_file():
        import timm

        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        config = timm.data.resolve_data_config(model=model)
        transform, tokenizer = timm.data.create_transform(**config, is_training=False), None
        kind, weights = "timm", timm_format.WEIGHTS_FILE
    else:
        raise KopeError(f"{folder}: not an export folder (no {timm_format.CONFIG_FILE} or "
                        f"{open_clip_format.CONFIG_FILE})")
    model = model.to(device).eval()
    return EvalModel(kind, model, transform, weights_sha256(folder, weights), folder, device, tokenizer)
