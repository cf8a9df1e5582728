"""The DataComp download across nodes on a real Slurm: two array tasks share the metadata's chunks out, each
running img2dataset on its chunks (from an HTTP server on 127.0.0.1), one task requeued while it downloads
resumes without fetching its finished chunk again, and the resharding job writes the shards one inline run
writes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cluster.slurm_state import query_jobs
from pipeline.data.settings import DataCompShardSettings
from stages import shard_datacomp
from tests.cluster.conftest import read_state, wait_until
from tests.cluster.test_slurm_pipeline import JOB_TIMEOUT_S, kope, profile, run_to_completion, squeue_state
from tests.data.http_fixtures import counting_server
from tests.data.shard_fixtures import stage_context
from tests.data.test_datacomp_parts import ROWS, write_metadata

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_slurm")]
SETTINGS = {"samples_per_shard": 5, "download_shard_size": 2, "download_chunk_rows": 4, "thread_count": 1,
            "timeout_s": 10.0, "workers": 1}
CHUNK_ROWS = {0: range(0, 4), 1: range(4, 8), 2: range(8, 12)}


def chunk_done(run_dir: Path, chunk: int) -> bool:
    shards = run_dir / "shard_datacomp" / "_download" / "shards" / f"{chunk:05d}"
    return all((shards / f"{i:05d}_stats.json").exists() for i in range(2))


def tars(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.tar"))}


def test_download_array_requeued_task_resumes_and_shards_like_one_run(write_pipeline, kope_env, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with counting_server(data, delay_s=0.6) as (base_url, requests):
        metadata = write_metadata(data, base_url)
        path = write_pipeline({"shard_datacomp": {"kind": "shard_datacomp", "source": str(metadata), **SETTINGS}})
        run_dir = tmp_path / "run"
        submitted = kope(kope_env, "run", str(path), "--cluster",
                         profile(tmp_path, stages={"shard_datacomp": {"array": 2}}))
        assert submitted.returncode == 0, submitted.stderr
        record = read_state(run_dir, "shard_datacomp").job
        first_task = f"{record.array_job_id}_0"  # chunks 0 and 2
        wait_until(lambda: chunk_done(run_dir, 0), JOB_TIMEOUT_S, "task 0 to finish its first chunk", 0.2)
        assert not chunk_done(run_dir, 2), "the requeue lands while task 0 downloads its second chunk"
        subprocess.run(["scontrol", "requeue", first_task], check=True)
        wait_until(lambda: squeue_state(first_task).startswith("PENDING"), 120, "the requeued task to wait")
        assert run_to_completion(first_task) == "COMPLETED"
        assert run_to_completion(record.job_id) == "COMPLETED"
        fetched = dict(requests)

        reference = stage_context(tmp_path / "inline", "shard_datacomp")
        settings = DataCompShardSettings(source=str(metadata), **{**SETTINGS, "download_chunk_rows": ROWS})
        shard_datacomp.run(settings, reference)

    state = read_state(run_dir, "shard_datacomp")
    assert state.status == "done" and state.outputs["train_samples"] == ROWS
    assert query_jobs([record.array_job_id])[record.array_job_id].describe() == "COMPLETED (2/2 tasks done)"
    for chunk in (0, 1):
        assert all(fetched[f"/images/{n}.jpg"] == 1 for n in CHUNK_ROWS[chunk]), f"chunk {chunk} fetched once"
    assert all(1 <= fetched[f"/images/{n}.jpg"] <= 2 for n in CHUNK_ROWS[2]), "only the interrupted chunk again"
    logs = {part: (run_dir / "logs" / f"shard_datacomp.part{part}.log").read_text() for part in (0, 1)}
    assert "downloading chunk 1 of 3" in logs[0] and "downloading chunk 3 of 3" in logs[0]
    assert "downloading chunk 2 of 3" in logs[1] and "downloading chunk 1 of 3" not in logs[1]
    assert "downloading chunk" not in (run_dir / "logs" / "shard_datacomp.log").read_text()
    ours, theirs = (folder / "shard_datacomp" / "train" for folder in (run_dir, reference.run_dir))
    assert tars(ours) == tars(theirs) and len(tars(ours)) == 3
    assert json.loads((ours / "manifest.json").read_text())["num_samples"] == ROWS
