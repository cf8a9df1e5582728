"""``compile:``: the model compiled inside the DeepSpeed engine trains as eager mode does (to float rounding, the
random draws of stochastic depth included), writes the same checkpoint and export names, and keeps its compile
caches in a folder that a requeued run reuses instead of compiling again."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tests.train.helpers import checkpoint_weights, exported_weights, pretrain_block, run_stage_here


def block(data: str, **settings) -> dict:
    return pretrain_block(data, steps=2, zero_stage=2, schedule={"warmup_steps": 1},
                          checkpoint={"every_steps": 2, "keep": 1}, **settings)


@pytest.mark.slow
def test_a_compiled_step_equals_eager_and_a_requeued_run_reuses_the_caches(shards, tmp_path, one_rank):
    data = str(shards["train"])
    eager = run_stage_here(block(data, compile=False), tmp_path / "eager")

    torch._dynamo.reset()
    counters.clear()
    compiled = run_stage_here(block(data, compile=True), tmp_path / "compiled")
    assert counters["inductor"]["fxgraph_cache_miss"] > 0, "the model was compiled"
    cache = tmp_path / "compiled" / "pretrain" / "compile_cache"
    assert any((cache / "inductor").rglob("*")), "inductor's caches are in the stage folder"

    assert compiled["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-5)
    for weights in (exported_weights, checkpoint_weights):
        reference, actual = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
        assert sorted(actual) == sorted(reference), "parameter names do not change"
        for name, tensor in reference.items():
            torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    torch._dynamo.reset()  # what a new process starts from: only the on-disk caches are left
    counters.clear()
    run_stage_here(block(data, compile=True, compile_cache_dir=str(cache)), tmp_path / "requeued")
    assert counters["inductor"]["fxgraph_cache_hit"] > 0 and not counters["inductor"]["fxgraph_cache_miss"]
    assert not (tmp_path / "requeued" / "pretrain" / "compile_cache").exists()


@pytest.mark.slow
def test_the_dino_student_compiles_into_one_graph_whatever_the_number_of_masked_patches():
    """DINO's student (its mask hook and the loader's index lists) traces without graph breaks; a new number of
    masked patches makes one dynamic-shape graph, not a graph per batch."""
    from tests.train.test_dino_task import dino_task, fake_batch

    task = dino_task()
    torch.manual_seed(0)
    student = task.build_module()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(student, backend="aot_eager", fullgraph=True)
    sizes = set()
    for step in range(3):
        batch = fake_batch(step, masked=0.2 + 0.2 * step)
        sizes.add(batch["mask_indices"].numel())
        args = (batch["global_crops"], batch["local_crops"], batch["masks"], batch["mask_indices"])
        traced, eager = compiled(*args), student(*args)
        assert traced.keys() == eager.keys() == {"cls", "patch", "phases"}
        for key in eager:
            torch.testing.assert_close(traced[key], eager[key], rtol=1e-5, atol=1e-5)
    assert len(sizes) == 3 and counters["stats"]["unique_graphs"] <= 2
