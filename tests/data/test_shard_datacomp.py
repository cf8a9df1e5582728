"""Stage shard_datacomp in reshard mode: uid subsets, filters and every bad-sample kind, counted by reason."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import KopeError
from pipeline.data.datacomp_download import write_download_list
from pipeline.data.datacomp_source import BadShardError, SampleFilters, plan_reshard
from pipeline.data.images import ImageOptions
from pipeline.data.manifest import Manifest
from pipeline.data.reasons import is_documented
from pipeline.data.settings import DataCompShardSettings
from pipeline.data.uids import UidColumnError
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
    assert all(is_documented(reason) for reason in manifest.skipped)
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


def test_array_tasks_write_their_range_and_run_finishes(tmp_path, caplog):
    source = tmp_path / "input"
    make_input(source)
    _, reference = run_stage(tmp_path / "reference", source)
    ctx = stage_context(tmp_path / "array", "shard_datacomp")
    settings = DataCompShardSettings(source=str(source), mode="reshard", samples_per_shard=4, workers=1, **FILTERS)
    caplog.set_level("INFO", logger="shard_datacomp")
    shard_datacomp.run_part(settings, ctx, 2, 3)
    assert [p.name for p in (ctx.out_dir / "train").glob("*.tar")] == ["000002.tar"]
    shard_datacomp.run_part(settings, ctx, 0, 3)
    shard_datacomp.run(settings, ctx)
    assert {p.name: p.read_bytes() for p in (ctx.out_dir / "train").iterdir()} == {
        p.name: p.read_bytes() for p in (reference / "train").iterdir()}
    planned = [record for record in caplog.records if record.getMessage().startswith("planning the reshard")]
    assert len(planned) == 1, "the first task plans; the other task and the final job read its plan"
    assert not (ctx.out_dir / "_plan").exists()


# --- hostile inputs: uid types, repeated keys, cut tars ----------------------------------------------------

def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members, in this order (duplicates allowed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def sample_members(key: str, caption: str, uid_value, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg(seed)), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps({"uid": uid_value, "original_width": 48, "original_height": 40}).encode())]


def test_uids_of_any_type_are_stored_as_strings(tmp_path):
    """LAION-style integer uids, binary uids and integer uids in a tar's json all become strings."""
    source = tmp_path / "input"
    write_img2dataset_shard(source, 0, [row(n, uid=(n + 1) * 1000) for n in range(3)])  # an int64 uid column
    write_img2dataset_shard(source, 1, [row(n) for n in range(3, 5)])
    parquet = pq.read_table(source / "00001.parquet")  # with a binary uid column
    parquet = parquet.set_column(parquet.schema.get_field_index("uid"), "uid", pa.array([b"\3" * 16, b"\4" * 16]))
    pq.write_table(parquet, source / "00001.parquet")
    write_tar(source / "00002.tar", sample_members("k0", "int zero", 0, 5) + sample_members("k1", "big", 2**62, 6)
              + sample_members("k2", "float", 1.5, 7))
    _, out_dir = run_stage(tmp_path, source)
    found = stored(out_dir / "train")
    assert [s["meta"]["uid"] for s in found] == ["1000", "2000", "3000", "03" * 16, "04" * 16, "0", str(2**62)]
    assert Manifest.load(out_dir / "train").skipped == {"bad_uid": 1}
    table = pq.read_table(out_dir / "train" / "000000.parquet")
    assert table.schema.field("uid").type == pa.string()


def test_a_uid_column_of_the_wrong_type_is_one_line_naming_file_and_column(tmp_path):
    source = tmp_path / "input"
    write_img2dataset_shard(source, 0, [row(n, uid=n + 0.5) for n in range(2)])
    with pytest.raises(UidColumnError, match=r"00000\.parquet: column 'uid': uids must be integers, strings or "
                                             r"bytes, got double$"):
        run_stage(tmp_path, source)
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    pq.write_table(pa.table({"uid": [1.5, 2.5], "url": ["http://x/a.jpg"] * 2, "text": ["a", "b"],
                             "SAMPLE_ID": [[1], [2]]}), metadata / "part.parquet")
    ctx = stage_context(tmp_path / "download", "shard_datacomp")
    for column, kind in (("uid", "double"), ("SAMPLE_ID", "list<element: int64>")):
        settings = DataCompShardSettings(source=str(metadata), uid_col=column, workers=1)
        with pytest.raises(KopeError, match=rf"part\.parquet: column '{column}': .* got {re.escape(kind)}$"):
            shard_datacomp.run(settings, ctx)  # before anything is downloaded
        assert not (ctx.out_dir / "_download" / "shards").exists()


