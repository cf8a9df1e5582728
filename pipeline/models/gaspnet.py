"""GASPnet: a small CNN whose units carry phases that Kuramoto dynamics align between layers.

A reconstruction of GASPnet (arXiv 2507.16674, no public code), following section 4 of the method notes.
Every unit (position, channel) holds a complex activation ``a·e^{iφ}``, stored as an amplitude and a unit
phasor ``(cos φ, sin φ)``. A layer applies one real convolution ``f`` to the real and imaginary parts and to
the amplitudes; its output amplitude is ``½|f(z)| + ½f(|z|)`` (so inputs in phase add up and inputs out of
phase cancel) and its phase is ``arg f(z)`` plus a learnt per-channel phase bias. After each layer, keys and
queries computed from the amplitudes set a row-stochastic coupling ``K[u, v] = softmax_v(q_u·k_v/√d)``
between positions, and ``T`` Kuramoto steps ``φ_u ← φ_u + η·Σ_v K[u, v]·a_v·sin(φ_v − φ_u)`` (per channel)
align the phases. The read-out pools the last layer's complex map over space (synchronised units reinforce,
desynchronised ones cancel), applies a complex dense layer and classifies from its modulus.

Inferred choices: a pixel value ``x`` enters as ``x·e^{iφ0}`` with ``φ0`` a learnt linear function of the
pixel's colour (a constant input phase would be a fixed point of the dynamics: every ``sin(φ_v − φ_u)`` would
be 0 and the couplings would get no gradient), so images are fed unnormalised in [0, 1] and black pixels are
silent units; batch norm and ReLU act on the amplitude only;
``kuramoto_steps=0`` is the same network without phase dynamics (the baseline of the paper's comparison).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["ComplexMap", "ComplexConvLayer", "KuramotoCoupling", "GASPNet"]

_RADIUS_EPS = 1e-8


class ComplexMap(NamedTuple):
    """A complex feature map ``amplitude·(cos + i·sin)``; all three are B×C×H×W (or B×C for vectors).

    The phasor is a unit vector, except at units whose complex value is 0, where it is 0 (no phase).
    """

    amplitude: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def _polar(re: torch.Tensor, im: torch.Tensor) -> ComplexMap:
    """``re + i·im`` as amplitude and phasor in fp32; the clamp keeps a zero unit at phasor 0, not NaN."""
    re, im = re.float(), im.float()
    radius = torch.sqrt(torch.clamp_min(re.square() + im.square(), _RADIUS_EPS))
    return ComplexMap(radius, re / radius, im / radius)


def _modulus_rule(re: torch.Tensor, im: torch.Tensor, of_modulus: torch.Tensor) -> ComplexMap:
    """Amplitude ``½|f(z)| + ½f(|z|)`` and the phasor of ``f(z)``."""
    z = _polar(re, im)
    return ComplexMap(0.5 * z.amplitude + 0.5 * of_modulus.float(), z.cos, z.sin)


def _rotate(cos: torch.Tensor, sin: torch.Tensor, by_cos: torch.Tensor, by_sin: torch.Tensor):
    """Phasor ``(cos, sin)`` rotated by the angle whose phasor is ``(by_cos, by_sin)``."""
    return cos * by_cos - sin * by_sin, sin * by_cos + cos * by_sin


class ComplexConvLayer(nn.Module):
    """One real conv applied to Re z, Im z and |z|; modulus rule, phase bias, batch norm and ReLU on |z|."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_chs)
        self.phase_bias = nn.Parameter(torch.zeros(out_chs))

    def forward(self, z: ComplexMap) -> ComplexMap:
        batch = z.amplitude.shape[0]
        # One conv call over the three inputs (real part, imaginary part, modulus) stacked on the batch.
        stacked = torch.cat([z.amplitude * z.cos, z.amplitude * z.sin, z.amplitude])
        out = _modulus_rule(*self.conv(stacked).split(batch))
        bias = self.phase_bias.float().view(-1, 1, 1)
        cos, sin = _rotate(out.cos, out.sin, bias.cos(), bias.sin())
        return ComplexMap(F.relu(self.norm(out.amplitude)), cos, sin)


