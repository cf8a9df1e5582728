"""Stage shard_imagenet on small real trees: every file lands in a shard or is counted by reason."""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.fsutil import fingerprint_path
from pipeline.data.imagenet_source import SourceError
from pipeline.data.manifest import Manifest
from pipeline.data.reasons import is_documented
from pipeline.data.settings import ImageNetShardSettings
from pipeline.data.text_files import TextFileError
from stages import shard_imagenet
from tests.data.shard_fixtures import encode, jpeg, make_imagenet_tree, read_tar, stage_context


def run_stage(tmp_path: Path, source: Path, **settings) -> tuple[dict, Path]:
    ctx = stage_context(tmp_path, "shard_imagenet")
    settings = {"samples_per_shard": 7, "workers": 1, **settings}
    outputs = shard_imagenet.run(ImageNetShardSettings(source=str(source), **settings), ctx)
    return outputs, ctx.out_dir


def samples(directory: Path) -> list[dict]:
    """Every sample of a dataset folder, in shard order, with its members and tar headers."""
    found = []
    for path in Manifest.load(directory).shard_paths(directory):
        members = read_tar(path)
        for i in range(0, len(members), 3):
            (jpg, image), (cls, label), (meta, raw) = members[i:i + 3]
            key = jpg.name.split(".")[0]
            assert [jpg.name, cls.name, meta.name] == [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
            found.append({"shard": path.name, "key": key, "image": image, "label": int(label),
                          "meta": json.loads(raw), "headers": [jpg, cls, meta]})
    return found


def test_planted_tree_is_sharded_with_every_bad_file_counted(tmp_path):
    source = tmp_path / "imagenet"
    expected = make_imagenet_tree(source)
    outputs, out_dir = run_stage(tmp_path, source)
    assert outputs["train"] == "shard_imagenet/train" and outputs["num_classes"] == 3
    wnids = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    report = json.loads((out_dir / "report.json").read_text())
    for split in ("train", "val"):
        directory = out_dir / split
        manifest = Manifest.load(directory)
        kept = {path: outcome for path, outcome in expected[split].items() if outcome[0] == "kept"}
        bad = {path: outcome[1] for path, outcome in expected[split].items() if outcome[0] == "skipped"}
        assert manifest.skipped == dict(Counter(bad.values()))
        assert all(is_documented(reason) for reason in manifest.skipped)
        assert manifest.converted == dict(Counter(o[2] for o in kept.values() if o[2]))
        assert {(s["source"], s["reason"]) for s in report[split]["skipped_samples"]} == set(bad.items())
        assert outputs[f"{split}_samples"] == manifest.num_samples == len(kept)
        found = samples(directory)
        assert sorted(s["meta"]["path"] for s in found) == sorted(kept)
        for sample in found:
            path = sample["meta"]["path"]
            _, wnid, converted = kept[path]
            assert sample["label"] == wnids.index(wnid) and sample["meta"]["wnid"] == wnid
            image = Image.open(io.BytesIO(sample["image"]))
            assert (image.format, image.mode) == ("JPEG", "RGB")
            assert (sample["meta"]["width"], sample["meta"]["height"]) == image.size
            if converted is None:
                assert sample["image"] == (source / path).read_bytes()
            for header in sample["headers"]:
                assert (header.mtime, header.mode, header.uid, header.gid, header.uname, header.gname) == (
                    0, 0o444, 0, 0, "", "")
        for info in manifest.shards:
            data = (directory / info.name).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (info.bytes, info.sha256)
            table = pq.read_table(directory / info.name.replace(".tar", ".parquet")).to_pydict()
            in_shard = [s for s in found if s["shard"] == info.name]
            assert table["key"] == [s["key"] for s in in_shard] and table["label"] == [s["label"] for s in in_shard]
            assert len(in_shard) == info.samples
            stats = json.loads((directory / info.name.replace(".tar", "_stats.json")).read_text())
            assert stats["count"] == info.samples and stats["sha256"] == info.sha256
    train = samples(out_dir / "train")
    by_shard = Counter((s["shard"], s["label"]) for s in train)
    assert all(len({label for shard, label in by_shard if shard == name}) >= 2
               for name in {s["shard"] for s in train}), "every shard should mix classes"
    assert len({s["key"] for s in train}) == len(train)


def test_rerun_keeps_finished_shards_and_rewrites_damaged_ones(tmp_path):
    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0, train_per_class=10)
    _, out_dir = run_stage(tmp_path, source, splits=["train"])
    train = out_dir / "train"
    original = {p.name: p.read_bytes() for p in train.iterdir()}
    untouched = (train / "000000.tar").stat().st_mtime_ns
    damaged = bytearray(original["000001.tar"])
    damaged[700] ^= 0xFF
    (train / "000001.tar").write_bytes(bytes(damaged))
    (train / "000002_stats.json").unlink()
    (train / ".000003.tar.abc.tmp").write_bytes(b"half a shard")
    (train / "000003.tar").write_bytes(original["000003.tar"][:-1024])
    run_stage(tmp_path, source, splits=["train"])
    assert (train / "000001.tar").read_bytes() == bytes(damaged), "same size and recorded digest: trusted"
    assert {p.name: p.read_bytes() for p in train.iterdir()} == {**original, "000001.tar": bytes(damaged)}
    assert (train / "000000.tar").stat().st_mtime_ns == untouched

    run_stage(tmp_path, source, splits=["train"], verify_shards=True)
    verified = {p.name: p.read_bytes() for p in train.iterdir()}
    assert verified.pop("manifest.json") != original["manifest.json"], "its config records verify_shards"
    assert verified == {name: data for name, data in original.items() if name != "manifest.json"}
    assert (train / "000000.tar").stat().st_mtime_ns == untouched

    run_stage(tmp_path, source, splits=["train"], samples_per_shard=20)
    assert sorted(p.name for p in train.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert sorted(p.name for p in train.glob("*_stats.json")) == ["000000_stats.json", "000001_stats.json"]
    assert Manifest.load(train).num_samples == 30


def test_array_tasks_write_their_shards_and_run_finishes_the_rest(tmp_path):
    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0, train_per_class=10)
    _, reference = run_stage(tmp_path / "reference", source, splits=["train"])
    ctx = stage_context(tmp_path / "array", "shard_imagenet")
    settings = ImageNetShardSettings(source=str(source), splits=["train"], samples_per_shard=7, workers=1)
    shard_imagenet.run_part(settings, ctx, 1, 3)
    train = ctx.out_dir / "train"
    assert sorted(p.name for p in train.glob("*.tar")) == ["000001.tar", "000004.tar"]
    assert not (train / "manifest.json").exists()
    shard_imagenet.run(settings, ctx)
    assert {p.name: p.read_bytes() for p in train.iterdir()} == {
        p.name: p.read_bytes() for p in (reference / "train").iterdir()}


