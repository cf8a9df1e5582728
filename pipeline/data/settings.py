"""Settings of the data layer: how a rank reads shards, how images are augmented, and what the sharding stages
do. Plain dataclasses with no heavy imports, so configs validate without torch (see pipeline.core.kinds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.core.config.types import InputPath, SettingError, setting

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_DEFAULT_MAX_PIXELS = 89_478_485
"""PIL's own decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``)."""


@dataclass
class LoaderSettings:
    """How a rank reads a dataset; the order-defining fields are checked on resume."""

    batch_size: int = setting(256, ge=1, help="samples per rank per step")
    num_workers: int = setting(8, ge=0, help="DataLoader worker processes per rank", identity=False)
    shuffle: bool = setting(True, help="shuffle shards and samples (False: manifest order, for evaluation)")
    window_shards: int = setting(8, ge=1, help="shards whose samples are shuffled together")
    samples_per_epoch: int = setting(0, ge=0, help="positions per epoch (0: the dataset size)")
    repeats: int = setting(1, ge=1, help="repeated augmentation: each sample k times, on different ranks")
    resampled: bool = setting(False, help="draw shards with replacement (open_clip's dataset-resampled)")
    drop_last: bool = setting(True, help="only full global batches, so all ranks take the same steps")
    draft_size: int = setting(0, ge=0, help="JPEG draft decoding keeping both sides >= this (0: off)")
    index_cache_dir: str = setting("", help="folder for the tar indexes of shards written without their own "
                                           "(.idx), keyed by shard sha256 ('': memory)", identity=False)
    prefetch_factor: int = setting(2, ge=1, help="batches each worker prepares ahead", identity=False)
    pin_memory: bool = setting(True, help="page-locked batches (where CUDA is), copied to the GPU while it computes",
                               identity=False)


@dataclass
class SupervisedAugSettings:
    """DeiT-III augmentation and batch mixing; defaults are the paper's ImageNet-1K recipe."""

    image_size: int = setting(224, ge=8, help="training and evaluation crop size (pixels)")
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = setting(0.5, ge=0, le=1, help="horizontal flip probability")
    three_augment: bool = setting(True, help="apply one of grayscale, solarize, Gaussian blur to every image")
    auto_augment: str = setting("", help="a timm policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment); "
                                         "overrides three_augment")
    color_jitter: float = setting(0.3, ge=0, help="brightness, contrast and saturation jitter (0: off)")
    interpolation: str = "bicubic"
    eval_crop_pct: float = setting(1.0, gt=0, le=1, help="evaluation centre crop as a fraction of the resize")
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    mixup_alpha: float = setting(0.8, ge=0, help="Mixup Beta(alpha, alpha); 0: off")
    cutmix_alpha: float = setting(1.0, ge=0, help="CutMix Beta(alpha, alpha); 0: off")
    mixup_prob: float = setting(1.0, ge=0, le=1, help="probability of mixing a batch")
    mixup_switch_prob: float = setting(0.5, ge=0, le=1, help="probability of CutMix when both are on")
    label_smoothing: float = setting(0.0, ge=0, lt=1)
    uint8_images: bool = setting(False, help="batches of uint8 pixels, normalised on the training device "
                                 "(transforms.ImageNormalizer): 4x smaller batches and less work per worker")


@dataclass
class DinoAugSettings:
    """DINOv2 multi-crop and iBOT masking; defaults are the paper's self-supervised recipe."""

    global_size: int = setting(224, ge=8, help="global crop size (pixels)")
    local_size: int = setting(96, ge=8, help="local crop size (pixels)")
    local_crops: int = setting(10, ge=0, help="local crops per image")
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    hflip: float = setting(0.5, ge=0, le=1, help="horizontal flip probability of every crop (0 where left and "
                           "right carry meaning, as in text or ordered digits)")
    patch_size: int = setting(16, ge=1, help="model patch size: the mask grid is global_size / patch_size")
    mask_prob: float = setting(0.5, ge=0, le=1, help="probability that a global crop is masked")
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    uint8_images: bool = setting(False, identity=False, help="crops as uint8 pixels, normalised on the training "
                                 "device: 4x smaller batches (the same pixels: results change by float rounding)")


@dataclass
class SegmentationAugSettings:
    """Joint image/mask augmentation; defaults are mmsegmentation's ADE20K 512x512 pipeline (see
    :mod:`pipeline.data.segmentation_transforms`)."""

    crop_size: int = setting(512, ge=8, help="training crop, and the window of sliding-window inference (pixels)")
    scale: tuple[int, int] = setting((2048, 512), help="(long, short) side bounds of the resize before the crop, "
                                                     "and of the test resize")
    ratio_range: tuple[float, float] = setting((0.5, 2.0), help="random factor on scale for training")
    cat_max_ratio: float = setting(0.75, gt=0, le=1, help="re-draw a crop (up to 10 times) whose most frequent class "
                                                         "covers more than this share of its labelled pixels")
    hflip: float = setting(0.5, ge=0, le=1, help="horizontal flip probability")
    photometric: bool = setting(True, help="mmseg's PhotoMetricDistortion: brightness, contrast, saturation, hue")
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def check(self) -> None:
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise SettingError("ratio_range", f"{list(self.ratio_range)}: expected 0 < low <= high")
        if min(self.scale) < 1:
            raise SettingError("scale", f"{list(self.scale)}: expected two positive sides")


