"""Stage ``make_rehearsal_data``: data shaped like the paper's (an ImageNet-1K-shaped tree with a flat val and
the ILSVRC ground truth, a DataComp-shaped metadata folder with its images) in the stage folder, for the scale
rehearsal; built once, kept while its settings stay the same."""

from __future__ import annotations

from dataclasses import asdict

from pipeline.core.stage import StageContext
from pipeline.data.rehearsal_data import RehearsalSpec, make_rehearsal_data
from pipeline.data.settings import RehearsalDataSettings


def run(settings: RehearsalDataSettings, ctx: StageContext) -> dict:
    root = make_rehearsal_data(ctx.out_dir, RehearsalSpec(**asdict(settings)))
    ctx.log.info("rehearsal data ready in %s", root)
    rel = root.relative_to(ctx.run_dir)
    return {"imagenet": str(rel / "imagenet"), "datacomp": str(rel / "datacomp"),
            "train_images": settings.classes * settings.train_per_class,
            "val_images": settings.classes * settings.val_per_class, "captioned": settings.captioned}