def test_flat_val_with_each_label_file_format(tmp_path):
    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0, val_per_class=0)
    wnids = sorted(p.name for p in (source / "train").iterdir())
    val = source / "val"
    for folder in list(val.iterdir()):  # empty class folders: make val/ flat
        folder.rmdir()
    truth = [2, 0, 1, 1, 0]
    for i in range(1, 6):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(50 + i))
    (val / "extra_photo.JPEG").write_bytes(jpeg(60))  # in no label list
    labels = {f"ILSVRC2012_val_{i:08d}": wnids[t] for i, t in enumerate(truth, start=1)}
    # the ground-truth list numbers classes by ILSVRC2012 id, here the reverse of the sorted order
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("".join(f"{w}\n" for w in reversed(wnids)))
    ground_truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    ground_truth.write_text("".join(f"{len(wnids) - t}\n" for t in truth))
    loc = tmp_path / "LOC_val_solution.csv"
    loc.write_text("ImageId,PredictionString\n" + "".join(f"{k},{w} 1 2 30 40 \n" for k, w in labels.items()))
    pairs = tmp_path / "val_labels.txt"
    pairs.write_text("".join(f"{k}.JPEG {w}\n" for k, w in labels.items()))
    for run, extra in enumerate(({"val_labels": str(loc)}, {"val_labels": str(pairs)},
                                 {"val_labels": str(ground_truth), "val_synsets": str(synsets)})):
        _, out_dir = run_stage(tmp_path / str(run), source, splits=["val"], **extra)
        found = {s["meta"]["path"]: s["label"] for s in samples(out_dir / "val")}
        assert found == {f"val/{k}.JPEG": wnids.index(w) for k, w in labels.items()}
        assert Manifest.load(out_dir / "val").skipped == {"missing_label": 1}


def test_shards_by_source_bytes_and_resized_images(tmp_path):
    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0, size=(160, 120))
    limit = 25_000
    _, out_dir = run_stage(tmp_path, source, splits=["train"], shard_bytes=limit, resize_shorter=60)
    found = samples(out_dir / "train")
    assert len(found) == 24
    sizes = Counter()
    for sample in found:
        sizes[sample["shard"]] += (source / sample["meta"]["path"]).stat().st_size
        assert (sample["meta"]["width"], sample["meta"]["height"]) == (80, 60)
        assert (sample["meta"]["original_width"], sample["meta"]["original_height"]) == (160, 120)
        assert Image.open(io.BytesIO(sample["image"])).size == (80, 60)
    assert len(sizes) > 1 and all(total <= limit for total in sizes.values())


