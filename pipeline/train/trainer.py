"""The training loop shared by every mode: resume, steps with gradient accumulation, schedules, faults,
logging and checkpoints.

Step numbers count completed optimizer steps: checkpoint ``step_00000200`` holds the state after 200
steps, TensorBoard's x-axis is the same count, and a resumed run continues with step 201. A resumed run
sees the same micro-batches (the loader seeks to ``(epoch, samples consumed)``; batches come through
:class:`pipeline.train.feed.DeviceFeed`, copied to the device one ahead), the same learning rates
(schedules are functions of the step) and the same random draws (every rank's generators are restored)
as an uninterrupted one, so on CPU with fixed thread counts its weights are bitwise the same.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.checkpoint.store import Checkpointer, code_version
from pipeline.core.identity import identity_hash
from pipeline.train import rng
from pipeline.train.engine import BatchPlan, set_schedule
from pipeline.train.faults import NonFiniteCounter, Preempted, StopRequest, poison_if_nonfinite
from pipeline.train.feed import DeviceFeed
from pipeline.train.metrics import MeanWindow, Throughput, count_flops, peak_flops
from pipeline.train.schedules import StepSchedule
from pipeline.train.state import Progress, RngState, RunMeters
from pipeline.train.task import Task
from pipeline.train.tensorboard import ScalarLog


@dataclass(frozen=True)
class LoopSettings:
    total_steps: int
    checkpoint_every: int
    log_every: int
    max_nonfinite_in_a_row: int
    seed: int
    stop_check_every: int


def _rank_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class Trainer:
    """Runs ``task`` on ``engine`` from the latest checkpoint (or step 0) to ``settings.total_steps``.

    Its checkpointed state is a dictionary of named parts (:attr:`parts`, the same on every rank, and
    :attr:`per_rank`), each with ``state_dict`` / ``load_state_dict``; the engine's own files hold the weights and
    optimizer state. ``identity`` (see :mod:`pipeline.core.identity`) must match a checkpoint to resume it.
    """

    def __init__(self, task: Task, engine: Any, loader: Any, plan: BatchPlan, schedule: StepSchedule,
                 checkpointer: Checkpointer, settings: LoopSettings, identity: dict[str, Any],
                 scalars: ScalarLog, log: logging.Logger, rank: int):
        self.task = task
        self.engine = engine
        self.loader = loader
        self.feed = DeviceFeed(loader, engine.device)
        self.plan = plan
        self.schedule = schedule
        self.checkpointer = checkpointer
        self.settings = settings
        self.identity = identity
        self.code_version = code_version()
        self.scalars = scalars
        self.log = log
        self.rank = rank
        self.progress = Progress()
        self.nonfinite = NonFiniteCounter(settings.max_nonfinite_in_a_row)
        self.meters = RunMeters(MeanWindow(engine.device), rank)
        self.rng = RngState()
        self.stop = StopRequest()
        self.throughput = Throughput()
        self.peak = peak_flops(engine.device)
        self.flops_per_sample: float | None = None
        self.parts = {"progress": self.progress, "task": task, "loader": self.feed, "schedule": schedule,
                      "faults": self.nonfinite, "meters": self.meters}
        self.per_rank = {"rng": self.rng}

    @property
    def step(self) -> int:
        return self.progress.step

    # --- resume -------------------------------------------------------------------------------------------

    def resume(self) -> int:
        """Load the latest checkpoint if there is one; returns the step training continues after."""
        tag = self.checkpointer.latest()
        if tag is None:
            rng.seed_all(_rank_seed(self.settings.seed, self.rank, 0))
            return 0
        meta = self.checkpointer.check_resumable(tag, self.engine.zero_optimization_stage(), self.identity)
        if meta["world_size"] != self.plan.world_size:
            self.log.warning("resuming %s, written by %d ranks, on %d: the sample stream continues where it stopped, "
                             "but not bit for bit", tag, meta["world_size"], self.plan.world_size)
        has_rng = self.checkpointer.load(self.engine, tag, self.parts, self.per_rank)
        if meta.get("code_version") != self.code_version:
            self.log.warning("resuming a checkpoint written by %s with %s", meta.get("code_version"),
                             self.code_version)
        if not has_rng:
            self.log.warning("rank %d has no generator state in %s (another rank count): drawing fresh ones, so "
                             "this run will not repeat the original bit for bit", self.rank, tag)
            rng.seed_all(_rank_seed(self.settings.seed, self.rank, self.step))
        if self.rank == 0:
            self.log.info("resumed from %s (step %d, epoch %d, %d samples into it)", tag, self.step,
                          self.feed.epoch, self.feed.samples_consumed)
        return self.step

    # --- the loop -----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the last step; raises Preempted (after saving) on a stop signal."""
        total = self.settings.total_steps
        batches = self.feed.batches()
        saved = self.step if self.checkpointer.latest() else -1
        self.rng.apply()
        with self.stop.installed():
            while self.step < total:
                self._train_step(batches)
                logging = self.step % self.settings.log_every == 0 or self.step == total
                if logging:
                    with rng.isolated():
                        self._report()
                checkpointing = self.step % self.settings.checkpoint_every == 0 or self.step == total
                stopping = None
                if logging or checkpointing or self.step % self.settings.stop_check_every == 0:
                    stopping = self.stop.agreed(self.engine.device)
                if checkpointing or stopping:
                    self.save()
                    saved = self.step
                if stopping:
                    raise Preempted(f"{stopping} received: saved a checkpoint at step {self.step}; run the stage "
                                    "again to resume")
        if saved != self.step:
            self.save()
        self.scalars.flush()
        summary = {"steps": self.step, "samples_seen": self.progress.samples_seen,
                   "skipped_steps": self.nonfinite.total}
        losses = {"first_loss": self.meters.first_loss, "last_loss": self.meters.last_loss}
        return summary | {name: value for name, value in losses.items() if value is not None}

    def _train_step(self, batches: Iterator[Any]) -> None:
        engine, step = self.engine, self.step
        set_schedule(engine.optimizer, self.schedule.lr(step), self.schedule.weight_decay_at(step))
        started = time.perf_counter()
        data_s = 0.0
        skipped_before = engine.skipped_steps
        for _ in range(self.plan.accumulation):
            fetch = time.perf_counter()
            with rng.isolated():
                batch = next(batches)
            data_s += time.perf_counter() - fetch
            if self.flops_per_sample is None and self.peak:
                flops = count_flops(lambda batch=batch: self._forward_backward(batch, step))
                self.flops_per_sample = flops / self.plan.per_rank
            else:
                self._forward_backward(batch, step)
            engine.step()
        skipped = engine.skipped_steps > skipped_before
        if not skipped:
            self.task.after_optimizer_step(engine, step)
        self.progress.step = step + 1
        self.progress.samples_seen += self.plan.global_batch
        self.throughput.add(self.plan.global_batch, time.perf_counter() - started, data_s)
        self.nonfinite.record(self.step, skipped)

    def _forward_backward(self, batch: Any, step: int) -> None:
        loss, metrics = self.task.compute_loss(self.engine, batch, step)
        self.engine.backward(poison_if_nonfinite(loss))
        self.meters.window.add(loss, metrics)

    # --- logging and saving -------------------------------------------------------------------------------

    def _report(self) -> None:
        engine = self.engine
        means = self.meters.window.means()
        if "loss" in means:
            self.meters.logged(means["loss"])
        norm = engine.get_global_grad_norm()
        optim = {"lr": self.schedule.lr(self.step - 1), "weight_decay": self.schedule.weight_decay_at(self.step - 1),
                 "skipped_steps": float(self.nonfinite.total)}
        if norm is not None and math.isfinite(float(norm)):
            optim["grad_norm"] = float(norm)
        speed = self.throughput.report(self.flops_per_sample, self.peak, self.plan.world_size)
        extra = self.task.extra_metrics(engine)
        epoch = self.feed.epoch + self.feed.samples_consumed / max(self.feed.epoch_length, 1)
        self.scalars.write(self.step, means, "train/")
        self.scalars.write(self.step, optim, "opt/")
        self.scalars.write(self.step, {**speed, "epoch": epoch}, "perf/")
        self.scalars.write(self.step, extra, "model/")
        if self.rank == 0:
            total = self.settings.total_steps
            eta_s = speed["step_s"] * (total - self.step)
            loss = f"loss {means['loss']:.4f} | " if "loss" in means else ""
            mfu = f" | MFU {speed['mfu']:.1%}" if "mfu" in speed else ""
            self.log.info("step %d/%d (%.0f%%) | epoch %.2f | %slr %.3g | %.1f img/s | step %.3fs (data %.3fs)%s | "
                          "eta %s", self.step, total, 100 * self.step / total, epoch, loss, optim["lr"],
                          speed["img_per_s"], speed["step_s"], speed["data_wait_s"], mfu, _duration(eta_s))

    def save(self) -> None:
        meta = {"identity": self.identity, "identity_hash": identity_hash(self.identity),
                "code_version": self.code_version, "batch_plan": dataclasses.asdict(self.plan)}
        with rng.isolated():
            tag = self.checkpointer.save(self.engine, self.step, self.parts, self.per_rank, meta)
        if self.rank == 0:
            self.log.info("checkpoint %s saved", tag)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