def test_rows_left_out_of_a_download_are_counted_and_listed(tmp_path):
    metadata = tmp_path / "metadata.parquet"
    pq.write_table(pa.table({"uid": ["a", None, "c", "d", "e", "f"], "text": ["t"] * 6,
                             "url": ["http://h/a.jpg", "http://h/b.jpg", None, "file:///etc/passwd",
                                     "gopher://h/e", "HTTPS://h/f.jpg"]}), metadata)
    rows, dropped = write_download_list(metadata, tmp_path / "list.parquet", url_col="url", caption_col="text",
                                        uid_col="uid", extra_columns=[], subset=None, base_url=None)
    assert rows == 2 and pq.read_table(tmp_path / "list.parquet").column("uid").to_pylist() == ["a", "f"]
    assert dropped.counts == {"missing_uid": 1, "missing_url": 1, "url_scheme_not_allowed": 2}
    assert [(s["reason"], s["source"], s["detail"]) for s in dropped.samples] == [
        ("missing_uid", "metadata.parquet:row 1", "http://h/b.jpg"), ("missing_url", "metadata.parquet:row 2", "c"),
        ("url_scheme_not_allowed", "metadata.parquet:row 3", "file:///etc/passwd"),
        ("url_scheme_not_allowed", "metadata.parquet:row 4", "gopher://h/e")]
    source = tmp_path / "input"
    make_input(source)
    plan = plan_reshard(source, samples_per_shard=4, filters=SampleFilters(), image=ImageOptions(), source="t",
                        dropped_before=dropped)
    assert plan.skipped["url_scheme_not_allowed"] == 2
    assert plan.skipped_samples[:4] == dropped.samples


def test_repeated_keys_in_an_input_shard_keep_the_first_and_are_counted(tmp_path):
    source = tmp_path / "input"
    # a parquet listing a key twice, with a tar holding two samples of it: one repeated sample
    write_img2dataset_shard(source, 0, [row(0), row(1), row(1, uid=uid(91), caption="second row")])
    # a tar without parquet whose key comes back in a later sample, and one repeating a member in a sample
    write_tar(source / "00001.tar", sample_members("a", "first a", uid(92), 2) + sample_members("b", "b", uid(93), 3)
              + sample_members("a", "second a", uid(94), 4))
    write_tar(source / "00002.tar",
              sample_members("c", "first c", uid(95), 5) + sample_members("c", "again", uid(96), 6))
    # a parquet-listed key whose tar holds two samples of it
    write_img2dataset_shard(source, 3, [row(7)])
    tar = source / "00003.tar"
    write_tar(tar, [(m.name, data) for m, data in read_tar(tar)] + sample_members(f"{7:09d}", "late", uid(97), 8))
    # a parquet listing a key twice whose tar has it once (before, a KeyError naming no shard)
    write_img2dataset_shard(source, 4, [row(9)])
    parquet = pq.read_table(source / "00004.parquet")
    pq.write_table(pa.concat_tables([parquet, parquet]), source / "00004.parquet")
    _, out_dir = run_stage(tmp_path, source)
    found = stored(out_dir / "train")
    assert [s["caption"] for s in found] == ["a photo of thing 0", "a photo of thing 1", "first a", "b", "first c",
                                             "a photo of thing 7", "a photo of thing 9"]
    assert Manifest.load(out_dir / "train").skipped == {"duplicate_key": 5}
    report = json.loads((out_dir / "report.json").read_text())["train"]
    assert sorted(s["source"] for s in report["skipped_samples"]) == [
        "00000.tar/000000001", "00001.tar/a", "00002.tar/c", "00003.tar/000000007", "00004.tar/000000009"]


def test_a_tar_cut_at_a_member_boundary_is_a_truncated_shard(tmp_path):
    source = tmp_path / "input"
    write_tar(source / "00000.tar", sample_members("a", "a", uid(1), 1) + sample_members("b", "b", uid(2), 2))
    with tarfile.open(source / "00000.tar") as archive:
        last = archive.getmembers()[2]  # the end of sample a
    end = last.offset_data + -(-last.size // 512) * 512
    tar = source / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:end])
    assert [m.name for m, _ in read_tar(tar)] == ["a.jpg", "a.txt", "a.json"]  # tarfile itself sees nothing wrong
    with pytest.raises(BadShardError, match=rf"00000\.tar: truncated shard: it ends at byte {end} without the tar "
                                            r"end-of-archive marker"):
        run_stage(tmp_path, source)