def test_source_errors_are_one_line_and_name_the_place(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty: no classes"):
        run_stage(tmp_path, tmp_path / "empty")
    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0)
    for folder in (source / "val").iterdir():
        for file in folder.iterdir():
            file.rename(source / "val" / file.name)
        folder.rmdir()
    with pytest.raises(SourceError, match=r"val: flat split folder .*set val_labels"):
        run_stage(tmp_path, source)
    (source / "classes.tsv").write_text("0\tn00001001\tb\n1\tn00001000\ta\n")
    with pytest.raises(SourceError, match=r"classes.tsv: line 1: index 0 for n00001001"):
        run_stage(tmp_path, source)


# --- hostile trees: names, nesting, links, label lists --------------------------------------------------

def latin1(name: str) -> str:
    """``name`` as a file name whose bytes are latin-1 (not valid UTF-8), as os hands it to Python."""
    return os.fsdecode(name.encode("latin-1"))


def test_file_names_that_are_not_utf8_are_kept_under_escaped_paths(tmp_path):
    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0, train_per_class=2, val_per_class=1)
    wnid = sorted(p.name for p in (source / "train").iterdir())[1]
    (source / "train" / wnid / latin1("café.JPEG")).write_bytes(jpeg(70))
    (source / "train" / latin1("stray-é.JPEG")).write_bytes(jpeg(71))
    assert fingerprint_path(source)  # the runner's input fingerprint lists these names too
    outputs, out_dir = run_stage(tmp_path, source)
    found = {s["meta"]["path"]: s for s in samples(out_dir / "train")}
    escaped = found[f"train/{wnid}/caf\\xe9.JPEG"]
    assert escaped["meta"]["path_escaped"] is True and escaped["meta"]["uid"] == "caf\\xe9"
    assert escaped["image"] == (source / "train" / wnid / latin1("café.JPEG")).read_bytes()
    assert not any(s["meta"].get("path_escaped") for path, s in found.items() if path != escaped["meta"]["path"])
    manifest = Manifest.load(out_dir / "train")
    assert manifest.renamed == {"name_not_utf8": 1} and manifest.skipped == {"missing_label": 1}
    report = json.loads((out_dir / "report.json").read_text())
    assert report["train"]["skipped_samples"][0]["source"] == "train/stray-\\xe9.JPEG"
    assert report["train"]["renamed"] == {"name_not_utf8": 1}


def test_nested_folders_are_walked_as_imagefolder_does_and_odd_entries_are_counted(tmp_path):
    from torchvision.datasets import ImageFolder

    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0, train_per_class=2, val_per_class=1)
    wnids = sorted(p.name for p in (source / "train").iterdir())
    deep = source / "train" / wnids[0] / "extra" / "deeper"
    deep.mkdir(parents=True)
    (deep.parent / "a.JPEG").write_bytes(jpeg(80))
    (deep / "b.JPEG").write_bytes(jpeg(81))
    (source / "train" / wnids[1] / "link.JPEG").symlink_to(source / "train" / wnids[0] / "extra" / "a.JPEG")
    reference = ImageFolder(str(source / "train"))
    expected = sorted((str(Path(path).relative_to(source)), label) for path, label in reference.samples)

    (source / "train" / wnids[2] / "gone.JPEG").symlink_to(source / "nowhere.JPEG")
    os.mkfifo(source / "train" / wnids[2] / "pipe.JPEG")
    (deep / "loop").symlink_to(source / "train" / wnids[0], target_is_directory=True)
    (source / "train" / "dangling-top.JPEG").symlink_to(source / "nowhere.JPEG")
    _, out_dir = run_stage(tmp_path, source, splits=["train"])
    assert sorted((s["meta"]["path"], s["label"]) for s in samples(out_dir / "train")) == expected
    assert any("/extra/deeper/" in path for path, _ in expected)
    assert Manifest.load(out_dir / "train").skipped == {"dangling_link": 2, "not_a_regular_file": 1,
                                                        "directory_loop": 1}
    report = json.loads((out_dir / "report.json").read_text())["train"]
    assert sorted((s["reason"], s["source"]) for s in report["skipped_samples"]) == [
        ("dangling_link", "train/dangling-top.JPEG"), ("dangling_link", f"train/{wnids[2]}/gone.JPEG"),
        ("directory_loop", f"train/{wnids[0]}/extra/deeper/loop"),
        ("not_a_regular_file", f"train/{wnids[2]}/pipe.JPEG")]


