"""Faults: non-finite losses skip their step (and K in a row stop the stage with the last good checkpoint
latest), SIGTERM/SIGUSR1 save a checkpoint and end with ``Preempted``, SIGKILL during a save keeps the previous
checkpoint ``latest``. The real stage runs in this process with one rank; a task subclass injects the fault."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint.consolidate import module_weights
from pipeline.checkpoint.layout import read_latest
from pipeline.core.errors import INTERRUPTED_EXIT_CODE
from pipeline.train import tasks
from pipeline.train.faults import NonFiniteLossError, Preempted
from pipeline.train.tasks.supervised import SupervisedTask
from tests.tools import load_tool
from tests.train.helpers import (
    REPO,
    assert_same_tensors,
    exported_weights,
    kope_run,
    pretrain_block,
    run_pipeline_file,
    run_stage_here,
    train_env,
    use_shared_torch_extensions,
    write_pipeline,
)


def faulty_task(nan_steps: tuple[int, ...] = (), nan_from: int | None = None,
                signal_at: tuple[int, signal.Signals] | None = None) -> type[SupervisedTask]:
    """SupervisedTask whose loss is NaN at the given optimizer steps (0-based, first micro-batch only), or
    which receives a signal while computing a step's loss."""

    class Faulty(SupervisedTask):
        def compute_loss(self, engine, batch, step):
            loss, metrics = super().compute_loss(engine, batch, step)
            first_micro = engine.micro_steps % engine.gradient_accumulation_steps() == 0
            if first_micro and (step in nan_steps or (nan_from is not None and step >= nan_from)):
                loss = loss * float("nan")
            if signal_at is not None and first_micro and step == signal_at[0]:
                signal.raise_signal(signal_at[1])
            return loss, metrics

    return Faulty


def checkpoint(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return module_weights(run_dir / "pretrain" / "checkpoints", f"step_{step:08d}")


@pytest.mark.parametrize(("zero_stage", "precision"), [(0, "fp32"), (0, "bf16"), (2, "fp32")])
def test_nonfinite_loss_skips_only_its_step(shards, tmp_path, monkeypatch, one_rank, zero_stage, precision):
    monkeypatch.setitem(tasks.TASKS, "supervised", faulty_task(nan_steps=(2,)))
    block = pretrain_block(str(shards["train"]), steps=5, zero_stage=zero_stage, precision=precision,
                           checkpoint={"every_steps": 1, "keep": 10})
    outputs = run_stage_here(block, tmp_path)
    assert outputs["steps"] == 5 and outputs["skipped_steps"] == 1
    before, after_skip, after_next = (checkpoint(tmp_path, step) for step in (2, 3, 4))
    assert_same_tensors(before, after_skip)
    assert any(not torch.equal(after_skip[name], after_next[name]) for name in after_skip), "training went on"
    assert all(torch.isfinite(t).all() for t in after_next.values() if t.is_floating_point())


def test_nonfinite_streak_stops_with_last_good_checkpoint_latest(shards, tmp_path, monkeypatch, one_rank):
    monkeypatch.setitem(tasks.TASKS, "supervised", faulty_task(nan_from=3))
    block = pretrain_block(str(shards["train"]), steps=8, checkpoint={"every_steps": 1, "keep": 10},
                           faults={"max_nonfinite_in_a_row": 2})
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row .* step 5") as error:
        run_stage_here(block, tmp_path)
    assert "\n" not in str(error.value)
    directory = tmp_path / "pretrain" / "checkpoints"
    assert read_latest(directory) == "step_00000004", "no checkpoint after the streak ended the run"
    assert_same_tensors(checkpoint(tmp_path, 3), module_weights(directory))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_a_checkpoint_and_the_rerun_ends_exactly(shards, tmp_path, monkeypatch, one_rank, signum):
    block = pretrain_block(str(shards["train"]), steps=6, checkpoint={"every_steps": 100, "keep": 2})
    reference = tmp_path / "reference"
    run_stage_here(block, reference)

    interrupted = tmp_path / "interrupted"
    handler = signal.getsignal(signum)
    with monkeypatch.context() as patch:
        patch.setitem(tasks.TASKS, "supervised", faulty_task(signal_at=(2, signum)))
        # received during step 3; the ranks agree on it at the next stop check, the log step 4
        with pytest.raises(Preempted, match=f"{signum.name} received: saved a checkpoint at step 4") as stop:
            run_stage_here(block, interrupted)
    assert stop.value.exit_code == INTERRUPTED_EXIT_CODE == 75
    assert read_latest(interrupted / "pretrain" / "checkpoints") == "step_00000004"
    assert signal.getsignal(signum) == handler, "the stage restores the previous handler"

    outputs = run_stage_here(block, interrupted)
    assert outputs["steps"] == 6
    assert_same_tensors(exported_weights(reference), exported_weights(interrupted))


KILL_DURING_SAVE = """
import os, signal, sys
import torch
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if "step_00000004" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
from pipeline.core.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_latest(shards, tmp_path, one_rank):
    """The process dies right after DeepSpeed wrote the first file of checkpoint 4; the rerun resumes from
    checkpoint 2 and ends with an uninterrupted run's weights."""
    block = pretrain_block(str(shards["train"]), steps=6, checkpoint={"every_steps": 2, "keep": 2})
    pipeline = write_pipeline(tmp_path / "killed", {"pretrain": block}, executor="inline")
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(pipeline)], cwd=REPO, env=train_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    run_dir = tmp_path / "killed" / "run"
    directory = run_dir / "pretrain" / "checkpoints"
    assert (directory / "step_00000004").is_dir(), "the kill hit the save of checkpoint 4"
    assert not (directory / "step_00000004" / "meta.json").exists()
    assert read_latest(directory) == "step_00000002"
    assert module_weights(directory), "the previous checkpoint loads"

    resumed = kope_run(pipeline)  # every run in a fresh process, as a user would resume
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = run_pipeline_file(tmp_path / "reference", {"pretrain": block}, executor="inline")
    assert_same_tensors(exported_weights(run_dir), exported_weights(reference))


