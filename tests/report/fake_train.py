"""A stand-in for a training stage in report tests: it leaves what a real one leaves (outputs with ``tensorboard``,
``steps``, ``samples_seen``, ``last_loss``, ``val_top1``; TensorBoard scalars ``train/loss`` and
``model/val_top1``) and a ``model.json`` for the fake evaluation, with numbers the test chooses: the final
validation top-1 is ``model.base + spread * seed`` and its curve rises linearly to it from 0."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from pipeline.core.config.types import setting
from pipeline.core.stage import StageContext


@dataclass
class FakeModel:
    base: float = setting(0.5, ge=0, le=1, help="final validation top-1 of seed 0")
    gini: float = setting(0.5, help="CLS Gini of the first of two blocks (the second: 0.1 more), +0.01 per seed")
    synchrony: bool = setting(True, help="phase synchrony per block: [0.9, 0.8 - 0.1 * seed] (a ViT has none)")


@dataclass
class Settings:
    model: FakeModel = field(default_factory=FakeModel)
    spread: float = setting(0.0, help="added to the final top-1 per seed")
    steps: int = setting(10, ge=1)
    batch: int = setting(8, ge=1)
    log_every: int = setting(2, ge=1)
    fail_seed: int | None = setting(None, help="fail for this seed until the file `unless` exists", identity=False)
    unless: str = setting("", identity=False)
    seed: int | None = None


def run(settings: Settings, ctx: StageContext) -> dict:
    with open(ctx.run_dir / "ran.txt", "a", encoding="utf-8") as handle:
        handle.write(ctx.name + "\n")
    if settings.fail_seed == ctx.seed and not Path(settings.unless).exists():
        raise RuntimeError(f"planted failure of seed {ctx.seed}")
    final = settings.model.base + settings.spread * ctx.seed
    writer = SummaryWriter(str(ctx.out_dir / "tensorboard"))
    loss = 2.0
    for step in range(settings.log_every, settings.steps + 1, settings.log_every):
        loss = 2.0 - step / settings.steps
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("model/val_top1", final * step / settings.steps, step)
    writer.close()
    gini = settings.model.gini + 0.01 * ctx.seed
    model = {"top1": final, "gini": [gini, gini + 0.1]}
    if settings.model.synchrony:
        model["synchrony"] = [0.9, 0.8 - 0.1 * ctx.seed]
    (ctx.out_dir / "model.json").write_text(json.dumps(model))
    return {"tensorboard": ctx.relative(ctx.out_dir / "tensorboard"), "steps": settings.steps,
            "samples_seen": settings.steps * settings.batch, "last_loss": loss, "val_top1": final}
