"""Helpers for training tests in every mode: demo shards made by the real stages, ``kope run`` in a subprocess
(local executor, 2 ranks), a run killed with SIGKILL once a checkpoint exists, and exact weight comparisons.

Exact resume in a test::

    stages = {"pretrain": pretrain_block(data=str(shards["train"]), ...)}
    reference = run_pipeline_file(tmp_path / "whole", stages)
    resumed = run_killed_then_resumed(tmp_path / "killed", stages, kill_after_checkpoint=4)
    assert_same_tensors(exported_weights(reference), exported_weights(resumed))
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
TORCH_EXTENSIONS_DIR = "/tmp/kope-torch-ext"
STAGE = "pretrain"

TINY_KOPE = {"name": "vit_kope_tiny_patch16_224",
             "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "drop_path_rate": 0.1}}


def use_shared_torch_extensions() -> None:
    """DeepSpeed compiles a communication op once per extensions folder (30-40 s): share one unless CI set it."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)


def train_env(**extra: str) -> dict[str, str]:
    """Environment of training subprocesses: one thread per rank (bitwise reproducible on CPU), the shared
    extensions folder, the repository importable, and a rendezvous port of their own (this test process may
    hold the one in its environment)."""
    from pipeline.core.ranks import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **extra}
    env.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env


def demo_shards(root: Path, train_per_class: int = 1, val_per_class: int = 1) -> dict[str, Path]:
    """The demo's two-digit images (90 classes) sharded by the real ``make_demo_data`` and ``shard_imagenet``
    stages, run in this process; returns the ``train`` and ``val`` dataset folders."""
    from pipeline.core.config.loader import load_pipeline
    from pipeline.core.runner import run_pipeline

    stages = {
        "demo_data": {"kind": "make_demo_data", "train_per_class": train_per_class, "val_per_class": val_per_class,
                      "captioned": 1},
        "shard": {"kind": "shard_imagenet", "source": "@demo_data/imagenet", "samples_per_shard": 32, "workers": 1},
    }
    path = write_pipeline(root, stages, executor="inline", name="shards")
    run_pipeline(load_pipeline(path))
    return {split: root / "run" / "shard" / split for split in ("train", "val")}


def pretrain_block(data: str, **settings: Any) -> dict[str, Any]:
    """A tiny supervised ``pretrain`` stage (2-block KoPE ViT at 64 px, a handful of steps); ``settings``
    override any key (nested dicts replace whole blocks)."""
    block: dict[str, Any] = {
        "kind": "pretrain", "data": data, "mode": "supervised", "model": TINY_KOPE, "global_batch_size": 16,
        "loader": {"batch_size": 4, "num_workers": 0, "window_shards": 2}, "steps": 8,
        "optim": {"name": "adamw", "lr": 1e-3, "grad_clip": 1.0}, "schedule": {"warmup_steps": 2},
        "checkpoint": {"every_steps": 2, "keep": 2}, "log_every_steps": 2,
        "supervised": {"ema_decay": 0.9, "aug": {"image_size": 64}},
    }
    return {**block, **settings}


def write_pipeline(root: Path, stages: dict[str, Any], executor: str = "local", nproc: int = 2,
                   name: str = "train") -> Path:
    """A pipeline file under ``root`` whose run directory is ``root/run``; every stage runs with ``executor``
    (``local``: ``nproc`` processes)."""
    root.mkdir(parents=True, exist_ok=True)
    blocks = {}
    for stage, block in stages.items():
        launch = {"executor": executor, "nproc": nproc} if executor == "local" else {"executor": executor}
        blocks[stage] = {"launch": launch, **block}
    doc = {"name": name, "run_dir": str(root / "run"), "seed": 0, "stages": blocks}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def kope_run(pipeline: Path, timeout: float = 600, extra_args: list[str] = (), **env: str
             ) -> subprocess.CompletedProcess:
    """``kope run PIPELINE [EXTRA_ARGS]`` in a subprocess (stdout and stderr captured)."""
    return subprocess.run([sys.executable, "-m", "pipeline.core.cli", "run", str(pipeline), *extra_args],
                          cwd=REPO, env=train_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def run_pipeline_file(root: Path, stages: dict[str, Any], **write: Any) -> Path:
    """Write and run a pipeline to completion; returns its run directory."""
    result = kope_run(write_pipeline(root, stages, **write))
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "run"


def latest_step(run_dir: Path, stage: str = STAGE) -> int:
    latest = run_dir / stage / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip().removeprefix("step_"))
    except (FileNotFoundError, ValueError):
        return -1


