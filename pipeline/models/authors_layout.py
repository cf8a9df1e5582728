"""The KoPE authors' checkpoint layouts and explicit key maps between them and our models (both directions).

Three layouts, written from the authors' code (github.com/microsoft/Neuro-inspired_Phase_Encoding):

- ``supervised``: their DINOv2-style ``DinoVisionTransformerKoPE`` backbone plus a linear head, released as
  ``{"backbone": ..., "head": {"weight", "bias"}, "meta": {...}}`` (their ``convert_supervised_checkpoint.py``;
  ``meta`` holds the trainer's KoPE switches). Ours: ``vit_kope_{size}_patch16_224``.
- ``simdino``: the same backbone class, as the SimDINOv2 teacher ``{"teacher": {"backbone.…", "dino_head.…",
  "ibot_head.…"}}``, its blocks possibly chunked (``blocks.<chunk>.<block>.``). Ours: the backbone only,
  ``vit_kope_{size}_patch16_224_reg4`` when it has 4 registers.
- ``open_clip``: their open_clip ``CLIP`` with the KoPE ``VisionTransformer`` tower (``visual.conv1``,
  ``visual.transformer.resblocks.N``, ``visual.transformer.shared_phase_coupling``, ``visual.proj``); the text
  tower is open_clip's own. Ours: the open_clip config ``ViT-KoPE-B-16`` (or a smaller one), whose timm tower
  is the authors' scaffold (``norm_pre`` = their ``ln_pre``, eps 1e-5, no patch bias).

Every tensor of ours comes from a named rule, and every tensor of theirs is either used by a rule or listed
as dropped on purpose (``mask_token``, the SimDINO heads); anything else, a missing key or a shape that does
not fit fails with one line. What is not a plain copy:

- q and k of the shared coupling are two linear maps in theirs, one fused ``coupling.qk`` in ours;
- a fixed γ is a buffer per block in theirs (``blocks.N.phase_gamma``, all equal), ``coupling.gamma_raw`` with
  ``γ = min(softplus(raw), 1)`` in ours; a learnable γ is the same raw parameter (``…_gamma._raw``);
- with registers, their CLS token has a position-embedding row and ours none (``no_embed_class``): the row
  is folded into ``cls_token`` (and comes back as a zero row);
- the open_clip tower keeps its phasors as interleaved ``(cos, sin)`` pairs and ours as ``[cos | sin]``:
  equivalent for the ``rms_qk`` coupling it uses (the phasors are the attention values, channel by channel).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pipeline.models.phase import bounded_softplus, inverse_softplus

__all__ = ["FORMATS", "LayoutError", "OurModel", "read_release", "model_for", "from_authors", "to_authors"]

Format = Literal["supervised", "simdino", "open_clip"]
FORMATS: tuple[str, ...] = ("supervised", "simdino", "open_clip")
StateDict = dict[str, torch.Tensor]

SIZES = {(384, 12): "small", (768, 12): "base", (1024, 24): "large"}
"""(width, depth) of the authors' backbones we have names for."""

DROPPED = {
    "supervised": (r"mask_token",),
    "simdino": (r"mask_token", r"dino_head\..*", r"ibot_head\..*"),
    "open_clip": (),
}
"""Their tensors that have no counterpart in an exported model: the iBOT mask token and the SimDINO heads."""

WRAPPERS = ("module.", "_orig_mod.")
"""Prefixes DDP and torch.compile put in front of every key."""


class LayoutError(ValueError):
    """A checkpoint that does not fit the layout or our model; the message is one line naming the key."""


@dataclass
class OurModel:
    """What to build (``library``, ``name``, ``kwargs``) and the settings the map needs."""

    library: Literal["timm", "open_clip"]
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    gamma: float = 0.05
    """The fixed step size where the checkpoint holds none (the open_clip tower takes it from its config)."""
    registers: int = 0
    unit_q_scale: bool = False
    """Their coupling RMS-normalises q and k without a learnt query scale: ours gets a scale of ones."""

    def build(self, device: Any = None) -> torch.nn.Module:
        """A freshly initialised model of ours (``device="meta"`` to read names and shapes only)."""
        import pipeline.models  # noqa: F401  (registers the KoPE models and towers)

        with torch.device(device or "cpu"):
            if self.library == "timm":
                import timm

                return timm.create_model(self.name, pretrained=False, **self.kwargs)
            import open_clip

            from pipeline.models.clip import register_open_clip_configs

            register_open_clip_configs()
            return open_clip.create_model(self.name, pretrained=None, device=device or "cpu", **self.kwargs)


