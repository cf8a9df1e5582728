"""Stage ``make_demo_data``: build the two-digit demo datasets in the stage folder if it is empty."""

from __future__ import annotations

from pipeline.core.stage import StageContext
from pipeline.data.demo_data import DemoSpec, class_pairs, make_demo_data
from pipeline.data.settings import DemoDataSettings


def run(settings: DemoDataSettings, ctx: StageContext) -> dict:
    spec = DemoSpec(seed=settings.seed, train_per_class=settings.train_per_class,
                    val_per_class=settings.val_per_class, captioned=settings.captioned, digits=settings.digits,
                    segmentation=settings.segmentation)
    root = make_demo_data(ctx.out_dir, spec)
    ctx.log.info("demo data ready in %s", root)
    rel = root.relative_to(ctx.run_dir)
    return {"imagenet": str(rel / "imagenet"), "datacomp": str(rel / "datacomp"),
            **({"segmentation": str(rel / "segmentation")} if settings.segmentation else {}),
            "zeroshot_classnames": str(rel / "imagenet" / "zeroshot_classnames.txt"),
            "train_images": len(class_pairs(settings.digits)) * settings.train_per_class,
            "captioned_images": settings.captioned}
