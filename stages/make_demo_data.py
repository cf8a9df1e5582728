"""Stage ``make_demo_data``: build the two-digit demo datasets in the stage folder if it is empty."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.types import setting
from pipeline.demo_data import DemoSpec, class_pairs, make_demo_data
from pipeline.stage import StageContext


@dataclass
class Settings:
    seed: int = setting(0, ge=0, help="seed of every random choice; same seed, same bytes")
    digits: int = setting(10, ge=2, le=10, help="digits used: classes are their ordered pairs (90 with all ten)")
    train_per_class: int = setting(20, ge=1, help="training images per class")
    val_per_class: int = setting(5, ge=1, help="validation images per class")
    captioned: int = setting(1000, ge=1, help="images in the DataComp-style captioned set")


def run(settings: Settings, ctx: StageContext) -> dict:
    spec = DemoSpec(seed=settings.seed, train_per_class=settings.train_per_class,
                    val_per_class=settings.val_per_class, captioned=settings.captioned, digits=settings.digits)
    root = make_demo_data(ctx.out_dir, spec)
    ctx.log.info("demo data ready in %s", root)
    rel = root.relative_to(ctx.run_dir)
    return {"imagenet": str(rel / "imagenet"), "datacomp": str(rel / "datacomp"),
            "zeroshot_classnames": str(rel / "imagenet" / "zeroshot_classnames.txt"),
            "train_images": len(class_pairs(settings.digits)) * settings.train_per_class,
            "captioned_images": settings.captioned}