# --- the rules ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Our key (a regex whose groups fill ``theirs``) from their keys, and back."""

    ours: str
    theirs: tuple[str, ...]
    forward: Callable[..., torch.Tensor] = lambda t: t
    backward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = lambda t: (t,)


def _copy(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,))


def _reshape(ours: str, theirs: str, their_shape: Callable[[torch.Tensor], tuple[int, ...]],
             our_shape: Callable[[torch.Tensor], tuple[int, ...]]) -> Rule:
    return Rule(ours, (theirs,), lambda t: t.reshape(our_shape(t)), lambda t: (t.reshape(their_shape(t)),))


def _fused_qk(ours: str, q: str, k: str) -> Rule:
    return Rule(ours, (q, k), lambda a, b: torch.cat((a, b), dim=0), lambda t: tuple(t.chunk(2, dim=0)))


def _block_rules(ours: str, theirs: str, names: Mapping[str, str]) -> list[Rule]:
    """Per-block copies: ``{ours}.N.<our name>`` from ``{theirs}.N.<their name>``."""
    return [_copy(rf"{re.escape(ours)}\.(\d+)\.{re.escape(a)}", f"{theirs}.{{0}}.{b}") for a, b in names.items()]


DINO_BLOCK = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
    "attn.phase_mix": "attn.kope_mix_coef",
    "ls1.gamma": "ls1.gamma", "ls2.gamma": "ls2.gamma",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "phase_norm.weight": "phase_norm.weight", "phase_norm.bias": "phase_norm.bias",
}
"""Our ``blocks.N.*`` from their ``DinoVisionTransformerKoPE`` ``blocks.N.*``."""