def flat_val(tmp_path: Path, count: int = 5) -> tuple[Path, list[str], list[int]]:
    """A tree whose val/ is flat with ``count`` ILSVRC-named images; returns (root, wnids, true class per image)."""
    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0, train_per_class=1, val_per_class=0)
    for folder in list((source / "val").iterdir()):
        folder.rmdir()
    truth = [(2 * i + 1) % 3 for i in range(count)]
    for i in range(1, count + 1):
        (source / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(90 + i))
    return source, sorted(p.name for p in (source / "train").iterdir()), truth


def test_label_files_with_a_byte_order_mark_are_read(tmp_path):
    source, wnids, truth = flat_val(tmp_path)
    expected = {f"val/ILSVRC2012_val_{i:08d}.JPEG": t for i, t in enumerate(truth, start=1)}
    loc = tmp_path / "LOC_val_solution.csv"
    loc.write_bytes(codecs.BOM_UTF8 + ("ImageId,PredictionString\r\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{wnids[t]} 1 2 3 4\r\n" for i, t in enumerate(truth, start=1))).encode())
    pairs = tmp_path / "val_labels.txt"
    pairs.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {wnids[t]}\n" for i, t in enumerate(truth, start=1)),
                     encoding="utf-16")  # with its byte order mark, as Windows editors save "Unicode"
    synsets = tmp_path / "synsets.txt"
    synsets.write_bytes(codecs.BOM_UTF8 + "".join(f"{w}\n" for w in wnids).encode())
    truth_file = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth_file.write_bytes(codecs.BOM_UTF8 + "".join(f"{t + 1}\n" for t in truth).encode())
    names = source / "classes.tsv"
    names.write_bytes(codecs.BOM_UTF8 + names.read_bytes())
    for run, extra in enumerate(({"val_labels": str(loc)}, {"val_labels": str(pairs)},
                                 {"val_labels": str(truth_file), "val_synsets": str(synsets)})):
        _, out_dir = run_stage(tmp_path / str(run), source, splits=["val"], **extra)
        assert {s["meta"]["path"]: s["label"] for s in samples(out_dir / "val")} == expected
        assert Manifest.load(out_dir / "val").classes[0].name == "class 0"


@pytest.mark.parametrize("lines, message", [
    (["2", "3", "", "1", "2", "3"], r"ground_truth\.txt: line 3: blank line"),
    (["2", "3", "1", "2"], r"ground_truth\.txt: 4 lines, but .*ILSVRC2012_val_00000005 needs line 5"),
    (["2", "3", "1", "2", "3", "1"], r"ground_truth\.txt: line 6: labels image 6, but the highest-numbered image .* "
                                     r"is 5"),
    (["2", "3", "1", "2 3", "3"], r"ground_truth\.txt: line 4: expected a class id"),
])
def test_a_numbered_label_list_that_does_not_match_the_images_is_an_error(tmp_path, lines, message):
    source, wnids, _ = flat_val(tmp_path)
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("".join(f"{w}\n" for w in wnids))
    truth_file = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth_file.write_text("".join(f"{line}\n" for line in lines) + "\n\n")  # trailing blank lines are harmless
    with pytest.raises(SourceError, match=message):
        run_stage(tmp_path, source, splits=["val"], val_labels=str(truth_file), val_synsets=str(synsets))


def test_a_label_file_that_is_not_text_names_the_file_and_line(tmp_path):
    source, wnids, truth = flat_val(tmp_path)
    pairs = tmp_path / "val_labels.txt"
    pairs.write_bytes(f"ILSVRC2012_val_00000001.JPEG {wnids[0]}\n".encode() + b"caf\xe9.JPEG n00001000\n")
    with pytest.raises(TextFileError, match=r"val_labels\.txt: line 2: not UTF-8 text"):
        run_stage(tmp_path, source, splits=["val"], val_labels=str(pairs))


def test_a_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    source = tmp_path / "imagenet"
    make_imagenet_tree(source, plant=0, train_per_class=1, val_per_class=0)
    wnid = sorted(p.name for p in (source / "train").iterdir())[0]
    ramp = np.linspace(0, 65535, 48 * 40).reshape(40, 48).astype(np.uint16)
    (source / "train" / wnid / "deep.png").write_bytes(encode(Image.fromarray(ramp), "PNG"))
    _, out_dir = run_stage(tmp_path, source, splits=["train"])
    stored_image = next(s for s in samples(out_dir / "train") if s["meta"]["path"].endswith("deep.png"))
    pixels = np.asarray(Image.open(io.BytesIO(stored_image["image"])).convert("L"), np.float32)
    assert np.abs(pixels - ramp / 257).mean() < 3
    assert Manifest.load(out_dir / "train").converted == {"png_gray16": 1}