@dataclass
class DemoDataSettings:
    """Stage ``make_demo_data``: the two-digit demo datasets."""

    seed: int = setting(0, ge=0, help="seed of every random choice; same seed, same bytes")
    digits: int = setting(10, ge=2, le=10, help="digits used: classes are their ordered pairs (90 with all ten)")
    train_per_class: int = setting(20, ge=1, help="training images per class")
    val_per_class: int = setting(5, ge=1, help="validation images per class")
    captioned: int = setting(1000, ge=1, help="images in the DataComp-style captioned set")
    segmentation: bool = setting(True, help="also the training and validation images in ADE20K's layout with "
                                            "masks (background 0, digit d labelled d + 1)")


@dataclass
class RehearsalDataSettings:
    """Stage ``make_rehearsal_data``: data shaped like the paper's (see :mod:`pipeline.data.rehearsal_data`)."""

    seed: int = setting(0, ge=0, help="seed of every random choice; same seed, same bytes")
    classes: int = setting(100, ge=1, le=1000, help="ImageNet classes (real wnids and names) in the tree")
    train_per_class: int = setting(3, ge=1, help="training images per class")
    val_per_class: int = setting(1, ge=1, help="validation images per class, in a flat val/ with the ILSVRC "
                                               "ground-truth file")
    captioned: int = setting(200, ge=2, help="rows of the DataComp-shaped metadata")
    width: int = setting(400, ge=16, help="typical image width (varied by up to 15 %)")
    height: int = setting(350, ge=16, help="typical image height")
    quality: int = setting(90, ge=1, le=100, help="JPEG quality")


@dataclass
class ImageNetShardSettings:
    """Stage ``shard_imagenet``: an ImageNet-style tree to one WebDataset shard folder per split."""

    source: InputPath = setting(help="root with train/<wnid>/* and val/ (class folders, or flat with val_labels)")
    splits: list[str] = setting(default_factory=lambda: ["train", "val"], help="split folders to shard")
    val_labels: InputPath | None = setting(
        None, help="labels of a flat split: LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt "
                   "(with val_synsets) or 'file wnid' lines")
    val_synsets: InputPath | None = setting(
        None, help="ILSVRC2012 class id -> wnid: the devkit's meta.mat or one wnid per line in id order")
    class_names: InputPath | None = setting(
        None, help="class names (classes.tsv, LOC_synset_mapping.txt or words.txt); default: found in source")
    name: str = setting("imagenet", help="dataset name: manifests are named <name>-<split>")
    seed: int = setting(0, ge=0, help="seed of the sample order (every shard mixes classes)")
    samples_per_shard: int = setting(1000, ge=1, help="inputs per shard (skipped ones leave a shard smaller)")
    shard_bytes: int = setting(0, ge=0, help="if > 0: cut shards by this many source bytes instead")
    resize_shorter: int = setting(0, ge=0, help="0: keep the original JPEG bytes; else re-encode larger images "
                                                "with the shorter side at this many pixels")
    quality: int = setting(90, ge=1, le=100, help="JPEG quality of re-encoded and converted images")
    max_pixels: int = setting(PIL_DEFAULT_MAX_PIXELS, ge=1, help="larger images are skipped (decompression bombs)")
    workers: int = setting(0, ge=0, help="processes writing shards; 0: one per CPU", identity=False)
    verify_shards: bool = setting(False, help="on a re-run, hash finished shards again (in parallel) instead of "
                                              "trusting their size and recorded sha256", identity=False)


@dataclass
class SegmentationShardSettings:
    """Stage ``shard_segmentation``: an ADE20K-style tree (``images/<split>/*``, ``annotations/<split>/*.png``) to
    one WebDataset shard folder per split of ``<key>.jpg`` + ``<key>.seg.png`` + ``<key>.json``."""

    source: InputPath = setting(help="root with images/<split>/ and annotations/<split>/ (ADEChallengeData2016)")
    splits: dict[str, str] = setting(default_factory=lambda: {"training": "train", "validation": "val"},
                                     help="input split folder -> output dataset folder")
    num_classes: int = setting(150, ge=1, le=255, help="classes after reduce_zero_label (ADE20K: 150)")
    reduce_zero_label: bool = setting(True, help="annotation 0 is 'other' (ignored, stored as 255) and class c is "
                                                 "stored as c - 1, as mmseg's ADE20K; false: stored as given")
    class_names: InputPath | None = setting(
        None, help="objectInfo150.csv/.txt (Idx ... Name columns) or one name per line; default: found in "
                   "source, else class_<i>")
    name: str = setting("ade20k", help="dataset name: manifests are named <name>-<output folder>")
    seed: int = setting(0, ge=0, help="seed of the sample order")
    samples_per_shard: int = setting(1000, ge=1, help="image/mask pairs per shard (skipped ones leave it smaller)")
    quality: int = setting(90, ge=1, le=100, help="JPEG quality of converted images (PNG, CMYK, ...)")
    max_pixels: int = setting(PIL_DEFAULT_MAX_PIXELS, ge=1, help="larger images are skipped (decompression bombs)")
    workers: int = setting(0, ge=0, help="processes writing shards; 0: one per CPU", identity=False)

    def check(self) -> None:
        outputs = list(self.splits.values())
        if not outputs or len(set(outputs)) != len(outputs):
            raise SettingError("splits", f"expected at least one split and distinct output folders, got {outputs}")