def kill_after_checkpoint(pipeline: Path, run_dir: Path, step: int, stage: str = STAGE, timeout: float = 600) -> int:
    """Start ``kope run``, SIGKILL it and its rank processes as soon as checkpoint ``step`` (or a later one) is
    ``latest``; returns the latest step at the kill. Fails if the run ended before."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.core.cli", "run", str(pipeline)],
                            cwd=REPO, env=train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while latest_step(run_dir, stage) < step:
            if proc.poll() is not None:
                raise AssertionError(f"run ended (exit {proc.returncode}) before checkpoint {step}: "
                                     f"{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint {step} within {timeout} s")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        at_kill = latest_step(run_dir, stage)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return at_kill


def run_killed_then_resumed(root: Path, stages: dict[str, Any], kill_after_checkpoint_step: int,
                            stage: str = STAGE, **write: Any) -> Path:
    """Run the pipeline, SIGKILL it once checkpoint ``kill_after_checkpoint_step`` is latest, check the stage is
    unfinished, then ``kope run`` again to the end; returns the run directory."""
    pipeline = write_pipeline(root, stages, **write)
    run_dir = root / "run"
    kill_after_checkpoint(pipeline, run_dir, kill_after_checkpoint_step, stage)
    state = yaml.safe_load((run_dir / "state" / f"{stage}.json").read_text())
    assert state["status"] == "running", f"the killed stage should look interrupted, found {state['status']}"
    result = kope_run(pipeline)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from step_" in result.stderr
    return run_dir


def exported_weights(run_dir: Path, stage: str = STAGE) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / stage / "model.safetensors")


def checkpoint_weights(run_dir: Path, stage: str = STAGE) -> dict[str, torch.Tensor]:
    """The wrapped module's weights in the stage's latest checkpoint (consolidated for ZeRO)."""
    from pipeline.checkpoint.consolidate import module_weights

    return module_weights(run_dir / stage / "checkpoints")


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """Same names, shapes, dtypes and bits."""
    assert sorted(expected) == sorted(actual)
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def stage_settings(block: dict[str, Any]) -> Any:
    """The ``pretrain`` stage's settings from a stage block, through the same validation as a pipeline file."""
    from pipeline.core.config.validate import ValidationContext, build_dataclass
    from pipeline.train.settings import PretrainSettings

    body = {key: value for key, value in block.items() if key not in ("kind", "launch", "needs")}
    return build_dataclass(PretrainSettings, body, ("stages", STAGE), ValidationContext(lambda path: "test"))


def run_stage_here(block: dict[str, Any], run_dir: Path, stage: str = STAGE, rank: int = 0,
                   world_size: int = 1) -> dict[str, Any]:
    """Run the ``pretrain`` stage in this process (the process group must match ``rank``/``world_size``)."""
    from pipeline.core.identity import stage_identity
    from pipeline.core.logs import get_logger
    from pipeline.core.stage import StageContext
    from stages import pretrain

    out_dir = Path(run_dir) / stage
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = stage_settings(block)
    identity = stage_identity("pretrain", settings, 0)
    ctx = StageContext(name=stage, run_dir=Path(run_dir), out_dir=out_dir, seed=identity["seed"],
                       log=get_logger(stage), rank=rank, world_size=world_size, local_rank=rank, identity=identity)
    return pretrain.run(settings, ctx)


def rewind_to_checkpoint(run_dir: Path, step: int, stage: str = STAGE) -> None:
    """Make checkpoint ``step`` latest and delete later ones and the exports: what a run killed after
    writing checkpoint ``step`` leaves behind."""
    import shutil

    checkpoints = run_dir / stage / "checkpoints"
    for folder in checkpoints.glob("step_*"):
        if int(folder.name.removeprefix("step_")) > step:
            shutil.rmtree(folder)
    (checkpoints / "latest").write_text(f"step_{step:08d}\n")
    for name in ("model.safetensors", "model.json"):
        (run_dir / stage / name).unlink(missing_ok=True)


def captioned_demo_shards(root: Path, captioned: int = 64) -> Path:
    """The demo's captioned set through the real ``make_demo_data`` and ``shard_datacomp`` stages, in this process."""
    from pipeline.core.config.loader import load_pipeline
    from pipeline.core.runner import run_pipeline

    stages = {
        "demo_data": {"kind": "make_demo_data", "train_per_class": 1, "val_per_class": 1, "captioned": captioned},
        "shard": {"kind": "shard_datacomp", "source": "@demo_data/datacomp", "serve_local": True,
                  "samples_per_shard": 16, "thread_count": 4, "workers": 1, "timeout_s": 60.0},
    }
    run_pipeline(load_pipeline(write_pipeline(root, stages, executor="inline", name="captions")))
    return root / "run" / "shard" / "train"
