"""The KoPE Vision Transformer: timm's ViT whose tokens carry Kuramoto phases that rotate q, k and v.

Each block mixes the incoming phases per head (``blocks.N.attn.phase_mix``), rotates q, k, v by the mixed
phases, attends, rotates the output back, and after the MLP one Kuramoto step driven by the block's output
tokens moves the phases (``coupling.*``, one module shared by all blocks). See ``pipeline.models.phase`` for
the maths and its tensor layouts.

With ``kope=False`` the model *is* timm's ``VisionTransformer`` (same modules, keys and numerics), so timm ViT
weights load strictly into it, and non-strictly into a KoPE model of the same size (only the KoPE
submodules stay at their initialisation).

Attention runs one of two ways, with the same parameters and the same maths (``fused_attention``): the plain
path (``pipeline.models.phase`` rotations around PyTorch's SDPA: the reference, and what runs on CPUs), or the
fused Triton kernel of ``pipeline.models.fused``, which rotates q, k, v as its tiles load and the output as it
is stored, so the rotations cost no pass over memory of their own. ``"auto"`` (the default) takes the fused
kernel on CUDA devices that run it and the plain path everywhere else.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, LayerNorm, LayerScale, Mlp
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from pipeline.models import phase as ph
from pipeline.models.phase import CouplingVariant, KuramotoCoupling

__all__ = ["KopeAttention", "KopeBlock", "KopeVisionTransformer"]

FusedChoice = bool | Literal["auto"]


@functools.cache
def _fused_kernels_run(head_dim: int) -> bool:
    try:
        from pipeline.models import fused  # imported only here: it builds Triton kernels
    except ImportError:
        return False
    return head_dim in fused.HEAD_DIMS and fused.available("cuda")


@torch.compiler.assume_constant_result
def fused_kernels_run_on_cuda(head_dim: int) -> bool:
    """Whether the fused kernels run on this process's CUDA device for heads of ``head_dim`` channels (decided
    once; a constant for ``torch.compile``, so the choice adds no graph break)."""
    return _fused_kernels_run(head_dim)


class KopeAttention(nn.Module):
    """Softmax self-attention on phase-rotated q, k, v; the output is rotated back before the projection.

    Submodule names match timm's ``Attention`` (``qkv``, ``proj``) so ViT weights load; the per-head phase
    mix ``M`` (H×R×R, initialised ``I + xavier_normal(gain)``) is the only extra parameter.

    ``fused_attention``: ``"auto"`` (the fused kernel on CUDA when it runs there, else the plain path), ``True``
    (always fused: on the CPU only under Triton's interpreter, for tests) or ``False`` (always plain). The fused
    kernel has no attention dropout: with ``attn_drop > 0`` training takes the plain path (``True`` refuses it).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        vo_rotation: bool = True,
        phase_mix: bool = True,
        mix_init_gain: float = 0.1,
        fused_attention: FusedChoice = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if fused_attention not in (True, False, "auto"):
            raise ValueError(f"fused_attention must be true, false or 'auto', got {fused_attention!r}")
        if fused_attention is True and attn_drop > 0:
            raise ValueError("the fused KoPE attention has no attention dropout: set attn_drop_rate 0 or "
                             "fused_attention to 'auto' or false")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attention = fused_attention
        self.vo_rotation = vo_rotation
        self.mix_init_gain = mix_init_gain
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        rot_dim = self.head_dim // 2
        self.phase_mix = nn.Parameter(torch.empty(num_heads, rot_dim, rot_dim, **dd)) if phase_mix else None
        self.init_weights()

    def init_weights(self) -> None:
        """Near-identity mix, so training starts from the plain 2-D RoPE rotation (called by timm's init)."""
        if self.phase_mix is None:
            return
        with torch.no_grad():
            nn.init.xavier_normal_(self.phase_mix, gain=self.mix_init_gain)
            self.phase_mix.add_(torch.eye(self.phase_mix.shape[-1], device=self.phase_mix.device))

    def rotation(self, z: torch.Tensor) -> torch.Tensor:
        """This block's rotation phasor e^{iψ}, ``(B|1, H|1, N, 2, R)`` fp32, from the incoming phasors."""
        return ph.split_phasor(z) if self.phase_mix is None else ph.mix_rotation(z, self.phase_mix)

    def uses_fused(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` takes the fused kernel for input ``x`` (see the class docstring)."""
        if self.fused_attention is False or (self.training and self.attn_drop > 0):
            return False
        if self.fused_attention == "auto":
            return x.is_cuda and fused_kernels_run_on_cuda(self.head_dim)
        return True

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        if self.uses_fused(x):
            from pipeline.models.fused import kope_attention

            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # views: the kernel reads the projection strided
            out = kope_attention(q, k, v, self.rotation(z).flatten(-2), rotate_vo=self.vo_rotation)
            return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))  # token-major: a view
        rot = ph.token_major(self.rotation(z), qkv.dtype)
        q, k, v = ph.rotate_qkv(qkv, rot, rotate_v=self.vo_rotation).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = ph.unrotate_heads(out, rot) if self.vo_rotation else out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def cls_attention(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first token's attention over all keys ``(B, H, N)`` and the rotation phasor, for analysis."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        rot = self.rotation(z)
        q, k, _ = ph.rotate_qkv(qkv, ph.token_major(rot, qkv.dtype), rotate_v=False).permute(2, 0, 3, 1, 4).unbind(0)
        dtype = ph.phase_dtype(q.dtype)
        logits = (q[:, :, :1].to(dtype) @ k.to(dtype).transpose(-2, -1)).squeeze(2) * self.scale
        return logits.softmax(dim=-1), rot


class KopeBlock(nn.Module):
    """Pre-norm ViT block (timm's ``Block`` layout and names) whose attention takes the token phases.

    Accepts every argument timm's ``VisionTransformer`` passes to ``block_fn``; options KoPE cannot honour
    (q/k norm, attention-output norm, a custom attention layer) are refused rather than ignored.
    ``phase_norm`` gives the block its own LayerNorm on the post-block tokens that drive the shared coupling
    (the ``vo_proj`` variant: one norm per block, the coupling's linear maps shared by all blocks).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        attn_layer: Any = Attention,
        depth: int = 0,
        vo_rotation: bool = True,
        phase_mix: bool = True,
        mix_init_gain: float = 0.1,
        phase_norm: bool = False,
        fused_attention: FusedChoice = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if qk_norm or scale_attn_norm or attn_layer not in (Attention, "", "attn"):
            raise ValueError("KoPE blocks support neither qk_norm, scale_attn_norm nor a custom attn_layer")
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = KopeAttention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            vo_rotation=vo_rotation,
            phase_mix=phase_mix,
            mix_init_gain=mix_init_gain,
            fused_attention=fused_attention,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            norm_layer=norm_layer if scale_mlp_norm else None,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.phase_norm = norm_layer(dim, **dd) if phase_norm else nn.Identity()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), z)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class KopeVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` with Kuramoto oscillatory phase encoding (all timm options still apply).

    KoPE options (the paper's ablations): ``kope`` (False: a plain timm ViT), ``kuramoto`` (False: phases stay
    at their 2-D RoPE initialisation, a RoPE ViT), ``vo_rotation`` (False: rotate q and k only),
    ``phase_mix`` (False: M = I), ``coupling`` (``"rms_qk"``, or ``"vo_proj"``: the authors' supervised
    variant, with a LayerNorm per block before the shared coupling), ``gamma`` and ``learnable_gamma`` (the
    Kuramoto step size), ``rope_base`` and ``mix_init_gain``. ``fused_attention`` picks the attention kernel
    (see :class:`KopeAttention`; results agree to float rounding). ``norm_eps`` sets the epsilon of every
    LayerNorm (timm's default 1e-6; open_clip's towers use 1e-5) by a plain number, so exported configs stay JSON.

    Beyond timm's API: ``forward_feature_dict`` (CLS, register and patch tokens plus the final patch phases)
    and ``forward_cls_attention`` (per-block CLS attention and rotation phases for analysis).
    """

    def __init__(
        self,
        kope: bool = True,
        kuramoto: bool = True,
        vo_rotation: bool = True,
        phase_mix: bool = True,
        coupling: CouplingVariant = "rms_qk",
        gamma: float = 0.05,
        learnable_gamma: bool = False,
        rope_base: float = ph.ROPE_BASE,
        mix_init_gain: float = 0.1,
        fused_attention: FusedChoice = "auto",
        norm_eps: float | None = None,
        **kwargs: Any,
    ) -> None:
        if norm_eps is not None:
            if "norm_layer" in kwargs:
                raise ValueError("give either norm_eps or norm_layer, not both")
            kwargs["norm_layer"] = partial(LayerNorm, eps=norm_eps)
        if not kope:
            super().__init__(**kwargs)
        else:
            if "block_fn" in kwargs or kwargs.get("patch_drop_rate", 0.0) > 0:
                raise ValueError("KoPE builds its own blocks and keeps every patch: no block_fn or patch_drop_rate")
            embed_dim, num_heads = kwargs.get("embed_dim", 768), kwargs.get("num_heads", 12)
            if embed_dim % num_heads or (embed_dim // num_heads) % 4:
                raise ValueError(f"KoPE needs a head dim divisible by 4: embed_dim={embed_dim}, num_heads={num_heads}")
            blocks = partial(KopeBlock, vo_rotation=vo_rotation, phase_mix=phase_mix, mix_init_gain=mix_init_gain,
                             phase_norm=kuramoto and coupling == "vo_proj", fused_attention=fused_attention)
            super().__init__(block_fn=blocks, **kwargs)
        self.kope = kope
        self.rope_base = rope_base
        self.coupling = None
        if kope and kuramoto:
            self.coupling = KuramotoCoupling(
                self.embed_dim,
                self.blocks[0].attn.num_heads,
                gamma=gamma,
                learnable_gamma=learnable_gamma,
                variant=coupling,
                device=kwargs.get("device"),
                dtype=kwargs.get("dtype"),
            )

    @property
    def rot_dim(self) -> int:
        """R: oscillators per head."""
        return self.embed_dim // self.blocks[0].attn.num_heads // 2

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = set(super().no_weight_decay())
        if self.coupling is not None and isinstance(self.coupling.gamma_raw, nn.Parameter):
            names.add("coupling.gamma_raw")
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's groups; the shared coupling belongs with the last group (it acts after every block)."""
        matcher = super().group_matcher(coarse)
        matcher["blocks"] = [(r"^blocks\.(\d+)", None), (r"^norm|^coupling\.", (99999,))]
        return matcher

    def initial_phasor(
        self, grid_size: tuple[int, int], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``(1, 1, N, 2R)`` phasors of the 2-D RoPE phases on a patch grid (prefix tokens at phase 0)."""
        theta = ph.grid_phases(
            grid_size, self.rot_dim, self.num_prefix_tokens, self.rope_base, device, ph.phase_dtype(dtype)
        )
        return ph.phasor(theta)[None, None]

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding, prefix tokens, position embedding (interpolated if dynamic) and the patch grid."""
        x = self.patch_embed(x)
        grid = (int(x.shape[1]), int(x.shape[2])) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        return x, grid

    def _start(
        self, x: torch.Tensor, initial_phases: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, grid = self._embed(x)
        if initial_phases is None:
            return tokens, self.initial_phasor(grid, tokens.device, tokens.dtype)
        theta = initial_phases.to(tokens.device, ph.phase_dtype(tokens.dtype, initial_phases.dtype))
        return tokens, ph.phasor(theta.reshape((1,) * (4 - theta.dim()) + tuple(theta.shape)))

    def _block_step(self, block: nn.Module, x: torch.Tensor, z: torch.Tensor, step: bool) -> tuple:
        x = block(x, z)
        if step and self.coupling is not None:
            z = self.coupling(block.phase_norm(x), z)
        return x, z

    def _run_block(self, block: nn.Module, x: torch.Tensor, z: torch.Tensor, step: bool = True) -> tuple:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(self._block_step, block, x, z, step)
        return self._block_step(block, x, z, step)

    def _encode(
        self, x: torch.Tensor, initial_phases: torch.Tensor | None = None, final_step: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens after the last block and the phasors (the last Kuramoto step only if ``final_step``)."""
        x, z = self._start(x, initial_phases)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, z = self._run_block(block, x, z, step=final_step or i < last)
        return x, z

    @staticmethod
    def _refuse_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
        if attn_mask is not None or is_causal:
            raise ValueError("KoPE attention does not take attention masks")

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Normalised tokens ``(B, N, C)`` (timm's contract); skips the unused Kuramoto step after the last block."""
        if not self.kope:
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        self._refuse_mask(attn_mask, is_causal)
        return self.norm(self._encode(x, final_step=False)[0])

    def forward_feature_dict(
        self, x: torch.Tensor, initial_phases: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalised ``cls_token`` (B×C, with a class token), ``register_tokens`` (B×r×C), ``patch_tokens``
        (B×P×C) and, for KoPE, the final ``patch_phases`` (B×H×P×R angles after the last Kuramoto step).

        ``initial_phases`` (angles broadcastable to B×H×N×R) replaces the 2-D RoPE initialisation.
        """
        if self.kope:
            tokens, z = self._encode(x, initial_phases)
            tokens = self.norm(tokens)
        else:
            tokens, z = super().forward_features(x), None
        start = int(self.has_class_token)
        out = {
            "register_tokens": tokens[:, start : self.num_prefix_tokens],
            "patch_tokens": tokens[:, self.num_prefix_tokens :],
        }
        if self.has_class_token:
            out["cls_token"] = tokens[:, 0]
        if z is not None:
            b, p = tokens.shape[0], out["patch_tokens"].shape[1]
            patch_phases = ph.phase_angles(z[:, :, self.num_prefix_tokens :])
            out["patch_phases"] = patch_phases.expand(b, self.blocks[0].attn.num_heads, p, self.rot_dim)
        return out

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's per-block outputs (for dense heads); same arguments and return forms as timm's ViT."""
        if not self.kope:
            return super().forward_intermediates(
                x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only,
                output_dict, attn_mask, is_causal,
            )
        self._refuse_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("output_fmt must be NCHW or NLC")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch = x.shape[0]
        tokens, z = self._start(x, None)
        grid = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            tokens, z = self._run_block(block, tokens, z)
            if i in take_indices:
                intermediates.append(self.norm(tokens) if norm else tokens)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates] if self.num_prefix_tokens else None
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                result["image_features"] = self.norm(tokens)
            return result
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    @torch.no_grad()
    def forward_cls_attention(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per block, the class token's attention over all N tokens (``cls_attention``: L×B×H×N) and, for
        KoPE, the rotation phases ψ each block used (``rotation_phases``: L×B×H×N×R angles).

        A separate pass that recomputes each block's q and k, so the training forward carries no probes.
        """
        if not self.has_class_token:
            raise ValueError("CLS attention needs a model with a class token")
        if self.kope:
            tokens, z = self._start(x, None)
        else:
            tokens, z = self._embed(x)[0], None
        attention, rotations = [], []
        for block in self.blocks:
            normed = block.norm1(tokens)
            if self.kope:
                probs, rot = block.attn.cls_attention(normed, z)
                rotations.append(ph.phase_angles(rot.flatten(-2)).expand(probs.shape + (self.rot_dim,)))
                tokens, z = self._block_step(block, tokens, z, step=True)
            else:
                probs = _plain_cls_attention(block.attn, normed)
                tokens = block(tokens)
            attention.append(probs)
        out = {"cls_attention": torch.stack(attention)}
        if rotations:
            out["rotation_phases"] = torch.stack(rotations)
        return out


def _plain_cls_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """First-token attention ``(B, H, N)`` of a non-KoPE block: timm's softmax attention or an attention that
    exposes its full weights (``attention_weights``, as SSA does)."""
    if hasattr(attn, "attention_weights"):
        return attn.attention_weights(x)[:, :, 0]
    if not isinstance(attn, Attention):
        raise TypeError(f"cannot read CLS attention from {type(attn).__name__}")
    b, n, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dtype = ph.phase_dtype(q.dtype)
    return ((q[:, :, :1].to(dtype) @ k.to(dtype).transpose(-2, -1)).squeeze(2) * attn.scale).softmax(dim=-1)


def pretrained_cfg(**kwargs: Any) -> dict[str, Any]:
    """Evaluation defaults of the paper's recipes (DeiT-III style: ImageNet mean/std, crop ratio 1.0)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
REG4 = dict(reg_tokens=4, no_embed_class=True)

default_cfgs = generate_default_cfgs(
    {f"vit_kope_{size}_patch16_224{reg}": pretrained_cfg() for size in SIZES for reg in ("", "_reg4")}
)


def create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """Build through timm's builder: pretrained cfg, local weight files, pos-embed resampling, features_only."""
    strict = kwargs.pop("pretrained_strict", True)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        KopeVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=strict,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _kope(variant: str, size: str, pretrained: bool, kwargs: dict, **extra: Any) -> KopeVisionTransformer:
    return create_vit(variant, pretrained, **{"patch_size": 16, **SIZES[size], **extra, **kwargs})


@register_model
def vit_kope_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """KoPE ViT-Ti/16: 192 wide, 12 blocks, 3 heads of 32 oscillators."""
    return _kope("vit_kope_tiny_patch16_224", "tiny", pretrained, kwargs)


@register_model
def vit_kope_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """KoPE ViT-S/16: 384 wide, 12 blocks, 6 heads (22.0 M parameters without classifier)."""
    return _kope("vit_kope_small_patch16_224", "small", pretrained, kwargs)


@register_model
def vit_kope_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """KoPE ViT-B/16: 768 wide, 12 blocks, 12 heads (87.1 M parameters without classifier)."""
    return _kope("vit_kope_base_patch16_224", "base", pretrained, kwargs)


@register_model
def vit_kope_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """KoPE ViT-L/16: 1024 wide, 24 blocks, 16 heads (305.8 M parameters without classifier)."""
    return _kope("vit_kope_large_patch16_224", "large", pretrained, kwargs)


@register_model
def vit_kope_tiny_patch16_224_reg4(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """KoPE ViT-Ti/16 with 4 register tokens (the self-supervised recipes' layout)."""
    return _kope("vit_kope_tiny_patch16_224_reg4", "tiny", pretrained, kwargs, **REG4)


@register_model
def vit_kope_small_patch16_224_reg4(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """KoPE ViT-S/16 with 4 register tokens."""
    return _kope("vit_kope_small_patch16_224_reg4", "small", pretrained, kwargs, **REG4)


@register_model
def vit_kope_base_patch16_224_reg4(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """KoPE ViT-B/16 with 4 register tokens."""
    return _kope("vit_kope_base_patch16_224_reg4", "base", pretrained, kwargs, **REG4)


@register_model
def vit_kope_large_patch16_224_reg4(pretrained: bool = False, **kwargs: Any) -> KopeVisionTransformer:
    """KoPE ViT-L/16 with 4 register tokens."""
    return _kope("vit_kope_large_patch16_224_reg4", "large", pretrained, kwargs, **REG4)