@dataclass
class DataCompShardSettings:
    """Stage ``shard_datacomp``: DataComp / LAION-style metadata or img2dataset shards to WebDataset shards."""

    source: InputPath = setting(help="download: a metadata parquet or a folder of them; reshard: a folder of "
                                     "img2dataset / DataComp shards")
    mode: Literal["download", "reshard"] = setting("download", help="download with img2dataset, or reshard")
    serve_local: bool = setting(False, help="download: serve the metadata's folder on 127.0.0.1 and resolve "
                                            "relative urls against it")
    uid_subset: InputPath | None = setting(None, help="DataComp's sorted u8,u8 uid file: keep only these uids")
    name: str = setting("datacomp", help="dataset name in the manifest")
    samples_per_shard: int = setting(10_000, ge=1, help="kept samples per output shard")
    url_col: str = setting("url", help="metadata column with the image url")
    caption_col: str = setting("text", help="metadata column with the caption")
    uid_col: str = setting("uid", help="metadata column with the uid")
    extra_columns: list[str] = setting(default_factory=list,
                                       help="metadata columns copied into each sample's json (e.g. scores)")
    image_size: int = setting(512, ge=1, help="img2dataset image_size")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = setting(
        "keep_ratio_largest", help="img2dataset resize_mode")
    resize_only_if_bigger: bool = setting(True, help="img2dataset resize_only_if_bigger")
    encode_quality: int = setting(95, ge=1, le=100, help="img2dataset JPEG quality")
    timeout_s: float = setting(10.0, gt=0, help="deadline of each download request: connecting, headers and "
                                                "body together (not per read), redirects included")
    connect_timeout_s: float = setting(5.0, gt=0, help="seconds to open each download's connection (TCP, and TLS "
                                                       "for https); at most timeout_s")
    max_response_bytes: int = setting(32 * 1024 * 1024, ge=1, help="larger responses are abandoned while "
                                                                   "streaming and counted as response_too_large")
    url_schemes: list[Literal["http", "https", "ftp", "file", "data"]] = setting(
        default_factory=lambda: ["http", "https"],
        help="url schemes that may be downloaded; rows with any other are dropped before the download "
             "(file:// would copy files of the downloading machine into the dataset)")
    retries: int = setting(0, ge=0, help="download retries per url")
    thread_count: int = setting(64, ge=1, help="download threads per process")
    processes: int = setting(1, ge=1, help="img2dataset processes")
    download_shard_size: int = setting(10_000, ge=1, help="samples per img2dataset shard")
    download_chunk_rows: int = setting(1_000_000, ge=1, help="metadata rows per download chunk: each is one "
                                                             "img2dataset run into its own folder, and array "
                                                             "tasks share the chunks out")
    distributor: Literal["multiprocessing", "pyspark", "ray"] = setting(
        "multiprocessing", identity=False, help="img2dataset's distributor: its own processes, or the Spark "
                                                "session / Ray cluster you run (then one job runs the stage)")
    keep_download: bool = setting(False, help="keep img2dataset's shards (a second full copy) after resharding")
    min_caption_chars: int = setting(1, ge=1, help="shorter captions (after stripping) are dropped")
    max_caption_chars: int = setting(0, ge=0, help="longer captions are dropped; 0: no limit")
    min_image_size: int = setting(0, ge=0, help="images whose original shorter side is smaller are dropped")
    max_aspect_ratio: float = setting(0.0, ge=0, help="images with a larger long/short side ratio are dropped; "
                                                      "0: no limit")
    max_pixels: int = setting(PIL_DEFAULT_MAX_PIXELS, ge=1, help="larger images are dropped")
    quality: int = setting(90, ge=1, le=100, help="JPEG quality of images we convert (PNG, CMYK, ...)")
    workers: int = setting(0, ge=0, help="processes writing shards; 0: one per CPU", identity=False)
    verify_shards: bool = setting(False, help="on a re-run, hash finished shards again (in parallel) instead of "
                                              "trusting their size and recorded sha256", identity=False)

    def check(self) -> None:
        if self.connect_timeout_s > self.timeout_s:
            raise SettingError("connect_timeout_s", f"{self.connect_timeout_s} is longer than the whole request's "
                                                    f"deadline timeout_s {self.timeout_s}")
