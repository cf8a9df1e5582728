"""Demo data is a pure function of its seed, and is what the class rule says it is."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.demo_data import DemoSpec, class_pairs, make_demo_data, wnid

SMALL = DemoSpec(seed=3, train_per_class=2, val_per_class=1, captioned=30)


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = digest_tree(make_demo_data(tmp_path / "a", SMALL))
    second = digest_tree(make_demo_data(tmp_path / "b", SMALL))
    assert first == second
    other = digest_tree(make_demo_data(tmp_path / "c", DemoSpec(seed=4, train_per_class=2, val_per_class=1,
                                                                captioned=30)))
    assert set(other) != set(first) or any(other[k] != first[k] for k in first)


def test_layout_and_contents(tmp_path):
    root = make_demo_data(tmp_path / "demo", SMALL)
    classes = (root / "imagenet" / "classes.tsv").read_text().splitlines()
    assert len(classes) == 90 == len(class_pairs())
    index, class_wnid, name = classes[37].split("\t")
    assert index == "37" and class_wnid == wnid(class_pairs()[37]) and " then " in name
    train = sorted((root / "imagenet" / "train").glob("*/*.JPEG"))
    val = sorted((root / "imagenet" / "val").glob("*/*.JPEG"))
    assert len(train) == 180 and len(val) == 90
    with Image.open(train[0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB" and image.format == "JPEG"
    table = pq.read_table(root / "datacomp" / "metadata.parquet").to_pylist()
    assert len(table) == 30 and len({row["uid"] for row in table}) == 30
    row = table[0]
    assert len(row["uid"]) == 32 and int(row["uid"], 16) >= 0
    assert (root / "datacomp" / row["url"]).is_file()
    words = row["text"].split()
    assert words[0] == "a" and ("above" in words or "left" in words) and words[1] != words[-1]


def test_rerun_is_a_no_op_and_partial_output_is_replaced(tmp_path):
    root = make_demo_data(tmp_path / "demo", SMALL)
    marker_mtime = (root / "demo.json").stat().st_mtime_ns
    make_demo_data(root, SMALL)
    assert (root / "demo.json").stat().st_mtime_ns == marker_mtime
    (root / "demo.json").unlink()
    (root / "imagenet" / "classes.tsv").write_text("garbage")
    make_demo_data(root, SMALL)
    assert (root / "imagenet" / "classes.tsv").read_text().count("\n") == 90


def test_fewer_digits_fewer_classes_and_zeroshot_names_match_the_captions(tmp_path):
    root = make_demo_data(tmp_path / "demo", DemoSpec(seed=1, train_per_class=1, val_per_class=1, captioned=20,
                                                      digits=3))
    classes = (root / "imagenet" / "classes.tsv").read_text().splitlines()
    assert [line.split("\t")[1] for line in classes] == [wnid(pair) for pair in class_pairs(3)] and len(classes) == 6
    assert len(list((root / "imagenet" / "train").glob("*/*.JPEG"))) == 6
    names = (root / "imagenet" / "zeroshot_classnames.txt").read_text().splitlines()
    assert names[class_pairs(3).index((2, 0))] == "a 2 left of a 0"
    for row in pq.read_table(root / "datacomp" / "metadata.parquet").to_pylist():
        words = row["text"].split()
        first, second = int(words[1]), int(words[-1])
        assert first < 3 and second < 3 and first != second
        assert row["text"] in names[class_pairs(3).index((first, second))].split(" | ")


def test_digits_out_of_range_is_refused():
    with pytest.raises(ValueError, match="digits must be between 2 and 10"):
        DemoSpec(digits=1)


def test_segmentation_masks_label_each_digit_pixel_by_its_digit(tmp_path):
    root = make_demo_data(tmp_path / "demo", DemoSpec(seed=2, digits=4, train_per_class=2, val_per_class=1,
                                                      captioned=1))
    seg = root / "segmentation"
    assert (seg / "classes.txt").read_text().split() == ["background", "zero", "one", "two", "three"]
    images = sorted((seg / "images" / "training").glob("*.jpg"))
    assert len(images) == 24 and len(list((seg / "images" / "validation").glob("*.jpg"))) == 12
    for path in images:
        pair = class_pairs(4)[[wnid(p) for p in class_pairs(4)].index(path.stem.split("_")[0])]
        assert path.read_bytes() == (root / "imagenet" / "train" / wnid(pair) / f"{path.stem}.JPEG").read_bytes()
        with Image.open(seg / "annotations" / "training" / f"{path.stem}.png") as annotation, Image.open(path) as image:
            mask, pixels = np.array(annotation), np.array(image.convert("L")).astype(float)
        assert annotation.mode == "L" and mask.shape == (64, 64)
        assert set(np.unique(mask[:, :30]).tolist()) == {0, pair[0] + 1}  # the left digit, and background
        assert set(np.unique(mask[:, 34:]).tolist()) == {0, pair[1] + 1}
        assert pixels[mask > 0].mean() > pixels[mask == 0].mean() + 60  # masks cover the bright ink
    assert not (make_demo_data(tmp_path / "plain", DemoSpec(seed=2, segmentation=False, train_per_class=1,
                                                            val_per_class=1, captioned=1)) / "segmentation").exists()
