"""Semantic segmentation on a timm ViT backbone (KoPE or plain): SETR-PUP (the head the KoPE paper uses on
ADE20K) and a linear head, with SETR's auxiliary heads on earlier blocks.

Both heads are ours: mmsegmentation ships ``SETRUPHead`` but cannot be imported without mmcv's compiled ops
(there is no mmcv build for our torch), and segmentation-models-pytorch's only ViT decoder is DPT; neither
ships a linear head. They follow mmseg's definitions:

* ``setr_pup``: a LayerNorm on the block's patch tokens, then ``num_convs`` times (3×3 conv without bias,
  BatchNorm, ReLU, ×2 bilinear upsampling), then a 1×1 classifier (initialised N(0, 0.01)); by default as many
  upsamplings as the patch size needs (4 for 16-pixel patches). SETR-PUP's auxiliary heads are the same with
  ``aux_convs`` convolutions on the other ``out_indices`` blocks, trained with weight ``aux_weight`` each.
* ``linear``: BatchNorm and a 1×1 classifier on the last block's patch tokens (DINOv2's linear baseline).

Logits are upsampled bilinearly to the input size. The backbone runs with ``dynamic_img_size`` so any input
whose sides are multiples of the patch size works (whole-image inference); KoPE's final patch phases come
from :meth:`Segmenter.patch_phases` for the paper's phase maps.

An exported segmenter is ``segmenter.json`` (everything :func:`create_segmenter` needs, the class names and the
preprocessing) + ``model.safetensors``; :func:`load_segmenter` rebuilds it from this package and timm alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import kope_vit  # noqa: F401  (registers the vit_kope_* models)

HeadKind = Literal["setr_pup", "linear"]
SEGMENTER_FILE = "segmenter.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "kope-segmenter/1"


@dataclass
class SegmenterConfig:
    """What builds a segmenter: the backbone's timm name and arguments, and the heads."""

    backbone: str
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 150
    head: HeadKind = "setr_pup"
    out_indices: list[int] = field(default_factory=lambda: [-1])
    channels: int = 256
    num_convs: int = 0  # 0: log2 of the patch size
    aux_convs: int = 2
    aux_weight: float = 0.4
    dropout: float = 0.0


class SetrPupHead(nn.Module):
    """SETR's progressive-upsampling head (mmseg ``SETRUPHead``) on NCHW patch features."""

    def __init__(self, in_dim: int, num_classes: int, channels: int, num_convs: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        layers: list[nn.Module] = []
        for index in range(num_convs):
            layers += [nn.Conv2d(in_dim if index == 0 else channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
        self.up = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels if num_convs else in_dim, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.classifier(self.dropout(self.up(x)))


class LinearHead(nn.Module):
    """BatchNorm and a 1×1 classifier on NCHW patch features."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(in_dim, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(features)))


class Segmenter(nn.Module):
    """A ViT backbone with a decode head (and auxiliary heads). ``forward`` returns ``{"out": logits}`` at the
    input's size, plus ``"aux"`` (a list of logits) in training mode when there are auxiliary heads."""

    def __init__(self, backbone: nn.Module, config: SegmenterConfig):
        super().__init__()
        self.config = config
        self.backbone = backbone
        depth = len(backbone.blocks)
        self.out_indices = [index % depth for index in config.out_indices]
        dim = backbone.embed_dim
        patch = backbone.patch_embed.patch_size[0]
        convs = config.num_convs or max(int(math.log2(patch)), 1)
        if config.head == "setr_pup":
            self.decode_head: nn.Module = SetrPupHead(dim, config.num_classes, config.channels, convs, config.dropout)
            aux = [SetrPupHead(dim, config.num_classes, config.channels, config.aux_convs, config.dropout)
                   for _ in self.out_indices[:-1]] if config.aux_weight > 0 else []
        else:
            self.decode_head = LinearHead(dim, config.num_classes, config.dropout)
            aux = []
        self.auxiliary_heads = nn.ModuleList(aux)

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        features = self.backbone.forward_intermediates(images, indices=self.out_indices, intermediates_only=True)
        size = images.shape[-2:]
        out: dict[str, Any] = {"out": _upsample(self.decode_head(features[-1]), size)}
        if self.training and len(self.auxiliary_heads):
            out["aux"] = [_upsample(head(feature), size) for head, feature in zip(self.auxiliary_heads, features)]
        return out

    @torch.no_grad()
    def patch_phases(self, images: torch.Tensor) -> torch.Tensor | None:
        """KoPE's final patch phases (B × heads × patches × oscillators, radians); ``None`` for other backbones."""
        if not getattr(self.backbone, "kope", False) or getattr(self.backbone, "coupling", None) is None:
            return None
        return self.backbone.forward_feature_dict(images).get("patch_phases")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else ()
        return {f"backbone.{name}" for name in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's layer groups under ``backbone.``; the heads come after all of them (layer decay)."""
        def prefixed(pattern: str) -> str:
            return rf"^backbone\.(?:{pattern.replace('^', '')})"

        matcher = {}
        for group, spec in self.backbone.group_matcher(coarse).items():
            matcher[group] = prefixed(spec) if isinstance(spec, str) else [(prefixed(p), s) for p, s in spec]
        return matcher


def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def backbone_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Backbone arguments for segmentation: no classifier, any input size."""
    return {**kwargs, "num_classes": 0, "dynamic_img_size": True}


def create_segmenter(config: SegmenterConfig, backbone: nn.Module | None = None) -> Segmenter:
    """A segmenter with freshly initialised weights, or around ``backbone`` (built elsewhere, e.g. with
    pretrained weights from an export folder)."""
    if backbone is None:
        backbone = timm.create_model(config.backbone, pretrained=False, **backbone_kwargs(config.backbone_kwargs))
    return Segmenter(backbone, config)


def segmenter_description(config: SegmenterConfig, classes: list[str], preprocess: dict[str, Any]) -> dict[str, Any]:
    """The content of ``segmenter.json``."""
    return {"format": FORMAT, "model": asdict(config), "classes": list(classes), "preprocess": preprocess}


def load_segmenter(folder: Path | str) -> tuple[Segmenter, dict[str, Any]]:
    """The segmenter of an export folder (in eval mode) and its description (classes, preprocessing)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / SEGMENTER_FILE
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a segmenter export)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable: {exc}") from None
    if description.get("format") != FORMAT:
        raise ValueError(f"{path}: format: expected {FORMAT!r}, got {description.get('format')!r}")
    model = create_segmenter(SegmenterConfig(**description["model"]))
    weights = load_file(folder / WEIGHTS_FILE)
    expected = model.state_dict()
    weights = {name: tensor.reshape(expected[name].shape) if name in expected and expected[name].dim() == 0
               else tensor for name, tensor in weights.items()}
    model.load_state_dict(weights, strict=True)
    return model.eval(), description
