"""DINO-style self-supervised training: a KoPE ViT student with DINO (+ iBOT) heads and an EMA teacher.

Per step the student sees 2 global crops (iBOT-masked: masked patches become a learnt mask token) and N
local crops; the teacher, an EMA copy of the student, sees the unmasked global crops. Objectives:

* CLS: SimDINO's coding-rate loss (``objective: simdino``, the paper's recipe) or classic DINO cross-entropy
  with centring and a warmed-up teacher temperature (``objective: dino``);
* iBOT masked patches (``ibot_weight``): cosine with SimDINO, centred cross-entropy with DINO;
* KoPE phase alignment (``phase_alignment_weight``, off by default): student phases on the masked crops
  against the teacher's on the unmasked ones.

ZeRO: stages 0, 1 and 2 only. The teacher lives outside the DeepSpeed engine (it has no optimizer state and
no gradients) and is updated after every optimizer step from the student's full weights, which every rank
holds under stages 0–2. Under ZeRO-3 the student's weights exist only as per-rank shards, so the task
refuses stage 3 rather than gather the whole model every step.

The teacher and the loss centres are the task's state (``state_dict``): with the engine's checkpoint they
make resume exact. The exported model is the teacher's backbone, which DINO-style methods evaluate.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pipeline.checkpoint.files import CheckpointError
from pipeline.data.loaders import ResumableLoader
from pipeline.data.loaders_samples import dino_samples
from pipeline.data.settings import LoaderSettings
from pipeline.data.transforms import ImageNormalizer
from pipeline.models import kope_vit  # noqa: F401  (registers the vit_kope_* models)
from pipeline.models.heads import DINOHead
from pipeline.train.engine import forward_precision
from pipeline.train.losses.dino import DinoLoss, teacher_temperature
from pipeline.train.losses.ibot import IbotLoss, masked_patch_cosine_loss
from pipeline.train.losses.phase_alignment import phase_alignment_loss
from pipeline.train.losses.simdino import SimDinoLoss
from pipeline.train.metrics import kope_metrics
from pipeline.train.scalar_params import restore_scalars, vectorize_scalar_parameters_
from pipeline.train.schedules import cosine
from pipeline.train.settings import DinoSettings, WeightsChoice

BACKBONE_PREFIX = "backbone."
GLOBAL_CROPS = 2
PROBE_IMAGES = 8


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t ← m·t + (1 − m)·s`` for every parameter pair (the modules have the same structure)."""
    targets = list(teacher.parameters())
    sources = [s.detach().to(t.dtype) for t, s in zip(targets, student.parameters(), strict=True)]
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def select_patches(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of the (B, P, C) patch tokens flattened to (B·P, C): the masked patches, in the loader's
    order, with no data-dependent shape on the device."""
    return tokens.flatten(0, 1).index_select(0, indices)


def _prefixed(pattern: str, prefix: str) -> str:
    """A timm group pattern (``^a|b``, matched at the start of a name) for names below ``prefix``."""
    return rf"^{prefix}\.(?:{pattern.replace('^', '')})"


class DinoStudent(nn.Module):
    """Backbone, heads and the iBOT mask token: the module DeepSpeed wraps; the teacher is a copy of it.

    The backbone must offer ``forward_feature_dict`` (every ``vit_kope_*`` model, also with ``kope=False``).
    Masked patches are replaced by the mask token right after the patch embedding, before position
    embedding, as in iBOT/DINOv2.
    """

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None = None,
                 mask_token: bool = True):
        super().__init__()
        if not hasattr(backbone, "forward_feature_dict"):
            raise ValueError(f"{type(backbone).__name__} has no forward_feature_dict: use a vit_kope_* model "
                             "(kope=False for a plain ViT baseline)")
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim)) if mask_token else None
        self._masks: torch.Tensor | None = None
        if mask_token:
            backbone.patch_embed.register_forward_hook(self._mask_patches)

    @property
    def patch_head(self) -> nn.Module:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def _mask_patches(self, module: nn.Module, inputs: Any, tokens: torch.Tensor) -> torch.Tensor | None:
        """The patch embedding's forward hook (registered once): masked patches become the mask token while
        :meth:`encode` runs with masks, and nothing changes otherwise."""
        if self._masks is None:
            return None
        mask = self._masks.reshape(tokens.shape[:-1]).unsqueeze(-1)
        return torch.where(mask, self.mask_token.to(tokens.dtype), tokens)

    def encode(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The backbone's feature dict; with ``masks`` (B, patches) the masked patches see the mask token."""
        self._masks = masks
        try:
            return self.backbone.forward_feature_dict(images)
        finally:
            self._masks = None

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor | None = None,
                mask_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Student outputs: ``cls`` head outputs of all crops (global then local, crop-major), ``patch`` head
        outputs of the masked patches (``masks`` (B, patches) bool, and the same as ``mask_indices``, their flat
        indices: see :func:`pipeline.data.loaders_samples.masked_patch_index`), ``phases`` of the global crops
        (KoPE)."""
        features = self.encode(global_crops, masks)
        cls = [features["cls_token"]]
        if local_crops.numel():
            cls.append(self.encode(local_crops)["cls_token"])
        out = {"cls": self.dino_head(torch.cat(cls))}
        if mask_indices is not None:
            out["patch"] = self.patch_head(select_patches(features["patch_tokens"], mask_indices))
        if "patch_phases" in features:
            out["phases"] = features["patch_phases"]
        return out

    @torch.no_grad()
    def targets(self, global_crops: torch.Tensor, mask_indices: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Teacher outputs on the unmasked global crops: ``cls``, ``patch`` at ``mask_indices``, ``phases``."""
        features = self.encode(global_crops)
        out = {"cls": self.dino_head(features["cls_token"])}
        if mask_indices is not None:
            out["patch"] = self.patch_head(select_patches(features["patch_tokens"], mask_indices))
        if "patch_phases" in features:
            out["phases"] = features["patch_phases"]
        return out

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
        return names | ({"mask_token"} if self.mask_token is not None else set())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's layer groups (for layer-wise lr decay) under ``backbone.``; the mask token joins the
        stem, and the heads, matching no group, form the top layer (as in DINOv2)."""
        inner = self.backbone.group_matcher(coarse)
        blocks = inner["blocks"]
        if isinstance(blocks, str):
            blocks = [(blocks, None)]
        return {
            "stem": _prefixed(inner["stem"], "backbone") + "|^mask_token",
            "blocks": [(_prefixed(pattern, "backbone"), order) for pattern, order in blocks],
        }


class DinoTask:
    """The ``dino`` mode of the engine (see :class:`pipeline.train.task.Task`)."""

    name = "dino"

    def __init__(self, settings: DinoSettings, *, model: str, model_kwargs: Mapping[str, Any],
                 data_dir: str | Path, loader: LoaderSettings, seed: int):
        self.settings = settings
        self.model = model
        self.model_kwargs = dict(model_kwargs)
        self.data_dir = Path(data_dir)
        self.loader_settings = loader
        self.seed = seed
        self.total_steps = 1
        self.teacher: DinoStudent | None = None
        self.scalar_names: set[str] = set()
        self.momentum = settings.momentum_start
        self._probe: torch.Tensor | None = None
        self._device: torch.device | None = None
        aug = settings.aug
        self.normalize = ImageNormalizer(aug.mean, aug.std) if aug.uint8_images else None
        head_out = settings.prototypes if settings.objective == "dino" else 0
        self.head_out = head_out
        if settings.objective == "dino":
            self.cls_loss: nn.Module = DinoLoss(head_out, settings.student_temp, settings.center_momentum)
            self.patch_loss = IbotLoss(head_out, settings.student_temp, settings.center_momentum)
        else:
            self.cls_loss = SimDinoLoss(settings.coding_rate_eps, settings.compression_weight)
            self.patch_loss = None

    def begin(self, total_steps: int, zero_stage: int = 0) -> None:
        """The teacher momentum and temperature schedules run over the whole run (ZeRO-3 is refused at config
        time)."""
        self.total_steps = total_steps

    @property
    def uses_masks(self) -> bool:
        return self.settings.ibot_weight > 0

    def _head(self, in_dim: int) -> DINOHead:
        s = self.settings
        return DINOHead(in_dim, self.head_out, s.head_hidden_dim, s.head_bottleneck_dim, s.head_layers)

    def model_spec(self) -> dict[str, Any]:
        """The exported backbone: no classifier, global-crop size, any input size (local crops)."""
        kwargs = {**self.model_kwargs, "num_classes": 0, "img_size": self.settings.aug.global_size,
                  "dynamic_img_size": True}
        return {"library": "timm", "name": self.model, "kwargs": kwargs}

    def build_module(self) -> DinoStudent:
        """The student; the teacher starts as an exact copy of it and is kept (in eval mode) by the task."""
        aug = self.settings.aug
        spec = self.model_spec()
        backbone = timm.create_model(spec["name"], **spec["kwargs"])
        if self.settings.phase_alignment_weight > 0 and not getattr(backbone, "kope", False):
            raise ValueError(f"dino.phase_alignment_weight > 0 needs a KoPE model; {self.model} carries no phases")
        patch = backbone.patch_embed.patch_size[0]
        if patch != aug.patch_size:
            raise ValueError(f"dino.aug.patch_size is {aug.patch_size} but model {self.model} has patch size "
                             f"{patch}: the iBOT mask grid must match the patch grid")
        self.scalar_names = vectorize_scalar_parameters_(backbone)
        embed_dim = backbone.embed_dim
        ibot_head = self._head(embed_dim) if self.uses_masks and self.settings.ibot_separate_head else None
        student = DinoStudent(backbone, self._head(embed_dim), ibot_head, mask_token=self.uses_masks)
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        return student

    def build_loader(self, rank: int, world_size: int) -> ResumableLoader:
        samples = dino_samples(self.settings.aug, self.loader_settings.draft_size)
        return ResumableLoader(self.data_dir, samples, self.loader_settings, seed=self.seed, rank=rank,
                               world_size=world_size)

    def _teacher(self) -> DinoStudent:
        if self.teacher is None:
            raise RuntimeError("DinoTask.build_module must run before training or loading state")
        return self.teacher

    def _place(self, device: torch.device) -> None:
        """The teacher and the losses' centres on the training device, once (the module is built on the CPU)."""
        if self._device != device:
            for module in (self._teacher(), self.cls_loss, self.patch_loss):
                if module is not None:
                    module.to(device)
            self._device = device

    def _crops(self, crops: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Crops on the device as normalised fp32 (uint8 crops are normalised there)."""
        crops = crops.to(device, non_blocking=True)
        return self.normalize(crops) if self.normalize is not None else crops.float()

    def compute_loss(self, engine: Any, batch: Mapping[str, Any], step: int
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """No host sync: the metrics stay tensors, masked patches are selected by the loader's index lists."""
        s = self.settings
        device = engine.device
        self._place(device)
        teacher = self._teacher()
        global_crops = self._crops(batch["global_crops"], device)
        masks = indices = weights = None
        if self.uses_masks:
            masks = batch["masks"].to(device, non_blocking=True)
            indices = batch["mask_indices"].to(device, non_blocking=True)
            weights = batch["mask_weights"].to(device, non_blocking=True)
        batch_size = global_crops.shape[0] // GLOBAL_CROPS

        with forward_precision(engine) as dtype:
            student_globals = global_crops.to(dtype)
            student = engine(student_globals, self._crops(batch["local_crops"], device).to(dtype), masks, indices)
        self._probe = student_globals[:PROBE_IMAGES].detach()
        # The teacher keeps fp32 weights; it runs in bf16 whenever the student does.
        low_precision = engine.bfloat16_enabled() or engine.torch_autocast_enabled()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low_precision):
            target = teacher.targets(global_crops, indices)

        student_views = list(student["cls"].float().split(batch_size))
        teacher_views = list(target["cls"].float().split(batch_size))
        metrics: dict[str, torch.Tensor | float] = {}
        if s.objective == "dino":
            temp = teacher_temperature(step, round(s.teacher_temp_warmup * self.total_steps),
                                       s.warmup_teacher_temp, s.teacher_temp)
            cls_loss = self.cls_loss(student_views, teacher_views, temp)
            metrics["teacher_temp"] = temp
        else:
            cls_loss, terms = self.cls_loss(student_views, teacher_views)
            metrics.update(terms)
        loss = cls_loss
        metrics["loss_cls"] = cls_loss.detach()
        if indices is not None:
            images = global_crops.shape[0]
            if self.patch_loss is not None:
                patch_loss = self.patch_loss(student["patch"], target["patch"], weights, images, temp)
            else:
                patch_loss = masked_patch_cosine_loss(student["patch"], target["patch"], weights, images)
            loss = loss + s.ibot_weight * patch_loss
            metrics["loss_ibot"] = patch_loss.detach()
        if s.phase_alignment_weight > 0:
            phase_loss = phase_alignment_loss(student["phases"], target["phases"])
            loss = loss + s.phase_alignment_weight * phase_loss
            metrics["loss_phase"] = phase_loss.detach()
        return loss, metrics

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        """EMA of the student into the teacher with this step's momentum."""
        self.momentum = cosine(step, self.total_steps, self.settings.momentum_start, self.settings.momentum_end)
        ema_update_(self._teacher(), engine.module, self.momentum)

    def extra_metrics(self, engine: Any) -> dict[str, float]:
        """Teacher momentum, and the student's γ and phase synchrony on a few of the last global crops."""
        metrics = {"teacher_momentum": self.momentum}
        if self._probe is not None:
            with forward_precision(engine):
                metrics.update(kope_metrics(engine.module.backbone, self._probe))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self._teacher().state_dict(), "cls_loss": self.cls_loss.state_dict(),
                "patch_loss": self.patch_loss.state_dict() if self.patch_loss is not None else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._teacher().load_state_dict(state["teacher"])
        self.cls_loss.load_state_dict(state["cls_loss"])
        if self.patch_loss is not None:
            self.patch_loss.load_state_dict(state["patch_loss"])

    def parameters_for_export(self, engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """The teacher's backbone (timm state-dict names): the weights DINO-style methods evaluate."""
        named = ((name, tensor.detach()) for name, tensor in self._teacher().backbone.state_dict().items())
        return restore_scalars(named, self.scalar_names)

    @staticmethod
    def inference_weights(module_state: Mapping[str, torch.Tensor], task_state: Mapping[str, Any],
                          choice: WeightsChoice) -> tuple[dict[str, torch.Tensor], str]:
        """From a consolidated checkpoint: the teacher's backbone (``auto``, ``averaged``) or the student's, as a
        timm state dict; and which it is. The teacher holds every tensor itself, frozen ones included, whatever
        the ZeRO stage saved of the student."""
        if choice == "trained":
            source, name = module_state, "trained"
        else:
            source, name = task_state.get("teacher") or {}, "teacher"
            if not source:
                raise CheckpointError("the checkpoint's DINO state holds no teacher")
        backbone = {key.removeprefix(BACKBONE_PREFIX): tensor for key, tensor in source.items()
                    if key.startswith(BACKBONE_PREFIX)}
        if not backbone:
            raise CheckpointError(f"no weights below {BACKBONE_PREFIX!r} in the checkpoint's {name} weights")
        return {key: tensor.float() if tensor.is_floating_point() else tensor for key, tensor in backbone.items()}, name
