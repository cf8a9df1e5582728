"""The DINO task on a real DeepSpeed engine (one process, CPU): the teacher, the EMA, masking, resume state,
parameter groups and the exported backbone."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from pipeline.core.errors import ConfigError
from pipeline.data.loaders import LoaderSettings
from pipeline.data.loaders_samples import masked_patch_index
from pipeline.data.transforms import DinoAugSettings
from pipeline.train.engine import BatchPlan, build_engine, init_distributed
from pipeline.train.optim import OptimSettings
from pipeline.train.param_groups import build_param_groups
from pipeline.train.tasks.dino import DinoSettings, DinoTask
from tests.train.helpers import use_shared_torch_extensions

BATCH = 4
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 8, "learnable_gamma": True}


def dino_settings(**overrides) -> DinoSettings:
    aug = DinoAugSettings(global_size=32, local_size=16, local_crops=2, patch_size=8)
    fields = {"head_hidden_dim": 32, "head_bottleneck_dim": 16, "prototypes": 24, "aug": aug, **overrides}
    return DinoSettings(**fields)


def dino_task(total_steps: int = 4, model_kwargs: dict | None = None, **overrides) -> DinoTask:
    task = DinoTask(dino_settings(**overrides), model="vit_kope_tiny_patch16_224", model_kwargs=model_kwargs or TINY,
                    data_dir=".", loader=LoaderSettings(batch_size=BATCH), seed=0)
    task.begin(total_steps)
    return task


def engine_for(task: DinoTask, zero_stage: int = 0, lr: float = 1e-3):
    use_shared_torch_extensions()
    device = init_distributed(0, 1, 0)
    torch.manual_seed(0)
    module = task.build_module()
    optim = OptimSettings(lr=lr, weight_decay=0.0)
    return build_engine(module, optim, BatchPlan.derive(BATCH, BATCH, 1), zero_stage, "fp32", device)


def fake_batch(seed: int = 0, masked: float = 0.4) -> dict[str, torch.Tensor]:
    """What the loader's DINO batches hold (the masks also as index lists with weights, as its collate makes)."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * BATCH, 16, generator=gen) < masked
    indices, weights = masked_patch_index(masks)
    return {"global_crops": torch.randn(2 * BATCH, 3, 32, 32, generator=gen),
            "local_crops": torch.randn(2 * BATCH, 3, 16, 16, generator=gen),
            "masks": masks, "mask_indices": indices, "mask_weights": weights}