CLIP_BLOCK = {
    "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj.weight": "attn.out_proj.weight", "attn.proj.bias": "attn.out_proj.bias",
    "attn.phase_mix": "attn.kope_mix_coef",
    "ls1.gamma": "ls_1.gamma", "ls2.gamma": "ls_2.gamma",
    "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
"""Our tower's ``blocks.N.*`` from their open_clip ``transformer.resblocks.N.*``."""


def _coupling_rules(ours: str, theirs: str, learnable_raw: str) -> list[Rule]:
    return [
        _fused_qk(rf"{re.escape(ours)}\.qk\.weight", f"{theirs}.q_proj.weight", f"{theirs}.k_proj.weight"),
        _fused_qk(rf"{re.escape(ours)}\.qk\.bias", f"{theirs}.q_proj.bias", f"{theirs}.k_proj.bias"),
        _reshape(rf"{re.escape(ours)}\.q_scale", f"{theirs}.qk_scale", lambda t: (1, 1, *t.shape),
                 lambda t: t.shape[2:]),
        _copy(rf"{re.escape(ours)}\.v\.weight", f"{theirs}.v_proj.weight"),
        _copy(rf"{re.escape(ours)}\.v\.bias", f"{theirs}.v_proj.bias"),
        _copy(rf"{re.escape(ours)}\.o\.weight", f"{theirs}.o_proj.weight"),
        _copy(rf"{re.escape(ours)}\.o\.bias", f"{theirs}.o_proj.bias"),
        _reshape(rf"{re.escape(ours)}\.gamma_raw", learnable_raw, lambda t: (1,), lambda t: ()),
    ]


def _backbone_rules(registers: int) -> list[Rule]:
    def fold(cls: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return cls + pos[:, :1]

    def unfold(cls: torch.Tensor) -> tuple[torch.Tensor]:
        return (cls,)

    rules = [
        _copy(r"patch_embed\.proj\.weight", "patch_embed.proj.weight"),
        _copy(r"patch_embed\.proj\.bias", "patch_embed.proj.bias"),
        _copy(r"reg_token", "register_tokens"),
        _copy(r"norm\.weight", "norm.weight"),
        _copy(r"norm\.bias", "norm.bias"),
        _copy(r"head\.weight", "head.weight"),
        _copy(r"head\.bias", "head.bias"),
        *_block_rules("blocks", "blocks", DINO_BLOCK),
        *_coupling_rules("coupling", "shared_phase_coupling", "shared_phase_coupling_gamma._raw"),
    ]
    if registers:  # their CLS row folded into our cls_token; our pos_embed covers the patches only
        rules += [Rule(r"cls_token", ("cls_token", "pos_embed"), fold, unfold),
                  Rule(r"pos_embed", ("pos_embed",), lambda pos: pos[:, 1:],
                       lambda pos: (torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1),))]
    else:
        rules += [_copy(r"cls_token", "cls_token"), _copy(r"pos_embed", "pos_embed")]
    return rules


def _open_clip_rules() -> list[Rule]:
    tower, theirs = "visual.trunk", "visual.transformer"
    return [
        _copy(r"visual\.trunk\.patch_embed\.proj\.weight", "visual.conv1.weight"),
        _reshape(r"visual\.trunk\.cls_token", "visual.class_embedding", lambda t: t.shape[-1:],
                 lambda t: (1, 1, t.shape[-1])),
        _reshape(r"visual\.trunk\.pos_embed", "visual.positional_embedding", lambda t: t.shape[1:],
                 lambda t: (1, *t.shape)),
        _copy(r"visual\.trunk\.norm_pre\.weight", "visual.ln_pre.weight"),
        _copy(r"visual\.trunk\.norm_pre\.bias", "visual.ln_pre.bias"),
        _copy(r"visual\.trunk\.norm\.weight", "visual.ln_post.weight"),
        _copy(r"visual\.trunk\.norm\.bias", "visual.ln_post.bias"),
        Rule(r"visual\.head\.proj\.weight", ("visual.proj",), lambda t: t.t(), lambda t: (t.t(),)),
        *_block_rules(f"{tower}.blocks", f"{theirs}.resblocks", CLIP_BLOCK),
        *_coupling_rules(f"{tower}.coupling", f"{theirs}.shared_phase_coupling", f"{theirs}.shared_gamma_module._raw"),
        Rule(r"(?!visual\.)(.+)", ("{0}",)),  # the text tower and logit scale: open_clip's own, unchanged
    ]


# --- applying them --------------------------------------------------------------------------------------------


def _strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    out = dict(state_dict)
    for prefix in WRAPPERS:
        if out and all(key.startswith(prefix) for key in out):
            out = {key[len(prefix):]: value for key, value in out.items()}
    return out


def _unchunk_blocks(state_dict: StateDict) -> StateDict:
    """``blocks.<chunk>.<block>.…`` (FSDP block chunks) as ``blocks.<block>.…``."""
    if not any(re.match(r"blocks\.\d+\.\d+\.", key) for key in state_dict):
        return state_dict
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key): value for key, value in state_dict.items()}


def _find_rule(rules: list[Rule], key: str) -> tuple[Rule, tuple[str, ...]]:
    for rule in rules:
        match = re.fullmatch(rule.ours, key)
        if match:
            return rule, tuple(name.format(*match.groups()) for name in rule.theirs)
    raise LayoutError(f"{key}: no rule in the key map gives this tensor of our model")


def _fixed_gamma(theirs: StateDict, source: str) -> float | None:
    """The step size of their per-block ``phase_gamma`` buffers (all equal), or None without them."""
    values = {key: float(value) for key, value in theirs.items() if re.fullmatch(r"blocks\.\d+\.phase_gamma", key)}
    if not values:
        return None
    if max(values.values()) - min(values.values()) > 1e-7 * max(1.0, max(values.values())):
        raise LayoutError(f"{source}: blocks.N.phase_gamma differ between blocks ({sorted(set(values.values()))}); "
                          "our model shares one step size")
    return next(iter(values.values()))


