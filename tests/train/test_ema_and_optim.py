"""EMA of the weights, the batch plan, DeepSpeed's config, and the optimizer guard of the plain fp32 path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.train.ema import ModelEma
from pipeline.train.engine import BatchPlan, deepspeed_config, needs_guard
from pipeline.train.optim import NonFiniteGuard, OptimSettings, build_optimizer


def test_ema_follows_the_formula_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.75)
    start = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    expected = 0.75 * start["0.weight"] + 0.25 * model[0].weight
    assert torch.allclose(ema.shadow["0.weight"], expected)
    assert "1.num_batches_tracked" not in ema.shadow, "integer buffers are not averaged"
    weights = ema.weights_for(model)
    assert weights["1.num_batches_tracked"].dtype == torch.long
    assert torch.equal(weights["0.weight"], ema.shadow["0.weight"])
    copy = ModelEma(model, decay=0.75)
    copy.load_state_dict(ema.state_dict())
    assert all(torch.equal(copy.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, decay=1.0)


def test_batch_plan_derives_accumulation_and_says_how():
    plan = BatchPlan.derive(global_batch=2048, per_rank=128, world_size=4)
    assert plan.accumulation == 4
    assert plan.describe() == "global batch 2048 = 128 per rank x 4 ranks x 4 gradient accumulation steps"
    with pytest.raises(ValueError, match="global_batch_size 1000 is not a multiple of loader.batch_size 128 x 4"):
        BatchPlan.derive(1000, 128, 4)


def test_deepspeed_config_follows_stage_precision_and_clipping():
    plan = BatchPlan.derive(64, 8, 2)
    config = deepspeed_config(plan, zero_stage=3, precision="bf16", grad_clip=3.0)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (64, 8, 4)
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"]
    assert not config["torch_autocast"]["enabled"] and config["gradient_clipping"] == 3.0
    autocast = deepspeed_config(plan, zero_stage=0, precision="bf16_autocast", grad_clip=3.0)
    assert autocast["torch_autocast"]["enabled"] and not autocast["bf16"]["enabled"]
    assert needs_guard(0, "bf16_autocast") and autocast["gradient_clipping"] == 0.0, "the guard clips instead"
    assert not needs_guard(0, "bf16") and not needs_guard(2, "fp32")


def test_guard_skips_nonfinite_steps_and_clips_finite_ones():
    param = nn.Parameter(torch.zeros(4))
    groups = [{"params": [param], "names": ["p"], "lr_scale": 1.0, "wd_scale": 0.0}]
    optimizer = build_optimizer(groups, OptimSettings(lr=0.1), zero_stage=0, device=torch.device("cpu"), guard_clip=1.0)
    param.grad = torch.tensor([float("nan"), 1.0, 0.0, 0.0])
    optimizer.step()
    assert optimizer.overflow and torch.equal(param.detach(), torch.zeros(4)) and not optimizer.state
    param.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    optimizer.step()
    assert not optimizer.overflow and optimizer._global_grad_norm == pytest.approx(5.0)
    assert torch.allclose(param.grad.norm(), torch.tensor(1.0), atol=1e-5), "clipped to the max norm"
    assert param[0] < 0 and param[1] < 0, "the update was applied"
    assert NonFiniteGuard(0.0).check(optimizer)


def test_lamb_is_refused_where_zero_flattens_tensors():
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "names": ["p"], "lr_scale": 1.0, "wd_scale": 1.0}]
    with pytest.raises(ValueError, match="lamb needs zero_stage 0"):
        build_optimizer(groups, OptimSettings(name="lamb"), zero_stage=2, device=torch.device("cpu"))
    lamb = build_optimizer(groups, OptimSettings(name="lamb"), zero_stage=0, device=torch.device("cpu"))
    assert type(lamb).__name__ == "Lamb" and lamb.defaults["max_grad_norm"] is None


def test_lamb_has_timms_multi_tensor_path():
    """timm 1.0.31 (the version setup.cfg requires) added LAMB's multi-tensor implementation; with our default
    ``foreach=None`` timm takes it for CUDA parameters. It computes what the per-tensor loop computes."""
    from timm.optim import lamb as timm_lamb

    assert hasattr(timm_lamb, "_multi_tensor_lamb")
    steps = {}
    for foreach in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))]
        groups = [{"params": params, "names": ["w", "b"], "lr_scale": 1.0, "wd_scale": 1.0}]
        optimizer = build_optimizer(groups, OptimSettings(name="lamb", lr=0.1), zero_stage=0,
                                    device=torch.device("cpu"))
        assert optimizer.param_groups[0]["foreach"] is None
        optimizer.param_groups[0]["foreach"] = foreach
        for _ in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * 3)
            optimizer.step()
        steps[foreach] = [p.detach().clone() for p in params]
    for single, multi in zip(steps[False], steps[True]):
        torch.testing.assert_close(multi, single)
