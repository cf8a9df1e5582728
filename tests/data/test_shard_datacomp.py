"""Stage shard_datacomp in reshard mode: uid subsets, filters and every bad-sample kind, counted by reason."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import KopeError
from pipeline.data.datacomp_source import BadShardError
from pipeline.data.manifest import Manifest
from pipeline.data.settings import DataCompShardSettings
from stages import shard_datacomp
from tests.data.shard_fixtures import (
    cmyk_jpeg,
    grey_jpeg,
    jpeg,
    palette_png,
    png,
    read_tar,
    stage_context,
    truncated_jpeg,
    write_img2dataset_shard,
)

FILTERS = {"max_caption_chars": 60, "min_image_size": 32, "max_aspect_ratio": 4.0}


def uid(n: int) -> str:
    return hashlib.md5(str(n).encode()).hexdigest()


def row(n: int, **fields) -> dict:
    """A successful img2dataset row, with a plain 48x40 photo-like JPEG unless overridden."""
    return {"key": f"{n:09d}", "status": "success", "error_message": None, "uid": uid(n),
            "caption": f"a photo of thing {n}", "url": f"http://example.com/{n}.jpg", "image": jpeg(n),
            "width": 48, "height": 40, "original_width": 48, "original_height": 40, "clip_score": n / 100,
            **fields}


def failed(n: int, status: str, message: str) -> dict:
    return {"key": f"{n:09d}", "status": status, "error_message": message, "uid": uid(n), "caption": "c"}


# (row, expected outcome): "kept", ("kept", converted_from) or the reason it is dropped
FIRST_SHARD = [
    (row(0), "kept"), (row(1), "kept"), (row(2), "kept"), (row(3), "kept"), (row(4), "kept"),
    (failed(5, "failed_to_download", "HTTP Error 404: Not Found"), "http_404"),
    (failed(6, "failed_to_download", "HTTP Error 404: Not Found"), "http_404"),
    (failed(7, "failed_to_download", "HTTP Error 500: Internal Server Error"), "http_500"),
    (failed(8, "failed_to_download", "The read operation timed out"), "timeout"),
    (failed(9, "failed_to_resize", "Image decoding error"), "not_an_image"),
    (row(10, image=truncated_jpeg(10)), "truncated_image"),
    (row(11, image=b""), "empty_file"),
    (row(12, image=b"<html>not found</html>"), "not_an_image"),
    (row(13, image=png(13)), ("kept", "png")),
    (row(14, image=cmyk_jpeg(14)), ("kept", "cmyk")),
    (row(15, image=grey_jpeg(15)), ("kept", "grayscale")),
    (row(16, image=palette_png(16)), ("kept", "png_palette")),
    (row(17, caption=""), "empty_caption"),
    (row(18, caption="   "), "empty_caption"),
    (row(19, txt=b"caf\xe9 latin-1 caption"), "caption_not_utf8"),
    (row(20, txt=None), "missing_caption"),
    (row(21, uid=uid(0)), "duplicate_uid"),
    (row(22), "not_in_uid_subset"),
    (row(23, caption="word " * 20), "caption_too_long"),
    (row(24, original_width=20, original_height=20), "image_too_small"),
    (row(25, original_width=200, original_height=40), "aspect_ratio_too_large"),
    (row(26, uid=None), "missing_uid"),
    (row(27, caption="un café à Paris"), "kept"),
]
SECOND_SHARD = [  # written without a parquet: planning reads the tar
    (row(30), "kept"), (row(31), "kept"), (row(32, txt=b"\xff\xfe"), "caption_not_utf8"),
    (row(33, uid=uid(1)), "duplicate_uid"), (row(34), "kept"),
]


def make_input(folder: Path) -> None:
    write_img2dataset_shard(folder, 0, [r for r, _ in FIRST_SHARD])
    write_img2dataset_shard(folder, 1, [r for r, _ in SECOND_SHARD], with_parquet=False)


def subset_file(path: Path, excluded: set[str], form: str = "structured") -> Path:
    uids = sorted({r["uid"] for r, _ in FIRST_SHARD + SECOND_SHARD if r.get("uid")} - excluded)
    pairs = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], dtype="u8,u8")
    pairs.sort()
    np.save(path, pairs if form == "structured" else pairs.view(np.uint64).reshape(-1, 2))
    return path


def run_stage(tmp_path: Path, source: Path, **settings) -> tuple[dict, Path]:
    ctx = stage_context(tmp_path, "shard_datacomp")
    settings = {"mode": "reshard", "samples_per_shard": 4, "workers": 1, **FILTERS, **settings}
    outputs = shard_datacomp.run(DataCompShardSettings(source=str(source), **settings), ctx)
    return outputs, ctx.out_dir


def stored(directory: Path) -> list[dict]:
    found = []
    for path in Manifest.load(directory).shard_paths(directory):
        members = read_tar(path)
        for i in range(0, len(members), 3):
            names = [member.name.split(".", 1)[1] for member, _ in members[i:i + 3]]
            assert names == ["jpg", "txt", "json"]
            found.append({"caption": members[i + 1][1].decode(), "meta": json.loads(members[i + 2][1])})
    return found


@pytest.mark.parametrize("form", ["structured", "pairs"])
def test_reshard_keeps_subset_and_counts_every_drop(tmp_path, form):
    source = tmp_path / "input"
    make_input(source)
    subset = subset_file(tmp_path / "subset.npy", {uid(22)}, form)
    outputs, out_dir = run_stage(tmp_path, source, uid_subset=str(subset), extra_columns=["clip_score"])
    manifest = Manifest.load(out_dir / "train")
    rows = FIRST_SHARD + SECOND_SHARD
    dropped = Counter(outcome for _, outcome in rows if isinstance(outcome, str) and outcome != "kept")
    converted = Counter(outcome[1] for _, outcome in rows if isinstance(outcome, tuple))
    assert manifest.skipped == dict(dropped) and manifest.converted == dict(converted)
    kept = [r for r, outcome in rows if outcome == "kept" or isinstance(outcome, tuple)]
    found = stored(out_dir / "train")
    assert [s["meta"]["uid"] for s in found] == [r["uid"] for r in kept]
    assert [s["caption"] for s in found] == [r["caption"] for r in kept]
    assert [s["meta"]["url"] for s in found] == [r["url"] for r in kept]
    assert [s["meta"]["clip_score"] for s in found] == [r["clip_score"] for r in kept]
    assert outputs["train_samples"] == manifest.num_samples == len(kept)
    planned = []  # every shard gets 4 planned samples; those failing when written leave it smaller
    for index in range(len(manifest.shards)):
        stats = json.loads((out_dir / "train" / f"{index:06d}_stats.json").read_text())
        planned.append(stats["count"] + sum(stats["skipped"].values()))
    assert planned[:-1] == [4] * (len(planned) - 1) and 0 < planned[-1] <= 4
    report = json.loads((out_dir / "report.json").read_text())["train"]
    listed = Counter(sample["reason"] for sample in report["skipped_samples"])
    assert listed == dropped - Counter({"not_in_uid_subset": 1})  # subset misses are counted, not listed


def test_reshard_without_subset_keeps_what_only_the_subset_dropped(tmp_path):
    source = tmp_path / "input"
    make_input(source)
    _, out_dir = run_stage(tmp_path, source)
    manifest = Manifest.load(out_dir / "train")
    assert "not_in_uid_subset" not in manifest.skipped
    assert uid(22) in {s["meta"]["uid"] for s in stored(out_dir / "train")}


def test_bad_input_shard_fails_the_stage_with_its_name(tmp_path):
    source = tmp_path / "input"
    make_input(source)
    tar = source / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(BadShardError, match=r"00000\.tar: "):
        run_stage(tmp_path, source)
    (source / "00001.tar").write_bytes(b"\x00" * 100 + b"garbage")
    (source / "00000.parquet").unlink()
    with pytest.raises(BadShardError, match=r"00000\.tar: unreadable shard"):
        run_stage(tmp_path, source)


def test_unsorted_subset_is_refused(tmp_path):
    source = tmp_path / "input"
    make_input(source)
    pairs = np.array([(5, 0), (1, 0)], dtype="u8,u8")
    np.save(tmp_path / "subset.npy", pairs)
    with pytest.raises(KopeError, match=r"subset.npy: uid subset is not sorted"):
        run_stage(tmp_path, source, uid_subset=str(tmp_path / "subset.npy"))


def test_array_tasks_write_their_range_and_run_finishes(tmp_path):
    source = tmp_path / "input"
    make_input(source)
    _, reference = run_stage(tmp_path / "reference", source)
    ctx = stage_context(tmp_path / "array", "shard_datacomp")
    settings = DataCompShardSettings(source=str(source), mode="reshard", samples_per_shard=4, workers=1, **FILTERS)
    shard_datacomp.run_part(settings, ctx, 2, 3)
    assert [p.name for p in (ctx.out_dir / "train").glob("*.tar")] == ["000002.tar"]
    shard_datacomp.run(settings, ctx)
    assert {p.name: p.read_bytes() for p in (ctx.out_dir / "train").iterdir()} == {
        p.name: p.read_bytes() for p in (reference / "train").iterdir()}
