"""Settings of training: the optimizer, schedules, checkpoints and faults, each mode's objective, and the one
``TrainSettings`` type that pretraining and fine-tuning share.

Plain dataclasses with no heavy imports, so configs validate without torch (see pipeline.core.kinds). Every
cross-field rule that needs no GPU lives in a ``check()`` here and fails when the config is loaded (exit 2,
naming file and key); the rule that needs the number of ranks is ``check_world``, run before ranks start.

``PretrainSettings`` is a sum type over ``mode``: the built settings hold only the active mode's block
(``supervised``, ``dino`` or ``clip``); another mode's block is validated and left out, so it can never change
a finished stage's identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pipeline.core.config.types import InputPath, SettingError, setting
from pipeline.core.config.validate import suggest
from pipeline.data.settings import DinoAugSettings, LoaderSettings, SegmentationAugSettings, SupervisedAugSettings

Mode = Literal["supervised", "dino", "clip"]
Precision = Literal["auto", "fp32", "bf16", "bf16_autocast"]
WeightsChoice = Literal["auto", "averaged", "trained"]
"""Which weights are the model: the averaged copy a task keeps (EMA, DINO teacher) when there is one, or the
trained weights."""
LENGTH_KEYS = ("steps", "epochs", "samples")

DEEPSPEED_OWNED = {
    "train_batch_size": "global_batch_size",
    "train_micro_batch_size_per_gpu": "loader.batch_size",
    "gradient_accumulation_steps": "global_batch_size and loader.batch_size",
    "optimizer": "optim",
    "scheduler": "schedule",
    "zero_allow_untested_optimizer": "optim",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "precision",
    "bfloat16": "precision",
    "fp16": "precision",
    "amp": "precision",
    "torch_autocast": "precision",
    "checkpoint": "checkpoint (the pipeline's checkpoint layout)",
}
"""Top-level DeepSpeed config keys the pipeline writes itself, and the setting that decides each."""
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "autotuning", "comet", "comms_logger", "communication_data_type", "compile",
    "compression_training", "csv_monitor", "curriculum_learning", "data_efficiency", "data_types",
    "dataloader_drop_last", "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue",
    "elasticity", "expert_parallel", "flops_profiler", "gradient_allreduce_op", "gradient_predivide_factor",
    "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation", "memory_breakdown", "nebula",
    "pipeline", "prescale_gradients", "progressive_layer_drop", "quantize_training",
    "seq_parallel_communication_data_type", "sparse_attention", "sparse_gradients", "steps_per_print",
    "tensor_parallel", "tensorboard", "timers", "use_data_before_expert_parallelism", "vocabulary_size",
    "wall_clock_breakdown", "wandb", "weight_quantization", "zero_force_ds_cpu_optimizer", "zero_optimization",
})
"""The other top-level keys DeepSpeed's config parser reads (DeepSpeed 0.19; tests/train/test_engine_config.py
checks the list against the installed DeepSpeed). DeepSpeed ignores a key it does not know, so a misspelt one
would silently do nothing: here it is an error."""


def check_deepspeed_overrides(overrides: dict[str, Any]) -> None:
    """The ``deepspeed:`` mapping names only DeepSpeed keys the pipeline does not set itself (the values inside
    each section are checked by DeepSpeed's own models when the engine is built)."""
    for key, value in overrides.items():
        if key in DEEPSPEED_OWNED:
            raise SettingError(f"deepspeed.{key}", f"set by the pipeline from {DEEPSPEED_OWNED[key]}: set that "
                                                   "instead")
        if key not in DEEPSPEED_KEYS:
            raise SettingError(f"deepspeed.{key}", f"not a DeepSpeed config key{suggest(key, DEEPSPEED_KEYS)}")
        if key == "zero_optimization":
            if not isinstance(value, dict):
                raise SettingError("deepspeed.zero_optimization", f"expected a mapping, got {value!r}")
            if "stage" in value:
                raise SettingError("deepspeed.zero_optimization.stage", "set by the pipeline from zero_stage: set "
                                                                        "that instead")


@dataclass
class OptimSettings:
    """Optimizer, peak learning rate and weight decay, clipping, layer-wise and per-module lr scales."""

    name: Literal["adamw", "lamb"] = setting("adamw", help="adamw (torch) or lamb (timm; ZeRO stage 0 only)")
    lr: float = setting(1e-3, gt=0, help="peak learning rate (before schedule.lr_scaling)")
    weight_decay: float = setting(0.05, ge=0, help="weight decay (decoupled) at step 0")
    betas: tuple[float, float] = setting((0.9, 0.999), help="Adam/LAMB moment coefficients")
    eps: float = setting(1e-8, gt=0, help="denominator epsilon")
    grad_clip: float = setting(0.0, ge=0, help="clip the global gradient norm to this (0: off)")
    layer_decay: float = setting(1.0, gt=0, le=1, help="layer-wise lr decay (1: off)")
    lr_multipliers: dict[str, float] = setting(
        default_factory=dict, help="lr factor per module path, e.g. {patch_embed: 0.2, coupling: 0.5}")


@dataclass
class ScheduleSettings:
    """Learning-rate and weight-decay schedules (per optimizer step)."""

    warmup_epochs: float = setting(0.0, ge=0, help="linear warm-up length in epochs (added to warmup_steps)")
    warmup_steps: int = setting(0, ge=0, help="linear warm-up length in optimizer steps")
    warmup_lr: float = setting(1e-6, ge=0, help="learning rate at step 0 of the warm-up")
    min_lr: float = setting(1e-5, ge=0, help="learning rate at the last step (cosine end)")
    weight_decay_end: float | None = setting(None, ge=0, help="weight decay at the last step (cosine from "
                                                            "optim.weight_decay); null: constant")
    lr_scaling: Literal["none", "linear", "sqrt"] = setting(
        "none", help="scale optim.lr by (global batch / lr_reference_batch) or its square root")
    lr_reference_batch: int = setting(256, ge=1, help="global batch at which optim.lr is given")


@dataclass
class CheckpointSettings:
    """When checkpoints are written and how many are kept (changing them keeps a run resumable)."""

    every_steps: int = setting(1000, ge=1, help="save every N optimizer steps (and always at the end)")
    keep: int = setting(3, ge=1, help="checkpoints kept (older ones are deleted once a newer one is latest)")


@dataclass
class FaultSettings:
    """How many non-finite steps in a row a run tolerates, and how often ranks agree on a stop signal."""

    max_nonfinite_in_a_row: int = setting(5, ge=1, help="stop after this many skipped (non-finite) steps in a row")
    stop_check_every_steps: int = setting(
        10, ge=1, identity=False, help="ranks agree on a received stop signal every N steps (and at log and "
                                       "checkpoint steps): a collective and a host sync, so not every step")


@dataclass
class SupervisedSettings:
    """Loss, EMA and augmentation of supervised training; defaults are the paper's DeiT-III recipe."""

    loss: Literal["bce", "ce"] = setting("bce", help="bce (DeiT-III) or ce (cross-entropy)")
    bce_binarize: bool = setting(True, help="bce: targets of every class present in a mixed image set to 1")
    ema_decay: float = setting(0.99996, ge=0, lt=1, help="EMA of the weights (0: off; needs zero_stage <= 2)")
    aug: SupervisedAugSettings = field(default_factory=SupervisedAugSettings)
    val_data: InputPath | None = setting(None, help="sharded validation set: top-1 of the exported model at the end")
    val_batch_size: int = setting(256, ge=1, help="evaluation batch size", identity=False)
    val_every_steps: int = setting(0, ge=0, help="also measure val_data's top-1 of the trained weights every N steps "
                                                 "and at the end (TensorBoard model/val_top1; a multiple of "
                                                 "log_every_steps; 0: only the exported model's, at the end)",
                                   identity=False)


@dataclass
class DinoSettings:
    """The self-supervised recipe (SimDINOv2 style); defaults are the paper's values."""

    objective: Literal["simdino", "dino"] = setting(
        "simdino", help="CLS loss: simdino (coding rate, the paper's recipe) or dino (centring + sharpening)")
    head_layers: int = setting(3, ge=1, help="projection head depth")
    head_hidden_dim: int = setting(2048, ge=1, help="projection head width")
    head_bottleneck_dim: int = setting(256, ge=1, help="projection head output (simdino's feature size)")
    prototypes: int = setting(65536, ge=1, help="dino objective: prototype scores after the bottleneck")
    ibot_weight: float = setting(1.0, ge=0, help="iBOT masked-patch loss weight (0: no masking, no patch loss)")
    ibot_separate_head: bool = setting(False, help="a head of its own for patch tokens (else the CLS head)")
    phase_alignment_weight: float = setting(0.0, ge=0, help="KoPE phase-alignment loss weight (0: off)")
    coding_rate_eps: float = setting(0.05, gt=0, help="simdino: coding-rate precision eps")
    compression_weight: float = setting(1.0, ge=0, help="simdino: weight of the student-teacher similarity")
    student_temp: float = setting(0.1, gt=0, help="dino: student softmax temperature")
    teacher_temp: float = setting(0.07, gt=0, help="dino: teacher temperature after the warm-up")
    warmup_teacher_temp: float = setting(0.04, gt=0, help="dino: teacher temperature at step 0")
    teacher_temp_warmup: float = setting(0.3, ge=0, le=1, help="dino: fraction of training to warm it up over")
    center_momentum: float = setting(0.9, ge=0, lt=1, help="dino: EMA momentum of the teacher centres")
    momentum_start: float = setting(0.9, ge=0, le=1, help="teacher EMA momentum at step 0")
    momentum_end: float = setting(1.0, ge=0, le=1, help="teacher EMA momentum at the last step (cosine)")
    aug: DinoAugSettings = field(default_factory=DinoAugSettings)


@dataclass
class ClipSettings:
    """The contrastive objective; the model's image size and context length come from its open_clip config."""

    local_loss: bool = setting(True, help="each rank scores its own rows against all ranks' features "
                                          "(same gradient, less memory); false: every rank the full matrix")
    crop_scale: tuple[float, float] = (0.9, 1.0)
    max_logit_scale: float = setting(100.0, gt=1, help="upper clamp of the learnt logit scale (1/temperature)")
    uint8_images: bool = setting(False, identity=False, help="batches of uint8 pixels, normalised on the training "
                                 "device: 4x smaller batches (the same pixels: results change by float rounding)")


@dataclass
class ModelSettings:
    name: str = setting("vit_kope_small_patch16_224", help="timm model name (open_clip config name for clip)")
    kwargs: dict[str, Any] = setting(default_factory=dict, help="extra arguments of the model factory")


@dataclass(kw_only=True)
class TrainSettings:
    """What every training stage shares: data, batches, length, optimizer, schedule, engine, checkpoints."""

    mode: ClassVar[str]
    data: InputPath = setting(help="sharded training set (a folder with manifest.json), e.g. '@shard/train'")
    global_batch_size: int = setting(1024, ge=1, help="samples per optimizer step over all ranks")
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    steps: int = setting(0, ge=0, help="optimizer steps to train (set one of steps, epochs, samples)")
    epochs: float = setting(0.0, ge=0, help="loader epochs to train")
    samples: int = setting(0, ge=0, help="samples to train on, over all ranks")
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    zero_stage: int = setting(0, ge=0, le=3, help="DeepSpeed ZeRO stage 0-3")
    precision: Precision = setting("auto", help="auto: bf16_autocast on GPUs, fp32 on CPUs (see pipeline.train.engine)")
    compile: bool | Literal["auto"] = setting(
        "auto", identity=False, help="torch.compile the model inside the DeepSpeed engine (auto: on GPUs, off on "
                                     "CPUs); results change by float rounding only")
    compile_cache_dir: str = setting("", identity=False, help="compile caches kept for a requeued run ('': "
                                                              "<stage folder>/compile_cache)")
    deepspeed: dict[str, Any] = setting(
        default_factory=dict, help="DeepSpeed config merged into the generated one, e.g. {zero_optimization: "
                                   "{reduce_bucket_size: 5.0e+7}}; keys the pipeline sets are refused")
    checkpoint: CheckpointSettings = setting(default_factory=CheckpointSettings, identity=False)
    log_every_steps: int = setting(50, ge=1, help="steps between log lines and TensorBoard points", identity=False)
    faults: FaultSettings = setting(default_factory=FaultSettings, identity=False)
    seed: int | None = setting(None, ge=0, help="seed of initialisation, data order and augmentation "
                                                "(default: the pipeline's seed)")

    def check(self) -> None:
        chosen = [key for key in LENGTH_KEYS if getattr(self, key)]
        if len(chosen) != 1:
            raise SettingError(chosen[1] if len(chosen) > 1 else "steps",
                               f"set exactly one of steps, epochs, samples (got {', '.join(chosen) or 'none'})")
        if self.global_batch_size % self.loader.batch_size:
            raise SettingError("global_batch_size", f"{self.global_batch_size} is not a multiple of loader.batch_size "
                                                    f"{self.loader.batch_size}")
        if self.samples and self.samples < self.global_batch_size:
            raise SettingError("samples", f"{self.samples} is less than one optimizer step of "
                                          f"{self.global_batch_size} samples")
        if self.optim.name == "lamb" and self.zero_stage > 0:
            raise SettingError("optim.name", f"lamb needs zero_stage 0: ZeRO stage {self.zero_stage} flattens "
                                             "parameters into partitions, which breaks LAMB's per-tensor trust "
                                             "ratios; use adamw for ZeRO")
        check_deepspeed_overrides(self.deepspeed)
        warmup = self.schedule
        if self.steps and warmup.warmup_steps >= self.steps and not warmup.warmup_epochs:
            raise SettingError("schedule.warmup_steps", f"a warm-up of {warmup.warmup_steps} steps is not shorter "
                                                        f"than the run ({self.steps} steps)")
        if self.epochs and warmup.warmup_epochs >= self.epochs and not warmup.warmup_steps:
            raise SettingError("schedule.warmup_epochs", f"a warm-up of {warmup.warmup_epochs} epochs is not shorter "
                                                         f"than the run ({self.epochs} epochs)")

    def check_world(self, world_size: int) -> None:
        """The rule that needs the number of ranks: the global batch splits evenly into micro-batches."""
        per_step = self.loader.batch_size * world_size
        if self.global_batch_size % per_step:
            raise SettingError("global_batch_size", f"{self.global_batch_size} is not a multiple of "
                                                    f"loader.batch_size {self.loader.batch_size} x {world_size} "
                                                    f"ranks = {per_step}: change one of them")


def _check_supervised(settings: SupervisedSettings, zero_stage: int, batch_size: int, log_every_steps: int) -> None:
    if settings.val_every_steps and settings.val_data is None:
        raise SettingError("supervised.val_every_steps", "needs supervised.val_data")
    if settings.val_every_steps % log_every_steps:
        raise SettingError("supervised.val_every_steps", f"{settings.val_every_steps} is not a multiple of "
                                                         f"log_every_steps {log_every_steps} (it is measured when "
                                                         "training logs)")
    if settings.ema_decay > 0 and zero_stage == 3:
        raise SettingError("supervised.ema_decay", "an EMA of the weights needs zero_stage 0, 1 or 2 (ZeRO-3 shards "
                                                   "the weights it follows); set ema_decay: 0 or zero_stage: 2")
    mixing = settings.aug.mixup_alpha > 0 or settings.aug.cutmix_alpha > 0
    if mixing and batch_size % 2:
        raise SettingError("loader.batch_size", f"Mixup/CutMix pairs images within a batch: {batch_size} must be "
                                                "even")


@dataclass(kw_only=True)
class PretrainSettings(TrainSettings):
    """Stage ``pretrain``: ``mode`` picks the objective and its one settings block."""

    mode: Mode = setting("supervised", help="supervised, dino or clip")
    model: ModelSettings = field(default_factory=ModelSettings)

    __variant_key__: ClassVar[str] = "mode"
    __variants__: ClassVar[dict[str, type]]


@dataclass(kw_only=True)
class SupervisedPretrain(PretrainSettings):
    mode: Literal["supervised"] = setting("supervised", help="supervised, dino or clip")
    supervised: SupervisedSettings = field(default_factory=SupervisedSettings)

    def check(self) -> None:
        super().check()
        _check_supervised(self.supervised, self.zero_stage, self.loader.batch_size, self.log_every_steps)


@dataclass(kw_only=True)
class DinoPretrain(PretrainSettings):
    mode: Literal["dino"] = setting("dino", help="supervised, dino or clip")
    dino: DinoSettings = field(default_factory=DinoSettings)

    def check(self) -> None:
        super().check()
        if self.zero_stage == 3:
            raise SettingError("zero_stage", "mode dino supports ZeRO stages 0, 1 and 2: its EMA teacher follows the "
                                             "full student weights, which ZeRO-3 partitions; set zero_stage: 2")
        aug = self.dino.aug
        if aug.global_size % aug.patch_size:
            raise SettingError("dino.aug.global_size", f"{aug.global_size} is not a multiple of dino.aug.patch_size "
                                                       f"{aug.patch_size} (the iBOT mask grid)")


@dataclass(kw_only=True)
class ClipPretrain(PretrainSettings):
    mode: Literal["clip"] = setting("clip", help="supervised, dino or clip")
    clip: ClipSettings = field(default_factory=ClipSettings)


PretrainSettings.__variants__ = {"supervised": SupervisedPretrain, "dino": DinoPretrain, "clip": ClipPretrain}


@dataclass(kw_only=True)
class FinetuneSettings(TrainSettings):
    """Stage ``finetune``: supervised training of an exported backbone with a new classifier."""

    mode: ClassVar[str] = "supervised"
    init: InputPath = setting(help="an export folder with config.json + model.safetensors, e.g. '@export'")
    model_kwargs: dict[str, Any] = setting(default_factory=dict,
                                           help="extra timm arguments for fine-tuning, e.g. {drop_path_rate: 0.1}")
    zero_stage: int = setting(0, ge=0, le=2, help="DeepSpeed ZeRO stage 0-2 (the EMA needs full weights)")
    supervised: SupervisedSettings = field(default_factory=SupervisedSettings)

    def check(self) -> None:
        super().check()
        _check_supervised(self.supervised, self.zero_stage, self.loader.batch_size, self.log_every_steps)


@dataclass
class SegmentationSettings:
    """Heads and augmentation of segmentation fine-tuning; defaults are mmseg's SETR-PUP on ADE20K 512x512."""

    head: Literal["setr_pup", "linear"] = setting("setr_pup", help="setr_pup (SETR progressive upsampling, the "
                                                                   "paper's) or linear (BatchNorm + 1x1 conv)")
    out_indices: list[int] = setting(default_factory=lambda: [-1], help="backbone blocks the heads read: the last "
                                     "feeds the decode head, the others SETR-PUP's auxiliary heads (ViT-L: 9 14 19 23)")
    channels: int = setting(256, ge=1, help="setr_pup: channels of its convolutions")
    num_convs: int = setting(0, ge=0, help="setr_pup: conv + 2x upsampling stages (0: log2 of the patch size)")
    aux_convs: int = setting(2, ge=0, help="setr_pup: stages of each auxiliary head")
    aux_weight: float = setting(0.4, ge=0, help="loss weight of each auxiliary head (0: no auxiliary heads)")
    dropout: float = setting(0.0, ge=0, lt=1, help="dropout before each classifier")
    aug: SegmentationAugSettings = field(default_factory=SegmentationAugSettings)


@dataclass(kw_only=True)
class FinetuneSegmentationSettings(TrainSettings):
    """Stage ``finetune_segmentation``: an exported backbone with a segmentation head, trained per pixel."""

    mode: ClassVar[str] = "segmentation"
    init: InputPath = setting(help="an export folder with config.json + model.safetensors, e.g. '@export'")
    model_kwargs: dict[str, Any] = setting(default_factory=dict,
                                           help="extra timm arguments of the backbone, e.g. {drop_path_rate: 0.1}")
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)

    def check(self) -> None:
        super().check()
        if not self.segmentation.out_indices:
            raise SettingError("segmentation.out_indices", "name at least one backbone block")
