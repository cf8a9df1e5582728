"""The DataComp download in chunks shared out to array tasks: which task downloads what is a pure function of the
settings, a requeued task downloads nothing twice, and the final shards depend neither on the number of parts
nor on the chunk size."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.datacomp_download import DownloadPlan, Piece, plan_download
from pipeline.data.manifest import Manifest
from pipeline.data.settings import DataCompShardSettings
from stages import shard_datacomp
from tests.data.http_fixtures import counting_server
from tests.data.shard_fixtures import jpeg, stage_context

ROWS = 12


def uid(n: int) -> str:
    return hashlib.md5(f"part{n}".encode()).hexdigest()


def write_metadata(root: Path, base_url: str, split_at: int = 4) -> Path:
    """``ROWS`` images under ``root/images`` and their metadata in two parquet files (``split_at`` rows first)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n in range(ROWS):
        (root / "images" / f"{n}.jpg").write_bytes(jpeg(n, (64, 48)))
    metadata = root / "metadata"
    metadata.mkdir()
    rows = {"uid": [uid(n) for n in range(ROWS)], "url": [f"{base_url}/images/{n}.jpg" for n in range(ROWS)],
            "text": [f"caption {n}" for n in range(ROWS)]}
    for name, part in (("a.parquet", slice(0, split_at)), ("b.parquet", slice(split_at, ROWS))):
        pq.write_table(pa.table({key: values[part] for key, values in rows.items()}), metadata / name,
                       row_group_size=3)
    return metadata


def test_chunks_are_a_function_of_row_counts_and_chunk_size(tmp_path):
    plan = DownloadPlan(("a", "b", "c"), (10, 0, 14), chunk_rows=7)
    assert plan.num_chunks == 4
    assert plan.pieces(1) == [Piece("a", 7, 10), Piece("c", 0, 4)]
    assert plan.pieces(3) == [Piece("c", 11, 14)]
    assert [list(plan.chunks_of_part(part, 3)) for part in range(3)] == [[0, 3], [1], [2]]
    assert sum(piece.stop - piece.start for chunk in range(4) for piece in plan.pieces(chunk)) == 24
    metadata = write_metadata(tmp_path, "http://127.0.0.1:1")
    assert plan_download(metadata, 7) == DownloadPlan((str(metadata / "a.parquet"), str(metadata / "b.parquet")),
                                                      (4, ROWS - 4), 7)


def shards(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.tar"))}


@pytest.mark.slow
def test_parts_download_each_chunk_once_resume_and_shard_like_one_run(tmp_path):
    (tmp_path / "data").mkdir()
    with counting_server(tmp_path / "data") as (base_url, requests):
        metadata = write_metadata(tmp_path / "data", base_url)
        settings = DataCompShardSettings(source=str(metadata), samples_per_shard=5, download_shard_size=2,
                                         download_chunk_rows=5, thread_count=2, timeout_s=5.0, workers=1)
        whole = stage_context(tmp_path / "whole", "shard_datacomp")  # one chunk, one task
        shard_datacomp.run(dataclasses.replace(settings, download_chunk_rows=ROWS), whole)
        reference = shards(whole.out_dir / "train")
        assert len(requests) == ROWS and set(requests.values()) == {1}

        requests.clear()
        parted = stage_context(tmp_path / "parted", "shard_datacomp")
        chunks = parted.out_dir / "_download" / "shards"
        shard_datacomp.run_part(settings, parted, 0, 2)
        assert sorted(path.name for path in chunks.iterdir()) == ["00000", "00002"]
        shard_datacomp.run_part(settings, parted, 1, 2)
        assert sorted(path.name for path in chunks.iterdir()) == ["00000", "00001", "00002"]
        assert len(requests) == ROWS and set(requests.values()) == {1}

        requests.clear()
        shard_datacomp.run_part(settings, parted, 0, 2)  # a requeued task whose chunks are done
        assert not requests
        for name in ("00001.tar", "00001_stats.json", "00001.parquet"):  # a task killed while downloading
            (chunks / "00000" / name).unlink()
        shard_datacomp.run_part(settings, parted, 0, 2)
        assert sorted(requests) == [f"/images/{n}.jpg" for n in (2, 3)], "only that img2dataset shard again"

        requests.clear()
        shard_datacomp.run(settings, parted)
        assert not requests, "the final job found every chunk done"
    assert shards(parted.out_dir / "train") == reference and len(reference) == 3, "nor on the chunk size"
    assert Manifest.load(parted.out_dir / "train").num_samples == ROWS
