"""Per-step schedules: linear warm-up then cosine for the learning rate, cosine for weight decay and momenta.

Schedules are pure functions of the optimizer step, so a resumed run computes exactly the values an
uninterrupted one would (nothing to checkpoint). The engine writes them into every parameter group before
each step, times the group's ``lr_scale`` / ``wd_scale`` (see :mod:`pipeline.train.param_groups`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.checkpoint.files import CheckpointError
from pipeline.train.settings import ScheduleSettings


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half a cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (and after)."""
    progress = min(max(step, 0) / max(total_steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, start: float, end: float) -> float:
    """Linear from ``start`` to ``peak`` over ``warmup_steps`` steps, then cosine from ``peak`` to ``end`` at
    ``total_steps``."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


@dataclass(frozen=True)
class StepSchedule:
    """Learning rate and weight decay of every optimizer step of one run."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    warmup_lr: float
    min_lr: float
    weight_decay: float
    weight_decay_end: float

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr, self.warmup_lr, self.min_lr)

    def weight_decay_at(self, step: int) -> float:
        return cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def state_dict(self) -> dict[str, float]:
        """Nothing to restore (the schedule is a function of the step), but saved so a resume notices a run whose
        length or peak changed underneath it (another dataset size, global batch or lr scaling)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        changed = [f"{key}: {state[key]!r} -> {value!r}" for key, value in self.state_dict().items()
                   if key in state and state[key] != value]
        if changed:
            raise CheckpointError(f"the checkpoint's schedule differs from this run's ({'; '.join(changed)}): the "
                                  "dataset size or batch changed; restore them or start over")


def scaled_lr(lr: float, settings: ScheduleSettings, global_batch: int) -> float:
    """``lr`` scaled to the global batch as the recipe asks (DINO: sqrt to 1024; DeiT-III and CLIP: none)."""
    ratio = global_batch / settings.lr_reference_batch
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * math.sqrt(ratio)}[settings.lr_scaling]


def build_schedule(settings: ScheduleSettings, lr: float, weight_decay: float, total_steps: int,
                   steps_per_epoch: int, global_batch: int) -> StepSchedule:
    """The run's schedule; warm-up longer than the run is refused (a cosine that never starts is a typo)."""
    warmup = settings.warmup_steps + round(settings.warmup_epochs * steps_per_epoch)
    if warmup >= total_steps and total_steps > 0:
        raise ValueError(f"schedule: warm-up of {warmup} steps is not shorter than the run ({total_steps} steps)")
    wd_end = weight_decay if settings.weight_decay_end is None else settings.weight_decay_end
    return StepSchedule(total_steps, warmup, scaled_lr(lr, settings, global_batch), settings.warmup_lr,
                        settings.min_lr, weight_decay, wd_end)
