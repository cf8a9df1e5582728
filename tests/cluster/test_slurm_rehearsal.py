"""The scale rehearsal on a real Slurm: the paper's three production pipelines (configs/pipelines/rehearsal.yaml
includes them as they ship) on ImageNet- and DataComp-shaped data made at test time, the sharding stages as
two-task arrays (the DataComp download from a server on 127.0.0.1), the supervised pretraining as a two-node
DeepSpeed job requeued by ``scontrol requeue`` while it trains. Every stage is a job started after its parents
(``afterok``), everything completes, ``kope status`` shows it (the requeue included), and the exports load through
timm and open_clip. (The demo pipeline's learning is ``tests/test_demo_pipeline.py``'s business.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cluster.slurm_state import query_jobs
from pipeline.core.results import ResultsLog
from pipeline.core.run_dir import RunDir
from tests.cluster.conftest import REPO, read_state, wait_until
from tests.cluster.test_slurm_pipeline import PROFILE, job_of, kope, run_to_completion, squeue_state, submission_script
from tests.train.helpers import latest_step, train_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_slurm")]
REHEARSAL = REPO / "configs" / "pipelines" / "rehearsal.yaml"
REHEARSAL_TIMEOUT_S = 1800
ARRAYS = ("shard_imagenet", "shard_datacomp")


def test_the_production_pipelines_rehearse_on_two_nodes_with_a_requeue(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text(json.dumps({"include": PROFILE, "slurm": {"stages": {
        **{name: {"array": 2} for name in ARRAYS}, "pretrain_supervised": {"nodes": 2}}}}))
    run_dir = tmp_path / "rehearsal"
    env = train_env()
    del env["MASTER_PORT"]  # jobs sharing a node take their rendezvous port from their job id
    started = time.monotonic()
    submitted = kope(env, "run", str(REHEARSAL), "--run-dir", str(run_dir), "--cluster", str(profile))
    assert submitted.returncode == 0, submitted.stderr
    run = RunDir(run_dir)
    stages = run.stage_names()
    jobs = {name: job_of(run_dir, name) for name in stages}

    pretrain = jobs["pretrain_supervised"]
    wait_until(lambda: latest_step(run_dir, "pretrain_supervised") >= 2, REHEARSAL_TIMEOUT_S, "the first checkpoint",
               interval_s=0.2)
    subprocess.run(["scontrol", "requeue", pretrain], check=True)
    assert latest_step(run_dir, "pretrain_supervised") < 12, "the requeue landed while training"
    wait_until(lambda: squeue_state(pretrain) == "PENDING|BeginTime", 120, "the requeued job to wait")
    assert "requeued" in kope(env, "status", str(run_dir)).stdout
    for name in stages:
        assert run_to_completion(jobs[name], timeout_s=REHEARSAL_TIMEOUT_S) == "COMPLETED", name
    wall_s = time.monotonic() - started
    print(f"rehearsal on the local Slurm: {wall_s:.0f} s wall")

    assert all(read_state(run_dir, name).status == "done" for name in stages)
    assert len(set(jobs.values())) == len(stages), "one job per stage"
    for name, parent in (("pretrain_dino", "shard_imagenet"), ("export_clip", "pretrain_clip"),
                         ("evaluate_finetune_dino", "finetune_dino")):
        assert f"afterok:{jobs[parent]}" in submission_script(run_dir, jobs[name])
        assert read_state(run_dir, name).started_at >= read_state(run_dir, parent).ended_at
    table = kope(env, "status", str(run_dir)).stdout
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert all("done" in rows[name] and "COMPLETED" in rows[name] for name in stages), table
    assert read_state(run_dir, "pretrain_supervised").attempt == 2
    assert "resumed from step_" in (run_dir / "logs" / "pretrain_supervised.log").read_text()
    assert "2 ranks" in (run_dir / "logs" / "pretrain_supervised.log").read_text()
    for name in ARRAYS:
        array = read_state(run_dir, name).job.array_job_id
        assert query_jobs([array])[array].describe() == "COMPLETED (2/2 tasks done)"
        assert all((run_dir / "logs" / f"{name}.part{part}.log").exists() for part in range(2))

    manifests = {name: json.loads((run_dir / name / "val" / "manifest.json").read_text())
                 for name in ("shard_imagenet", "shard_imagenet_val")}
    assert manifests["shard_imagenet"]["num_samples"] == 100 and len(manifests["shard_imagenet"]["classes"]) == 100
    assert [s["sha256"] for s in manifests["shard_imagenet"]["shards"]] == [
        s["sha256"] for s in manifests["shard_imagenet_val"]["shards"]], "the CLIP pipeline's val shards are the same"
    datacomp = read_state(run_dir, "shard_datacomp").outputs
    assert 150 < datacomp["train_samples"] < 200, "about 2 % of the urls point nowhere"

    recorded = {(r["stage"], r["protocol"]) for r in ResultsLog(run.results_file).records()}
    assert {("evaluate_supervised", "top1"), ("evaluate_dino", "knn"), ("evaluate_dino", "linear"),
            ("evaluate_finetune_dino", "top1"), ("evaluate_clip", "zeroshot")} <= recorded
    loaded = subprocess.run([sys.executable, "-c", LOAD_EXPORTS, str(run_dir)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {
        "export_supervised": [2, 100], "export_dino": [2, 64], "finetune_dino/export": [2, 100],
        "export_clip": [[2, 64], [2, 64]]}


LOAD_EXPORTS = """
import json, sys
import torch, timm, open_clip
import pipeline.models
run = sys.argv[1]
shapes = {}
for folder in ("export_supervised", "export_dino", "finetune_dino/export"):
    model = timm.create_model(f"local-dir:{run}/{folder}", pretrained=True).eval()
    size = model.pretrained_cfg["input_size"][-1]
    shapes[folder] = list(model(torch.rand(2, 3, size, size)).shape)
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run}/export_clip")
tokenizer = open_clip.get_tokenizer(f"local-dir:{run}/export_clip")
size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
with torch.no_grad():
    image = model.encode_image(torch.rand(2, 3, size, size))
    text = model.encode_text(tokenizer(["a photo of a tench", "my goldfish at home"]))
shapes["export_clip"] = [list(image.shape), list(text.shape)]
print(json.dumps(shapes))
"""