def test_ranks_agree_on_a_stop_only_every_few_steps_and_the_run_stops_at_the_next_agreement(tmp_path, one_rank):
    """Agreeing on a stop is a collective and a host sync; the loop does it every ``stop_check_every`` steps
    (and at log and checkpoint steps), and a signal that arrives in between stops the run at the next one."""
    bench = load_tool("bench_train")
    use_shared_torch_extensions()
    args = bench.parse_args(["--model", "vit_kope_tiny_patch16_224", "--batch", "2", "--img", "32", "--classes", "4",
                             "--pool", "1", "--zero", "0", "--precision", "fp32", "--ema-decay", "0"])
    device = torch.device("cpu")
    trainer = bench.make_trainer(args, bench.write_classes(tmp_path / "data", 4), bench.make_batches(args), device,
                                 False, tmp_path / "run", total_steps=25)
    trainer.settings = dataclasses.replace(trainer.settings, stop_check_every=10, log_every=50)
    checked, agreed = [], trainer.stop.agreed
    trainer.stop.agreed = lambda device: checked.append(trainer.step) or agreed(device)
    trainer.run()
    assert checked == [10, 20, 25]

    resumed = bench.make_trainer(args, tmp_path / "data", bench.make_batches(args), device, False, tmp_path / "run2",
                                 total_steps=25)
    resumed.settings = dataclasses.replace(resumed.settings, stop_check_every=10, log_every=50)
    train_step = resumed._train_step

    def signalled_at_step_3(batches):
        train_step(batches)
        if resumed.step == 3:
            resumed.stop.signal_name = "SIGTERM"

    resumed._train_step = signalled_at_step_3
    with pytest.raises(Preempted, match="SIGTERM received: saved a checkpoint at step 10"):
        resumed.run()
    assert read_latest(tmp_path / "run2") == "step_00000010"