def from_authors(fmt: Format, theirs: Mapping[str, torch.Tensor], target: OurModel, source: str = "checkpoint"
                 ) -> tuple[StateDict, list[str]]:
    """Our state dict for ``target`` from their tensors, and their keys dropped on purpose (``DROPPED``).

    One-line LayoutError on any key of ours without its tensors, any tensor of theirs no rule uses, and any
    shape that does not fit.
    """
    theirs = _strip_wrappers(theirs)
    if fmt == "simdino":
        theirs = {key.removeprefix("backbone."): value for key, value in theirs.items()}
    theirs = _unchunk_blocks(theirs) if fmt != "open_clip" else theirs
    rules = _open_clip_rules() if fmt == "open_clip" else _backbone_rules(target.registers)
    expected = target.build("meta").state_dict()
    used: set[str] = set()
    ours: StateDict = {}
    gamma = _fixed_gamma(theirs, source) if fmt != "open_clip" else None
    used |= {key for key in theirs if re.fullmatch(r"blocks\.\d+\.phase_gamma", key)}
    for key, like in expected.items():
        rule, names = _find_rule(rules, key)
        if key.endswith("coupling.gamma_raw") and names[0] not in theirs:  # a fixed γ: from the buffers or config
            value = gamma if gamma is not None else target.gamma
            ours[key] = torch.full(like.shape, inverse_softplus(value), dtype=like.dtype)
            continue
        if key.endswith("coupling.q_scale") and target.unit_q_scale:  # RMS-normed q/k without a learnt scale
            ours[key] = torch.ones(like.shape, dtype=like.dtype)
            continue
        missing = [name for name in names if name not in theirs]
        if missing:
            raise LayoutError(f"{source}: {missing[0]}: missing (our {key} is made from it)")
        tensor = rule.forward(*(theirs[name] for name in names))
        if tuple(tensor.shape) != tuple(like.shape):
            raise LayoutError(f"{source}: {names[0]}: shape {tuple(theirs[names[0]].shape)} does not fit our {key} "
                              f"{tuple(like.shape)}")
        ours[key] = tensor.detach().to(like.dtype)
        used.update(names)
    dropped = [key for key in theirs if any(re.fullmatch(pattern, key) for pattern in DROPPED[fmt])]
    unmapped = sorted(set(theirs) - used - set(dropped))
    if unmapped:
        raise LayoutError(f"{source}: {unmapped[0]}: not in the key map (a setting our model does not have?)"
                          + (f" and {len(unmapped) - 1} more" if len(unmapped) > 1 else ""))
    return ours, sorted(dropped)


def to_authors(fmt: Format, ours: Mapping[str, torch.Tensor], target: OurModel) -> StateDict:
    """Their layout of our tensors: the inverse of :func:`from_authors` (the dropped tensors come back as
    zeros, a fixed γ as one buffer per block)."""
    rules = _open_clip_rules() if fmt == "open_clip" else _backbone_rules(target.registers)
    learnable = any(isinstance(p, torch.nn.Parameter) and name.endswith("gamma_raw")
                    for name, p in target.build("meta").named_parameters())
    theirs: StateDict = {}
    for key, tensor in ours.items():
        rule, names = _find_rule(rules, key)
        if key.endswith("coupling.gamma_raw") and not learnable:
            if fmt != "open_clip":  # their fixed γ: one buffer per block; the open_clip tower's is in its config
                gamma = float(bounded_softplus(tensor.double()))
                depth = len({k.split(".")[1] for k in ours if k.startswith("blocks.")})
                theirs.update({f"blocks.{i}.phase_gamma": torch.tensor(gamma) for i in range(depth)})
            continue
        for name, value in zip(names, rule.backward(tensor)):  # the CLS fold gives back cls_token only
            theirs.setdefault(name, value.clone())
    if fmt != "open_clip":
        width = ours["cls_token"].shape[-1]
        theirs["mask_token"] = torch.zeros(1, width)
    if fmt == "simdino":
        theirs = {f"backbone.{key}": value for key, value in theirs.items()}
    return theirs


# --- reading their files ---------------------------------------------------------------------------------------


