"""Settings of the evaluation protocols and of the ``evaluate`` stage. Plain dataclasses with no heavy imports,
so configs validate without torch (see pipeline.core.kinds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.config.types import InputPath, SettingError, setting

Protocol = Literal["top1", "knn", "linear", "zeroshot", "analysis", "segmentation"]
DINOV2_KS = (10, 20, 100, 200)
DINOV2_TEMPERATURE = 0.07
TEMPLATE_SETS = ("openai_imagenet", "simple_imagenet")


@dataclass
class LinearProbeSettings:
    learning_rates: list[float] = setting(
        default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0],
        help="one head per learning rate (for batch size 256; scaled linearly with batch_size)")
    epochs: int = setting(10, ge=1, help="passes over the training features")
    batch_size: int = setting(256, ge=1, help="features per step")
    momentum: float = setting(0.9, ge=0, lt=1, help="SGD momentum")
    weight_decay: float = setting(0.0, ge=0, help="SGD weight decay")


@dataclass
class KnnSettings:
    ks: list[int] = setting(default_factory=lambda: list(DINOV2_KS), help="neighbour counts (DINOv2: 10 20 100 200)")
    temperature: float = setting(DINOV2_TEMPERATURE, gt=0, help="vote weights softmax(similarity / T)")
    headline_k: int = setting(20, ge=1, help="the k reported as knn_top1")


@dataclass
class ZeroShotSettings:
    template_set: str = setting("openai_imagenet", help=f"open_clip's prompts: {' or '.join(TEMPLATE_SETS)}")
    templates: list[str] = setting(default_factory=list, help="prompts with one {} for the class name "
                                                              "(replace template_set when given)")
    classnames: InputPath | None = setting(None, help="file with one line of names per class ('a | b': synonyms);"
                                                      " none: ImageNet names for 1000 classes, else the dataset's")


@dataclass
class AnalysisSettings:
    images: int = setting(16, ge=1, help="evaluation images the KoPE metrics are averaged over")
    attention_maps: int = setting(4, ge=0, help="of those, images drawn with their CLS attention maps")


@dataclass
class SegmentationEvalSettings:
    """mIoU, per-class IoU and pixel accuracy of a segmenter export (mmseg's ADE20K evaluation)."""

    modes: list[Literal["whole", "slide"]] = setting(
        default_factory=lambda: ["whole", "slide"],
        help="whole: single-scale on the image resized to the export's scale; slide: windows of the training crop")
    stride: int = setting(0, ge=0, help="slide: window stride in pixels (0: 2/3 of the crop, mmseg's 341 for 512)")
    overlays: int = setting(4, ge=0, help="validation images drawn with ground truth, prediction and KoPE phases",
                            identity=False)


@dataclass
class EvalSettings:
    protocols: list[Protocol] = setting(default_factory=lambda: ["top1", "knn", "linear", "analysis"],
                                        help="evaluations to run (top1 needs a classifier, zeroshot a CLIP model)")
    batch_size: int = setting(256, ge=1, help="images per forward pass", identity=False)
    num_workers: int = setting(4, ge=0, help="data loader workers", identity=False)
    max_train_samples: int = setting(0, ge=0, help="k-NN/linear training features from the first N samples (0: all)")
    device: str = setting("auto", help="auto (cuda when available), cpu or cuda[:i]", identity=False)
    knn: KnnSettings = field(default_factory=KnnSettings)
    linear: LinearProbeSettings = field(default_factory=LinearProbeSettings)
    zeroshot: ZeroShotSettings = field(default_factory=ZeroShotSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    segmentation: SegmentationEvalSettings = field(default_factory=SegmentationEvalSettings)


@dataclass(kw_only=True)
class EvaluateSettings(EvalSettings):
    """Stage ``evaluate``: the protocols, the export to evaluate and the data."""

    model: InputPath = setting(help="an export folder, e.g. '@export' or '@finetune/export'")
    val: InputPath = setting(help="sharded classification set to evaluate on, e.g. '@shard_imagenet/val'")
    train: InputPath | None = setting(None, help="sharded training set for k-NN and linear probes")
    extra_val: dict[str, InputPath] = setting(default_factory=dict,
                                              help="more evaluation sets by name, e.g. {v2: '@shard_v2/val'}")

    def check(self) -> None:
        if "segmentation" in self.protocols and len(self.protocols) > 1:
            raise SettingError("protocols", "segmentation evaluates a segmenter export (finetune_segmentation) on a "
                                            "segmentation set: run it in an evaluate stage of its own")
        if "segmentation" in self.protocols and not self.segmentation.modes:
            raise SettingError("segmentation.modes", "name at least one of whole, slide")
