"""Projection heads for self-supervised training: the DINO head, also used as iBOT's patch head.

The same module serves both: it acts on the last dimension, so CLS features (B×C) give B×K scores and patch
tokens (B×N×C) give B×N×K. With ``out_dim=0`` there is no prototype layer and the head returns the
L2-normalised bottleneck, which is what coding-rate (SimDINO) losses consume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["WeightNormLinear", "DINOHead"]


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with rows ``g·v/‖v‖``; ``freeze_norm`` keeps ``g`` at 1 (unit-norm prototypes).

    Written out rather than through ``torch.nn.utils`` weight norm so parameters are plain tensors (what
    sharded optimisers expect) and the state-dict keys ``weight_g`` / ``weight_v`` match DINO checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, freeze_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_norm)
        trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU between), L2-normalised bottleneck, then prototype scores.

    Defaults follow DINO/DINOv2: 3 layers, hidden 2048, bottleneck 256, a weight-normed last layer whose
    norm is frozen (``norm_last_layer``), which stabilises early training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        mlp_bias: bool = True,
        weight_norm_last_layer: bool = True,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be at least 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out, bias=mlp_bias))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        if out_dim <= 0:
            self.last_layer: nn.Module = nn.Identity()
        elif weight_norm_last_layer:
            self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)
        else:
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
            trunc_normal_(self.last_layer.weight, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck (…×bottleneck_dim); leading dims are folded for batch norm."""
        return _l2_normalize(self.mlp(x.flatten(0, -2))).unflatten(0, x.shape[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.embed(x))
