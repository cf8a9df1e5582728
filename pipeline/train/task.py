"""The contract between the training engine and a training mode (supervised, DINO-style, CLIP).

The engine owns DeepSpeed, the optimizer, schedules, checkpoints, faults and logging; a task owns what
is trained and how the loss is computed. Everything a task keeps outside the DeepSpeed-wrapped module
(an EMA of the weights, a DINO teacher and centres) goes through ``state_dict``/``load_state_dict`` into
the checkpoint's client state, so resume is exact.

A task is built by a stage adapter from its mode's settings block (``supervised:``, ``dino:`` or ``clip:``), the
model to train, the resolved data folder, the loader settings (``batch_size`` is the per-rank micro-batch) and the
seed (see :func:`pipeline.train.tasks.create_task`); rules between settings are checked when the config is loaded
(:mod:`pipeline.train.settings`), so a task raises ``ValueError`` only for what needs the data or the model.

The module DeepSpeed wraps may define timm's ``no_weight_decay()`` (names excluded from weight decay, on
top of every 1-d parameter) and ``group_matcher()`` (layer groups for layer-wise lr decay, as timm models
do); the engine reads both from the top-level module.

A task may also define ``evaluate(weights, device) -> dict[str, float]``: metrics of the exported weights
(``parameters_for_export``) on its validation data, run on rank 0 alone after training; they are logged
and returned among the stage's outputs.

Random numbers: the engine saves and restores the torch, numpy and Python generators of every rank with
each checkpoint, and isolates them from the data loader. A task that draws only from those generators
inside ``compute_loss``/``after_optimizer_step`` resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.checkpoint.files import CheckpointError


class Task(Protocol):
    """One training mode."""

    name: str

    def begin(self, total_steps: int, zero_stage: int = 0) -> None:
        """Called once, before ``build_module``, with the run's length in optimizer steps (for schedules the task
        owns, such as a teacher momentum) and its ZeRO stage (a logging-only forward outside the engine must not
        run on ZeRO-3-partitioned modules: see :mod:`pipeline.train.probe`)."""

    def build_module(self) -> nn.Module:
        """The module DeepSpeed wraps and partitions (student + heads, or the whole CLIP model). Called once,
        before ``build_loader`` and ``load_state_dict``; the global torch generator is seeded beforehand, so
        initialisation is the same on every rank."""

    def build_loader(self, rank: int, world_size: int) -> Any:
        """This rank's :class:`pipeline.data.loaders.ResumableLoader` (``state_dict``/``load_state_dict``,
        ``epoch``, ``steps_per_epoch``; one epoch of micro-batches per ``iter()``, every epoch from one set of
        workers with ``stream()``, which training uses)."""

    def compute_loss(self, engine: Any, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Forward one micro-batch through ``engine`` (the DeepSpeed engine: call it, never its module's
        methods, so ZeRO-3 can gather parameters) and return the loss (a scalar tensor; the engine scales it
        for gradient accumulation) and scalars to log, as detached scalar tensors or plain numbers. ``step`` is
        the optimizer step being computed (0-based). The batch arrives on ``engine.device`` already (the trainer
        copies it ahead); ``.to(engine.device)`` keeps a task usable with host batches too. When
        ``engine.bfloat16_enabled()``, cast floating inputs to bf16.

        Read no device value here (``.item()``, ``float(tensor)``, boolean-mask indexing, ``if tensor:``): each is a
        host sync that stalls the GPU's queue every micro-batch. The trainer reads the metrics at log intervals."""

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        """Work after optimizer step ``step`` was applied (EMA or teacher update). Not called for a step the
        engine skipped because its loss was not finite."""

    def extra_metrics(self, engine: Any) -> dict[str, float]:
        """Scalars logged every logging interval (γ, logit scale, teacher momentum); called on every rank."""

    def state_dict(self) -> dict[str, Any]:
        """State kept outside the engine, saved in the checkpoint's client state (by rank 0: keep it the same
        on every rank)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def model_spec(self) -> dict[str, Any]:
        """How to rebuild the exported model, written to ``<out>/model.json``: ``library`` ("timm" or
        "open_clip"), ``name`` and the ``kwargs`` to create it with (``num_classes``, ``img_size``, ... as
        used in ``build_module``), so ``timm.create_model(name, **kwargs)`` (or open_clip's factory) plus the
        exported weights gives the trained model."""

    def parameters_for_export(self, engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Named tensors of the model downstream teams get, as a timm (or open_clip) state dict: EMA or
        teacher weights where they exist. Called on every rank inside a context that gathers ZeRO-3
        parameters; the stage writes them to ``model.safetensors``."""

    @staticmethod
    def inference_weights(module_state: Mapping[str, torch.Tensor], task_state: Mapping[str, Any],
                          choice: str) -> tuple[dict[str, torch.Tensor], str]:
        """The same choice from a consolidated checkpoint, for export: from the engine module's fp32 state dict
        and this task's saved ``state_dict``, the model's state dict (as ``model_spec`` builds it) and what it is
        (``trained``, ``ema``, ``teacher``). ``choice``: ``auto`` (the averaged copy when kept), ``averaged``
        (require it) or ``trained``."""


def trained_weights_only(module_state: Mapping[str, torch.Tensor], choice: str, run: str
                         ) -> tuple[dict[str, torch.Tensor], str]:
    """``inference_weights`` of a mode that keeps no averaged copy (``run`` names it in the error)."""
    if choice == "averaged":
        raise CheckpointError(f"weights: averaged requested, but {run} keeps no averaged weights")
    return dict(module_state), "trained"