def train_steps(task: DinoTask, engine, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        loss, _ = task.compute_loss(engine, fake_batch(step), step)
        engine.backward(loss)
        engine.step()
        task.after_optimizer_step(engine, step)
        losses.append(loss.item())
    return losses


def test_zero_stage_3_is_refused_when_the_config_is_loaded():
    from tests.train.helpers import stage_settings

    with pytest.raises(ConfigError, match=r"stages.pretrain.zero_stage: mode dino supports ZeRO stages 0, 1 and 2.*"
                                          r"set zero_stage: 2") as error:
        stage_settings({"data": ".", "mode": "dino", "steps": 1, "zero_stage": 3})
    assert "\n" not in str(error.value)


def test_teacher_is_outside_the_optimizer_and_follows_the_ema_formula():
    task = dino_task(total_steps=2)
    engine = engine_for(task)
    student, teacher = engine.module, task.teacher
    optimized = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters() if p.requires_grad}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)  # the teacher starts as the student

    for step, momentum in enumerate([0.9, 0.95]):  # cosine 0.9 -> 1.0 over 2 steps
        before = [t.clone() for t in teacher.parameters()]
        loss, metrics = task.compute_loss(engine, fake_batch(step), step)
        assert {"loss_cls", "loss_ibot", "compression", "expansion"} <= set(metrics)
        engine.backward(loss)
        engine.step()
        assert all(t.grad is None for t in teacher.parameters())
        task.after_optimizer_step(engine, step)
        assert task.momentum == pytest.approx(momentum)
        for old, t, s in zip(before, teacher.parameters(), student.parameters()):
            torch.testing.assert_close(t, momentum * old + (1 - momentum) * s.detach(), rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    assert {"teacher_momentum", "gamma", "phase_synchrony"} <= set(task.extra_metrics(engine))


@pytest.mark.parametrize("objective", ["simdino", "dino"])
def test_loss_falls_on_a_fixed_batch(objective):
    task = dino_task(total_steps=12, objective=objective, phase_alignment_weight=0.1)
    engine = engine_for(task, zero_stage=2, lr=3e-3)
    losses = []
    for step in range(12):
        loss, metrics = task.compute_loss(engine, fake_batch(0), step)
        assert "loss_phase" in metrics and metrics["loss_phase"] < -0.9  # phases start nearly aligned
        engine.backward(loss)
        engine.step()
        task.after_optimizer_step(engine, step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 * abs(losses[0]), losses


def test_masked_patches_see_only_the_mask_token():
    task = dino_task()
    student = task.build_module().eval()
    images = torch.randn(2, 3, 32, 32)
    everything = torch.ones(2, 16, dtype=torch.bool)
    masked = student.encode(images, everything)["patch_tokens"]
    torch.testing.assert_close(masked[0], masked[1])  # no pixel reaches the encoder
    plain = student.encode(images)["patch_tokens"]
    assert not torch.allclose(plain[0], plain[1])
    indices, _ = masked_patch_index(everything)
    out = student(images, torch.empty(0, 3, 16, 16), everything, indices)
    assert out["cls"].shape == (2, 16) and out["patch"].shape == (32, 16)  # simdino: normalised bottleneck
    targets = task.teacher.targets(images, indices)
    assert not torch.allclose(targets["patch"][:16], targets["patch"][16:])  # the teacher sees the pixels


def test_without_ibot_there_is_no_mask_token_and_no_patch_loss():
    task = dino_task(ibot_weight=0.0)
    student = task.build_module()
    batch = fake_batch()
    assert student.mask_token is None and "patch" not in student(batch["global_crops"], batch["local_crops"])


def test_state_dict_restores_teacher_and_centres():
    trained = dino_task(objective="dino", total_steps=3)
    engine = engine_for(trained)
    train_steps(trained, engine, 3)
    fresh = dino_task(objective="dino", total_steps=3)
    torch.manual_seed(1)
    fresh.build_module()
    fresh.load_state_dict(trained.state_dict())
    for name, tensor in trained.teacher.state_dict().items():
        assert torch.equal(fresh.teacher.state_dict()[name], tensor), name
    assert trained.cls_loss.centering.center.abs().sum() > 0
    assert torch.equal(fresh.cls_loss.centering.center, trained.cls_loss.centering.center)
    assert torch.equal(fresh.patch_loss.centering.center, trained.patch_loss.centering.center)


def test_export_is_the_teacher_backbone_as_a_timm_model():
    task = dino_task(total_steps=2)
    engine = engine_for(task)
    train_steps(task, engine, 2)
    exported = dict(task.parameters_for_export(engine))
    spec = task.model_spec()
    model = timm.create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(exported)  # strict: names and shapes (the 0-dim γ parameter too)
    assert exported["coupling.gamma_raw"].shape == ()
    teacher_backbone = task.teacher.backbone.eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval().forward_features(images), teacher_backbone.forward_features(images))


def test_parameter_groups_see_backbone_layers_heads_and_mask_token():
    task = dino_task()
    student = task.build_module()
    groups = build_param_groups(student, layer_decay=0.5, lr_multipliers={"patch_embed": 0.2, "coupling": 0.5})
    scale = {name: (group["lr_scale"], group["wd_scale"]) for group in groups for name in group["names"]}
    top = 3  # stem 0, blocks 1-2 (the final norm and coupling with the last block, as timm groups them), heads 3
    assert scale["backbone.patch_embed.proj.weight"] == (0.5**top * 0.2, 1.0)
    assert scale["mask_token"] == (0.5**top, 0.0)
    assert scale["backbone.pos_embed"][1] == 0.0
    assert scale["backbone.blocks.0.attn.qkv.weight"] == (0.5**2, 1.0)
    assert scale["backbone.blocks.1.mlp.fc1.weight"] == (0.5, 1.0)
    assert scale["backbone.coupling.qk.weight"] == (0.5 * 0.5, 1.0)
    assert scale["backbone.coupling.gamma_raw"] == (0.5 * 0.5, 0.0)
    assert scale["dino_head.mlp.0.weight"] == (1.0, 1.0)


def test_settings_it_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="patch size"):
        dino_task(aug=dataclasses.replace(dino_settings().aug, patch_size=16)).build_module()
    with pytest.raises(ValueError, match="needs a KoPE model"):
        dino_task(model_kwargs={**TINY, "kope": False}, phase_alignment_weight=0.5).build_module()
