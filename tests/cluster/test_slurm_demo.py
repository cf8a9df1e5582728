"""The demo pipeline end to end on a real Slurm: every stage a job with ``afterok`` dependencies on its parents,
the DINO pretraining as a two-node DeepSpeed job, real job states in ``kope status`` and every evaluation
in ``results.jsonl``. Training is shortened to two epochs per stage; the learning itself is the inline demo's
business (``tests/test_demo_pipeline.py``)."""

from __future__ import annotations

import json

import pytest
import yaml

from cluster.slurm_state import query_jobs
from pipeline.core.results import ResultsLog
from pipeline.core.run_dir import RunDir
from tests.cluster.conftest import REPO, read_state
from tests.cluster.test_slurm_pipeline import PROFILE, job_of, kope, submission_script

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_slurm")]
DEMO = REPO / "configs" / "pipelines" / "demo.yaml"
TRAINING = ("pretrain_supervised", "pretrain_dino", "pretrain_clip", "finetune")
DEMO_TIMEOUT_S = 1500


def test_demo_pipeline_on_slurm_with_a_two_node_pretraining(kope_env, tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text(json.dumps({"include": PROFILE, "slurm": {"stages": {"pretrain_dino": {"nodes": 2}}}}))
    run_dir = tmp_path / "demo"
    shorter = [f"{stage}.epochs=2" for stage in TRAINING] + ["pretrain_dino.loader.batch_size=16"]
    done = kope(kope_env, "run", str(DEMO), "--run-dir", str(run_dir), "--cluster", str(profile), "--wait",
                "--poll-s", "2", *shorter, timeout=DEMO_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]

    stages = yaml.safe_load(DEMO.read_text())["stages"]
    states = RunDir(run_dir)
    assert sorted(states.stage_names()) == sorted(stages)
    assert all(states.read(name).status == "done" for name in stages)
    jobs = {name: job_of(run_dir, name) for name in stages}
    assert len(set(jobs.values())) == len(stages), "one job per stage"
    for name, parent in (("pretrain_dino", "shard_imagenet"), ("export_clip", "pretrain_clip"),
                         ("evaluate_finetune", "finetune")):
        assert f"afterok:{jobs[parent]}" in submission_script(run_dir, jobs[name])
        assert read_state(run_dir, name).started_at >= read_state(run_dir, parent).ended_at
    slurm = query_jobs(jobs.values())
    assert {slurm[job].state for job in jobs.values()} == {"COMPLETED"}

    ranks = (run_dir / "logs" / "pretrain_dino.log").read_text()
    assert "2 ranks" in ranks and "ZeRO stage 2" in ranks
    table = kope(kope_env, "status", str(run_dir)).stdout
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert all("done" in rows[name] and "COMPLETED" in rows[name] for name in stages)
    assert "zeroshot_top1=" in rows["evaluate_clip"] and "knn_top1=" in rows["evaluate_dino"]

    recorded = {(record["stage"], record["protocol"]) for record in ResultsLog(RunDir(run_dir).results_file).records()}
    expected = {(name, protocol) for name, block in stages.items() if block["kind"] == "evaluate"
                for protocol in block["protocols"]}
    assert recorded == expected