class ComplexDense(nn.Module):
    """A dense layer on complex vectors (B×C) with the same modulus rule; only its modulus is read out."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.modulus_bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, z: ComplexMap) -> torch.Tensor:
        batch = z.amplitude.shape[0]
        stacked = torch.cat([z.amplitude * z.cos, z.amplitude * z.sin, z.amplitude])
        re, im, of_modulus = self.linear(stacked).split(batch)
        return F.relu(_modulus_rule(re, im, of_modulus + self.modulus_bias).amplitude)


class KuramotoCoupling(nn.Module):
    """Kuramoto phase dynamics between positions, coupled by keys and queries from the amplitudes.

    Channels are split into ``heads`` groups, each with its own coupling. The coupling is fixed during the
    ``steps`` updates (amplitudes do not change), and the mean field ``Σ_v K[u, v]·z_v`` is an attention
    whose values are the complex activations, so it runs on ``scaled_dot_product_attention`` without
    materialising the N×N coupling. Phase arithmetic runs in fp32 even under autocast.
    """

    def __init__(self, channels: int, heads: int = 1, key_dim: int = 32, steps: int = 3, strength: float = 0.5):
        super().__init__()
        if channels % heads:
            raise ValueError(f"KuramotoCoupling: channels={channels} is not divisible by heads={heads}")
        self.heads, self.steps, self.strength = heads, steps, strength
        self.query = nn.Conv2d(channels, heads * key_dim, 1)
        # A key bias would add the same q·b to every logit of a row: softmax ignores it.
        self.key = nn.Conv2d(channels, heads * key_dim, 1, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """B×(h·c)×H×W → B×h×(H·W)×c."""
        batch, channels = x.shape[:2]
        return x.reshape(batch, self.heads, channels // self.heads, -1).transpose(-1, -2)

    @staticmethod
    def _merge_heads(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """B×h×(H·W)×c → B×(h·c)×H×W."""
        return x.transpose(-1, -2).reshape(shape)

    def forward(self, z: ComplexMap) -> ComplexMap:
        if self.steps == 0:
            return z
        shape = z.amplitude.shape
        with torch.autocast(device_type=z.amplitude.device.type, enabled=False):
            amplitude = z.amplitude.float()
            query = self._split_heads(self.query(amplitude))
            key = self._split_heads(self.key(amplitude))
            amplitude = self._split_heads(amplitude)
            cos, sin = self._split_heads(z.cos.float()), self._split_heads(z.sin.float())
            for _ in range(self.steps):
                values = torch.cat([amplitude * cos, amplitude * sin], dim=-1)
                mean_re, mean_im = F.scaled_dot_product_attention(query, key, values).chunk(2, dim=-1)
                # Σ_v K a_v sin(φ_v − φ_u) = Im(e^{-iφ_u}·Σ_v K z_v)
                delta = self.strength * (cos * mean_im - sin * mean_re)
                cos, sin = _rotate(cos, sin, delta.cos(), delta.sin())
        return ComplexMap(z.amplitude, self._merge_heads(cos, shape), self._merge_heads(sin, shape))


class GASPNet(nn.Module):
    """Phase CNN: complex conv layers, each followed by Kuramoto coupling, then a complex dense read-out."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        hidden_dim: int = 256,
        kuramoto_steps: int = 3,
        coupling_strength: float = 0.5,
        coupling_heads: int = 1,
        key_dim: int = 32,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = hidden_dim
        self.input_phase = nn.Conv2d(in_chans, in_chans, 1)
        nn.init.normal_(self.input_phase.weight)
        nn.init.zeros_(self.input_phase.bias)
        chs = (in_chans, *widths)
        self.layers = nn.ModuleList(ComplexConvLayer(cin, cout) for cin, cout in zip(chs[:-1], chs[1:]))
        self.couplings = nn.ModuleList(
            KuramotoCoupling(width, coupling_heads, key_dim, kuramoto_steps, coupling_strength) for width in widths
        )
        self.dense = ComplexDense(widths[-1], hidden_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_layers(self, x: torch.Tensor) -> list[ComplexMap]:
        """Each layer's complex map after its Kuramoto steps (amplitudes and phases, for analysis)."""
        phase, sign = self.input_phase(x).float(), torch.sign(x).float()
        z = ComplexMap(x.abs().float(), sign * phase.cos(), sign * phase.sin())
        maps = []
        for layer, coupling in zip(self.layers, self.couplings):
            z = coupling(layer(z))
            maps.append(z)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Modulus of the dense layer applied to the spatially pooled complex map of the last layer (B×D)."""
        z = self.forward_layers(x)[-1]
        return self.dense(_polar((z.amplitude * z.cos).mean((2, 3)), (z.amplitude * z.sin).mean((2, 3))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier; pooling is fixed (complex mean over space), so ``global_pool`` is ignored."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _cfg() -> dict:
    """Pixels in [0, 1], unnormalised: a pixel's value is its unit's amplitude (black is silent)."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 64, 64),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "layers.0.conv",
        "classifier": "head",
    }


default_cfgs = generate_default_cfgs({"gaspnet_tiny": _cfg(), "gaspnet_small": _cfg()})


def _create_gaspnet(variant: str, pretrained: bool = False, **kwargs) -> GASPNet:
    return build_model_with_cfg(GASPNet, variant, pretrained, **kwargs)


@register_model
def gaspnet_tiny(pretrained: bool = False, **kwargs) -> GASPNet:
    """GASPnet with 32/64/128 channels and a 256-d read-out (about 0.15 M parameters)."""
    return _create_gaspnet("gaspnet_tiny", pretrained, **dict(widths=(32, 64, 128), hidden_dim=256) | kwargs)


@register_model
def gaspnet_small(pretrained: bool = False, **kwargs) -> GASPNet:
    """GASPnet with 64/128/256 channels and a 512-d read-out (about 0.6 M parameters)."""
    return _create_gaspnet("gaspnet_small", pretrained, **dict(widths=(64, 128, 256), hidden_dim=512) | kwargs)
