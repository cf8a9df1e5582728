"""Stage shard_imagenet on small real trees: every file lands in a shard or is counted by reason."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.imagenet_source import SourceError
from pipeline.data.manifest import Manifest
from stages import shard_imagenet
from tests.data.shard_fixtures import jpeg, make_imagenet_tree, read_tar, stage_context


def run_stage(tmp_path: Path, source: Path, **settings) -> tuple[dict, Path]:
    ctx = stage_context(tmp_path, "shard_imagenet")
    settings = {"samples_per_shard": 7, "workers": 1, **settings}
    outputs = shard_imagenet.run(shard_imagenet.Settings(source=str(source), **settings), ctx)
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
    run_stage(tmp_path, source, splits=["train"])
    assert {p.name: p.read_bytes() for p in train.iterdir()} == original
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
    settings = shard_imagenet.Settings(source=str(source), splits=["train"], samples_per_shard=7, workers=1)
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