def read_release(fmt: Format, obj: Any, weights: Literal["auto", "ema", "model"] = "auto", source: str = "checkpoint"
                 ) -> tuple[StateDict, dict[str, Any], str]:
    """Their tensors as one flat state dict, the settings the file carries, and which weights were taken.

    ``supervised``: ``{"backbone", "head", "meta"}`` (with ``backbone_ema``/``head_ema`` when released
    with both; ``auto`` takes the EMA then); the head becomes ``head.*``. ``simdino``: ``{"teacher": ...}``.
    ``open_clip``: open_clip's training checkpoint ``{"state_dict": ...}`` or a bare state dict.
    """
    if not isinstance(obj, Mapping):
        raise LayoutError(f"{source}: expected a dict, found {type(obj).__name__}")
    if fmt == "supervised":
        if "backbone" not in obj:
            raise LayoutError(f"{source}: no 'backbone' (keys: {', '.join(sorted(map(str, obj)))}): not the "
                              "authors' supervised release format")
        use_ema = weights == "ema" or (weights == "auto" and obj.get("backbone_ema") is not None)
        if use_ema and obj.get("backbone_ema") is None:
            raise LayoutError(f"{source}: EMA weights asked for, but the release has no backbone_ema")
        backbone, head = (obj["backbone_ema"], obj.get("head_ema")) if use_ema else (obj["backbone"], obj.get("head"))
        flat = dict(backbone) | {f"head.{key}": value for key, value in (head or {}).items()}
        return flat, dict(obj.get("meta") or {}), "ema" if use_ema else "model"
    if fmt == "simdino":
        if "teacher" not in obj:
            raise LayoutError(f"{source}: no 'teacher' (keys: {', '.join(sorted(map(str, obj)))[:200]}): not a "
                              "SimDINOv2 teacher checkpoint")
        return dict(obj["teacher"]), {}, "teacher"
    state = obj.get("state_dict", obj)
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise LayoutError(f"{source}: no state dict of tensors (an open_clip checkpoint holds 'state_dict')")
    return dict(state), {}, "model"


# --- which of our models ----------------------------------------------------------------------------------------


def _true(settings: Mapping[str, Any], key: str, default: Any) -> Any:
    value = settings.get(key)
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in ("true", "false", "learn"):
        return {"true": True, "false": False, "learn": True}[value.lower()]
    return value


def _refuse(settings: Mapping[str, Any], source: str, checks: Mapping[str, tuple[Any, Any]]) -> None:
    """Each ``key: (default, required)``: a setting our model cannot represent fails with one line."""
    for key, (default, required) in checks.items():
        value = _true(settings, key, default)
        if value != required:
            raise LayoutError(f"{source}: {key}={value!r}: our KoPE model has only {key}={required!r}")


def _size(width: int, depth: int, source: str) -> str:
    size = SIZES.get((width, depth))
    if size is None:
        raise LayoutError(f"{source}: a {depth}-block, {width}-wide backbone has no name of ours "
                          f"(we have {', '.join(f'{d}x{w}' for w, d in SIZES)})")
    return size


def _patch_and_image_size(theirs: StateDict, source: str) -> tuple[int, int]:
    """The patch size (of the patch convolution) and the square input size its position embedding was made for."""
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in theirs:
            raise LayoutError(f"{source}: {key}: missing (not a KoPE ViT backbone with learnable positions)")
    patch = int(theirs["patch_embed.proj.weight"].shape[-1])
    rows = int(theirs["pos_embed"].shape[1]) - 1
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise LayoutError(f"{source}: pos_embed: {rows} patch rows are not a square grid")
    return patch, grid * patch


def _backbone_shape(theirs: StateDict) -> tuple[int, int, int]:
    width = int(theirs["cls_token"].shape[-1]) if "cls_token" in theirs else 0
    depth = len({key.split(".")[1] for key in theirs if re.match(r"blocks\.\d+\.", key)})
    registers = int(theirs["register_tokens"].shape[1]) if "register_tokens" in theirs else 0
    return width, depth, registers


