"""Manifest round trip, the files derived from it, and one-line errors naming the file and key."""

from __future__ import annotations

import json

import pytest

from pipeline.data.manifest import ClassInfo, Manifest, ManifestError, ShardInfo


def sample_manifest() -> Manifest:
    shards = [ShardInfo("000000.tar", 3, 3072, "a" * 64), ShardInfo("000001.tar", 2, 2048, "b" * 64)]
    classes = [ClassInfo(0, "n01440764", "tench"), ClassInfo(1, "n01443537", "goldfish")]
    return Manifest(name="tiny-train", kind="classification", shards=shards, split="train", classes=classes,
                    skipped={"truncated_image": 1}, converted={"cmyk": 2}, config={"seed": 3})


def test_round_trip_and_derived_files(tmp_path):
    manifest = sample_manifest()
    manifest.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest and loaded.num_samples == 5
    assert Manifest.load(tmp_path / "manifest.json") == manifest
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format"] == "kope-shards/1" and raw["num_samples"] == 5
    assert raw["fields"] == {"image": "jpg", "label": "cls"}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"000000.tar": 3, "000001.tar": 2}
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [3, 2]
    assert info["splits"]["train"]["filenames"] == ["000000.tar", "000001.tar"]
    assert (tmp_path / "classes.tsv").read_text() == "0\tn01440764\ttench\n1\tn01443537\tgoldfish\n"
    assert manifest.shard_paths(tmp_path) == [tmp_path / "000000.tar", tmp_path / "000001.tar"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_captions_manifest_has_no_classes(tmp_path):
    manifest = Manifest(name="cc", kind="captions", shards=[ShardInfo("000000.tar", 1, 10, "c" * 64)])
    manifest.save(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert "classes" not in raw and raw["fields"] == {"image": "jpg", "caption": "txt"}
    assert not (tmp_path / "classes.tsv").exists()
    assert Manifest.load(tmp_path) == manifest


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(format="other/1"), "format: expected 'kope-shards/1'"),
    (lambda d: d.update(kind="video"), "kind: expected one of"),
    (lambda d: d.update(num_samples=6), "num_samples: 6 differs from the shards' total 5"),
    (lambda d: d["shards"][1].update(sha256="xyz"), "shards.1.sha256: expected 64 hex digits"),
    (lambda d: d["shards"][0].update(name="a.tar"), "shards.0.name: expected NNNNNN.tar"),
    (lambda d: d["shards"][0].update(samples="3"), "shards.0.samples: expected int"),
    (lambda d: d["classes"][1].update(index=5), "classes: class indices must be 0..n-1"),
    (lambda d: d.pop("config"), "config: expected dict"),
])
def test_invalid_manifest_names_file_and_key(tmp_path, edit, message):
    sample_manifest().save(tmp_path)
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_missing_and_unparsable_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        Manifest.load(tmp_path)
