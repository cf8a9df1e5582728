"""Stage shard_segmentation on a small ADE20K-style tree: good pairs round-trip through webdataset with
reduce_zero_label applied, every bad pair is counted by its reason, and a re-run writes the same bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.imagenet_source import SourceError
from pipeline.data.manifest import Manifest
from pipeline.data.reasons import is_documented
from pipeline.data.settings import SegmentationShardSettings
from stages import shard_segmentation
from tests.data.shard_fixtures import encode, jpeg, stage_context

SIZE = (48, 40)  # width, height
NAMES = "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding, edifice\n3\t0.1\t1\t1\tsky\n"


def raw_mask(seed: int, size: tuple[int, int] = SIZE, highest: int = 3) -> np.ndarray:
    """An ADE20K-style annotation: 0 ('other') and the classes 1..highest."""
    return np.random.default_rng(seed).integers(0, highest + 1, size=(size[1], size[0]), dtype=np.uint8)


def png(mask: np.ndarray, mode: str = "L") -> bytes:
    image = Image.fromarray(mask, "L")
    return encode(image.convert(mode) if mode != "L" else image, "PNG")


def make_tree(root: Path) -> dict[str, np.ndarray]:
    """Four good training pairs and one of each bad kind; returns the good ones' raw masks by stem."""
    images, masks = root / "images" / "training", root / "annotations" / "training"
    for folder in (images, masks, root / "images" / "validation", root / "annotations" / "validation"):
        folder.mkdir(parents=True)
    good = {f"ADE_train_{i:08d}": raw_mask(i) for i in range(4)}
    for number, (stem, mask) in enumerate(good.items()):
        (images / f"{stem}.jpg").write_bytes(jpeg(number, SIZE))
        (masks / f"{stem}.png").write_bytes(png(mask))
    (images / "no_mask.jpg").write_bytes(jpeg(10, SIZE))
    (masks / "no_image.png").write_bytes(png(raw_mask(11)))
    (images / "garbage.jpg").write_bytes(jpeg(12, SIZE))
    (masks / "garbage.png").write_bytes(b"not a png at all")
    (images / "colour.jpg").write_bytes(jpeg(13, SIZE))
    (masks / "colour.png").write_bytes(png(raw_mask(13), "RGB"))
    (images / "small.jpg").write_bytes(jpeg(14, SIZE))
    (masks / "small.png").write_bytes(png(raw_mask(14, (24, 20))))
    (images / "range.jpg").write_bytes(jpeg(15, SIZE))
    (masks / "range.png").write_bytes(png(raw_mask(15, highest=4)))  # 4 > num_classes 3
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (masks / "broken.png").write_bytes(png(raw_mask(16)))
    (root / "images" / "validation" / "v.jpg").write_bytes(jpeg(20, SIZE))
    (root / "annotations" / "validation" / "v.png").write_bytes(png(raw_mask(20)))
    (root / "objectInfo150.txt").write_text(NAMES, encoding="utf-8")
    return good


def run_stage(tmp_path: Path, source: Path, **settings) -> tuple[dict, Path]:
    ctx = stage_context(tmp_path, "shard_segmentation")
    settings = {"num_classes": 3, "samples_per_shard": 4, "workers": 1, **settings}
    return shard_segmentation.run(SegmentationShardSettings(source=str(source), **settings), ctx), ctx.out_dir


def test_pairs_round_trip_through_webdataset_and_bad_pairs_are_counted_by_reason(tmp_path):
    good = make_tree(tmp_path / "ade")
    outputs, out_dir = run_stage(tmp_path, tmp_path / "ade")
    assert outputs["train_samples"] == 4 and outputs["val_samples"] == 1 and outputs["num_classes"] == 3

    manifest = Manifest.load(out_dir / "train")
    assert manifest.kind == "segmentation" and manifest.fields == {"image": "jpg", "mask": "seg.png"}
    assert [(c.index, c.wnid, c.name) for c in manifest.classes] == [
        (0, "wall", "wall"), (1, "building", "building, edifice"), (2, "sky", "sky")]
    expected = {"missing_mask": 1, "orphan_mask": 1, "corrupt_mask": 1, "unsupported_mask": 1,
                "mask_size_mismatch": 1, "label_out_of_range": 1, "not_an_image": 1}
    assert manifest.skipped == expected and all(is_documented(reason) for reason in expected)
    report = json.loads((out_dir / "report.json").read_text())["train"]
    sources = {entry["reason"]: entry["source"] for entry in report["skipped_samples"]}
    assert sources["missing_mask"] == "images/training/no_mask.jpg"
    assert sources["orphan_mask"] == "annotations/training/no_image.png"
    assert sources["mask_size_mismatch"] == "annotations/training/small.png"
    assert sources["not_an_image"] == "images/training/broken.jpg"
    assert (out_dir / "train" / "classes.tsv").read_text().splitlines()[1] == "1\tbuilding\tbuilding, edifice"

    urls = [str(path) for path in manifest.shard_paths(out_dir / "train")]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        mask = np.array(Image.open(io.BytesIO(sample["seg.png"])))
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.size == SIZE and mask.shape == (SIZE[1], SIZE[0])
        seen[meta["uid"]] = (mask, meta)
    assert sorted(seen) == sorted(good)
    for stem, raw in good.items():
        mask, meta = seen[stem]
        reduced = np.where(raw == 0, 255, raw.astype(int) - 1)  # mmseg's reduce_zero_label
        assert np.array_equal(mask, reduced)
        assert meta["classes"] == sorted(set(reduced.ravel().tolist()) - {255})
        assert meta["mask_path"] == f"annotations/training/{stem}.png"

    before = {path.name: path.read_bytes() for path in (out_dir / "train").glob("*.tar")}
    for path in (out_dir / "train").glob("*_stats.json"):
        path.unlink()  # forces every shard to be written again
    run_stage(tmp_path, tmp_path / "ade")
    assert {path.name: path.read_bytes() for path in (out_dir / "train").glob("*.tar")} == before


def test_without_reduce_zero_label_values_are_stored_as_given(tmp_path):
    root = tmp_path / "ade"
    good = make_tree(root)
    (root / "objectInfo150.txt").unlink()
    outputs, out_dir = run_stage(tmp_path, root, num_classes=5, reduce_zero_label=False, splits={"training": "t"})
    assert outputs["t_samples"] == 5  # range.png's 4 is a class now
    manifest = Manifest.load(out_dir / "t")
    assert manifest.skipped["missing_mask"] == 1 and "label_out_of_range" not in manifest.skipped
    assert [c.name for c in manifest.classes] == ["class_0", "class_1", "class_2", "class_3", "class_4"]
    urls = [str(path) for path in manifest.shard_paths(out_dir / "t")]
    masks = {json.loads(s["json"])["uid"]: np.array(Image.open(io.BytesIO(s["seg.png"])))
             for s in wds.WebDataset(urls, shardshuffle=False)}
    assert all(np.array_equal(masks[stem], raw) for stem, raw in good.items())


def test_a_names_file_that_does_not_match_num_classes_is_one_error(tmp_path):
    make_tree(tmp_path / "ade")
    with pytest.raises(SourceError, match=r"objectInfo150.txt: 3 class names, but num_classes is 150"):
        run_stage(tmp_path, tmp_path / "ade", num_classes=150)