def model_for(fmt: Format, theirs: Mapping[str, torch.Tensor], settings: Mapping[str, Any] | None = None,
              source: str = "checkpoint", open_clip_name: str = "ViT-KoPE-B-16") -> OurModel:
    """Which of our models holds their checkpoint: the name and options from their tensors and settings
    (``meta`` of a supervised release, the SimDINO ``student`` config, the open_clip ``vision_cfg``)."""
    settings = dict(settings or {})
    theirs = _strip_wrappers(theirs)
    if fmt == "open_clip":
        _refuse(settings, source, {"kope_mode": (True, True), "enable_kope": (True, True),
                                   "kope_vo_rotation": (True, True), "kope_mix": (True, True),
                                   "kope_mix_phase_norm": (True, True), "kope_base": (20, 20),
                                   "no_ln_pre": (False, False), "attentional_pool": (False, False),
                                   "pool_type": ("tok", "tok"), "final_ln_after_pool": (False, False)})
        learnt_scale = _true(settings, "kope_coupling_qknorm_learn", True)
        return OurModel("open_clip", open_clip_name, gamma=float(settings.get("kope_coupling_gamma", 0.05)),
                        unit_q_scale=not learnt_scale)
    if fmt == "simdino":
        theirs = {key.removeprefix("backbone."): value for key, value in theirs.items()
                  if key.startswith("backbone.")}
        if not theirs:
            raise LayoutError(f"{source}: no backbone.* tensors (is this a SimDINOv2 teacher checkpoint?)")
    theirs = _unchunk_blocks(theirs)
    width, depth, registers = _backbone_shape(theirs)
    if not width:
        raise LayoutError(f"{source}: cls_token: missing (not a KoPE ViT backbone)")
    if fmt == "supervised":
        for key in ("arch_name", "model_variant", "kope_coupling_use_vo_proj", "kope_vo_rotation", "kope_mix"):
            if key not in settings:
                raise LayoutError(f"{source}: meta.{key}: missing (needed to rebuild the model)")
        if settings["arch_name"] != "vit_kope":
            raise LayoutError(f"{source}: meta.arch_name={settings['arch_name']!r}: only vit_kope imports")
    _refuse(settings, source, {"kope_mix_phase_norm": (True, True), "kope_coupling_use_tanh": (False, False),
                               "kope_update_ext_phase": (True, True), "update_ext_token_phase": (True, True),
                               "share_kope_coupling": (True, True), "qknorm": (False, False),
                               "kope_coupling_qk_multilayer": (False, False), "coupling_qk_multilayer": (False, False),
                               "learnable_pos_embed": (True, True), "use_learnable_pos_embed": (True, True),
                               "ffn_layer": ("mlp", "mlp")})
    size = _size(width, depth, source)
    vo_proj = "shared_phase_coupling.v_proj.weight" in theirs
    kwargs: dict[str, Any] = {"coupling": "vo_proj" if vo_proj else "rms_qk",
                              "learnable_gamma": "shared_phase_coupling_gamma._raw" in theirs}
    qknorm = [_true(settings, key, None) for key in ("kope_coupling_qknorm", "coupling_qknorm")]
    qknorm = next((value for value in qknorm if value is not None), not vo_proj)
    if bool(qknorm) == vo_proj:
        raise LayoutError(f"{source}: coupling q/k RMS-norm {'on' if qknorm else 'off'} with"
                          f"{'' if vo_proj else 'out'} value/output projections: our couplings are rms_qk "
                          "(RMS-norm, no projections) or vo_proj (projections, no RMS-norm)")
    unit_q_scale = not vo_proj and "shared_phase_coupling.qk_scale" not in theirs
    if unit_q_scale and not any(key in settings for key in ("kope_coupling_qknorm", "coupling_qknorm")):
        raise LayoutError(f"{source}: shared_phase_coupling.qk_scale: missing; give the training config, which "
                          "says whether the coupling RMS-normalised q and k")
    for theirs_key, ours_key in (("kope_vo_rotation", "vo_rotation"), ("kope_mix", "phase_mix")):
        if theirs_key in settings and not _true(settings, theirs_key, True):
            kwargs[ours_key] = False
    gamma = _fixed_gamma(theirs, source)
    if gamma is not None:
        kwargs["gamma"] = round(gamma, 7)
    elif not kwargs["learnable_gamma"]:
        kwargs["gamma"] = float(settings.get("kope_gamma", 0.05))
    layerscale = settings.get("layerscale")
    if "blocks.0.ls1.gamma" in theirs:
        kwargs["init_values"] = float(layerscale) if layerscale else 1e-5
    base = settings.get("base")
    if base is not None and float(base) != 20.0:
        kwargs["rope_base"] = float(base)
    name = f"vit_kope_{size}_patch16_224"
    if registers == 4:
        name += "_reg4"
    elif registers:
        kwargs.update(reg_tokens=registers, no_embed_class=True)
    patch, image = _patch_and_image_size(theirs, source)
    if patch != 16:
        kwargs["patch_size"] = patch
    if image != 224:
        kwargs["img_size"] = image
    kwargs["num_classes"] = int(theirs["head.weight"].shape[0]) if "head.weight" in theirs else 0
    return OurModel("timm", name, kwargs, gamma=kwargs.get("gamma", 0.05), registers=registers,
                    unit_q_scale=unit_q_scale)
