"""DINO-style losses against values computed here by other means, on one process and on two gloo ranks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.core.ranks import free_port
from pipeline.data.loaders_samples import masked_patch_index
from pipeline.train.losses.dino import Centering, DinoLoss, cross_view_cross_entropy, teacher_temperature
from pipeline.train.losses.ibot import IbotLoss, masked_patch_cosine_loss
from pipeline.train.losses.phase_alignment import phase_alignment_loss
from pipeline.train.losses.simdino import SimDinoLoss, coding_rate


def run_on_ranks(fn, world_size: int, out_dir: Path, *args: Any) -> list[Any]:
    """``fn(rank, world_size, *args)`` in ``world_size`` processes joined in a gloo group; their results."""
    port = free_port()
    torch.multiprocessing.spawn(_rank_main, args=(fn, world_size, port, out_dir, args), nprocs=world_size)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


def _rank_main(rank: int, fn, world_size: int, port: int, out_dir: Path, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def unit_rows(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- coding rate and SimDINO ---------------------------------------------------------------------------------


def test_coding_rate_of_orthogonal_features_beats_collapsed():
    p, eps = 8, 0.05
    orthogonal = torch.eye(p)  # n = p rows, ZᵀZ = I: every eigenvalue of I + p/(n·eps)·ZᵀZ is 1 + 1/eps
    collapsed = torch.zeros(p, p)
    collapsed[:, 0] = 1.0  # every row the same unit vector: ZᵀZ has one eigenvalue n
    assert coding_rate(orthogonal, eps).item() == pytest.approx(p / 2 * math.log(1 + 1 / eps), rel=1e-5)
    assert coding_rate(collapsed, eps).item() == pytest.approx(0.5 * math.log(1 + p / eps), rel=1e-5)
    assert coding_rate(orthogonal, eps) > 4 * coding_rate(collapsed, eps)


def test_coding_rate_matches_logdet_for_batched_views():
    z = torch.randn(3, 10, 6, dtype=torch.float64)
    scale = 6 / (10 * 0.5)
    expected = 0.5 * torch.logdet(torch.eye(6, dtype=torch.float64) + scale * z.transpose(1, 2) @ z).float()
    torch.testing.assert_close(coding_rate(z, 0.5), expected, rtol=1e-5, atol=1e-5)


def test_coding_rate_of_non_finite_features_is_nan_not_an_error():
    z = unit_rows(5, 4)
    z[2, 1] = float("nan")
    assert torch.isnan(coding_rate(z, 0.05))


def simdino_by_hand(student: list[torch.Tensor], teacher: list[torch.Tensor], eps: float) -> torch.Tensor:
    similarities = []
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v != i:
                similarities.append(sum(float(t[b] @ s[b] / (t[b].norm() * s[b].norm())) for b in range(len(t)))
                                    / len(t))
    compression = sum(similarities) / len(similarities)
    n, p = teacher[0].shape
    rates = [0.5 * torch.logdet(torch.eye(p) + p / (n * eps) * ((s + t) / 2).T @ ((s + t) / 2))
             for s, t in zip(student, teacher)]
    expansion = float(sum(rates) / len(rates)) * (p + n) / (p * n)
    return torch.tensor(-compression - expansion)


def test_simdino_loss_matches_hand_computation():
    student = list(unit_rows(3, 5, 4, seed=1))  # 2 global views then 1 local view, batch 5, 4 features
    teacher = list(unit_rows(2, 5, 4, seed=2))
    loss, terms = SimDinoLoss(eps=0.05)(student, teacher)
    torch.testing.assert_close(loss, simdino_by_hand(student, teacher, 0.05), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, -terms["compression"] - terms["expansion"])


def test_simdino_rewards_agreeing_and_spread_features():
    spread = list(unit_rows(2, 16, 8, seed=3))
    loss_spread, _ = SimDinoLoss()(spread, [x.clone() for x in spread[::-1]])
    collapsed = [unit_rows(1, 8, seed=4).expand(16, 8)] * 2
    loss_collapsed, terms = SimDinoLoss()(collapsed, collapsed)
    assert terms["compression"] == pytest.approx(1.0)  # perfect agreement...
    assert loss_spread < loss_collapsed  # ...loses to spread features that agree across views


def test_simdino_needs_two_views():
    with pytest.raises(ValueError, match="at least two views"):
        SimDinoLoss()([unit_rows(4, 3)], [unit_rows(4, 3)])


# --- classic DINO --------------------------------------------------------------------------------------------


def test_dino_cross_entropy_equals_soft_target_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(4, 7, generator=gen) for _ in range(3)]
    teacher = [torch.randn(4, 7, generator=gen) for _ in range(2)]
    center = torch.randn(7, generator=gen)
    loss_fn = DinoLoss(out_dim=7, student_temp=0.1, center_momentum=0.9)
    loss_fn.centering.center.copy_(center)
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    targets = [F.softmax((t - center) / 0.04, dim=-1) for t in teacher]
    pairs = [F.cross_entropy(student[v] / 0.1, targets[i]) for i in range(2) for v in range(3) if v != i]
    torch.testing.assert_close(loss, torch.stack(pairs).mean())
    # The centre moved toward this batch's mean teacher output, after the loss used the old one.
    torch.testing.assert_close(loss_fn.centering.center, 0.9 * center + 0.1 * torch.cat(teacher).mean(0))


def test_dino_skips_pairs_of_the_same_view():
    logits = torch.randn(3, 5)
    target = F.softmax(logits, dim=-1)
    same_view = cross_view_cross_entropy([logits, logits + 1.0], [target], student_temp=1.0)
    torch.testing.assert_close(same_view, F.cross_entropy(logits + 1.0, target))


def test_teacher_temperature_warms_up_linearly_then_holds():
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == teacher_temperature(500, 10, 0.04, 0.07) == 0.07
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07


def test_centering_rejects_bad_momentum():
    with pytest.raises(ValueError, match="center momentum"):
        Centering(4, momentum=1.0)


# --- iBOT ----------------------------------------------------------------------------------------------------


MASKS = torch.tensor([[True, False, True, False], [False, True, False, False], [False, False, False, False]])
INDICES, WEIGHTS = masked_patch_index(MASKS)


def test_masked_patch_index_lists_patches_row_major_and_gives_each_masked_image_weight_one():
    assert INDICES.tolist() == [0, 2, 5] and INDICES.dtype == torch.int64
    torch.testing.assert_close(WEIGHTS, torch.tensor([0.5, 0.5, 1.0]))
    tokens = torch.arange(3 * 4 * 2.0).view(3, 4, 2)
    torch.testing.assert_close(tokens.flatten(0, 1).index_select(0, INDICES), tokens[MASKS])


def test_masked_patch_cosine_loss_by_hand():
    student, teacher = unit_rows(3, 6, seed=5), unit_rows(3, 6, seed=6)
    cos = [float(student[k] @ teacher[k]) for k in range(3)]
    expected = -(0.5 * cos[0] + 0.5 * cos[1] + cos[2]) / 3  # three images, the third unmasked
    assert masked_patch_cosine_loss(student, teacher, WEIGHTS, 3).item() == pytest.approx(expected, rel=1e-5)


def test_ibot_cross_entropy_by_hand_and_its_centre():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    loss_fn = IbotLoss(out_dim=5, student_temp=0.1, center_momentum=0.8)
    loss = loss_fn(student, teacher, WEIGHTS, 3, teacher_temp=0.05)
    per_patch = F.cross_entropy(student / 0.1, F.softmax(teacher / 0.05, dim=-1), reduction="none")
    torch.testing.assert_close(loss, (0.5 * per_patch[0] + 0.5 * per_patch[1] + per_patch[2]) / 3)
    torch.testing.assert_close(loss_fn.centering.center, 0.2 * teacher.mean(0))


def test_no_masked_patch_anywhere_gives_zero_and_keeps_the_centre():
    loss_fn = IbotLoss(out_dim=5)
    _, weights = masked_patch_index(torch.zeros(2, 4, dtype=torch.bool))
    loss = loss_fn(torch.empty(0, 5, requires_grad=True), torch.empty(0, 5), weights, 2, teacher_temp=0.07)
    assert loss.item() == 0.0 and torch.equal(loss_fn.centering.center, torch.zeros(5))


# --- phase alignment -----------------------------------------------------------------------------------------


def test_phase_alignment_counts_phase_differences_only():
    theta = torch.rand(2, 3, 4, 5) * 2 * math.pi
    assert phase_alignment_loss(theta, theta).item() == pytest.approx(-1.0)
    assert phase_alignment_loss(theta + math.pi, theta).item() == pytest.approx(1.0, abs=1e-6)
    shifted = phase_alignment_loss(theta + 0.3, theta + 0.3 + 2 * math.pi)
    assert shifted.item() == pytest.approx(-1.0, abs=1e-6)
    half = theta.clone()
    half[..., :2] += math.pi / 2  # 2 of 5 oscillators a quarter turn off: cos = 0 there
    assert phase_alignment_loss(half, theta).item() == pytest.approx(-3 / 5, abs=1e-6)


def test_phase_alignment_sends_no_gradient_to_the_teacher():
    student = torch.rand(1, 2, 3, 4, requires_grad=True)
    teacher = torch.rand(1, 2, 3, 4, requires_grad=True)
    phase_alignment_loss(student, teacher).backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, torch.sin(student - teacher).detach() / student.numel())


def test_phase_alignment_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        phase_alignment_loss(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4, 4))


# --- two ranks: the same as one process on the concatenated batch --------------------------------------------

BATCH, DIM = 6, 5


def global_batch() -> dict[str, torch.Tensor]:
    """Student views (2 global + 2 local), teacher views, teacher logits: the whole batch of both ranks."""
    return {"student": unit_rows(4, 2 * BATCH, DIM, seed=10), "teacher": unit_rows(2, 2 * BATCH, DIM, seed=11),
            "logits": torch.randn(2, 2 * BATCH, 9, generator=torch.Generator().manual_seed(12))}


def simdino_and_centre(student: torch.Tensor, teacher: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    student = student.clone().requires_grad_(True)
    loss, _ = SimDinoLoss(eps=0.05)(list(student), list(teacher))
    loss.backward()
    centering = Centering(9, momentum=0.5)
    centering.update(torch.cat(list(logits)))
    return {"rate": coding_rate(teacher, 0.05, across_ranks=True), "loss": loss.detach(), "grad": student.grad,
            "center": centering.center}


def _rank_part(rank: int, world_size: int) -> dict[str, Any]:
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    whole = global_batch()
    return simdino_and_centre(whole["student"][:, rows], whole["teacher"][:, rows], whole["logits"][:, rows])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    return run_on_ranks(_rank_part, 2, tmp_path_factory.mktemp("ranks"))


def test_two_rank_coding_rate_is_that_of_the_global_batch(two_ranks):
    single = simdino_and_centre(**global_batch())
    for part in two_ranks:
        torch.testing.assert_close(part["rate"], single["rate"])


def test_two_rank_simdino_loss_and_gradient_equal_one_process(two_ranks):
    single = simdino_and_centre(**global_batch())
    # Rank losses differ (their compression terms are local means) but average to the global loss...
    torch.testing.assert_close(torch.stack([p["loss"] for p in two_ranks]).mean(), single["loss"])
    # ...and each rank's gradient, averaged over ranks as the engine does, is the global loss's gradient.
    for rank, part in enumerate(two_ranks):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        torch.testing.assert_close(part["grad"] / 2, single["grad"][:, rows])


def test_two_rank_centre_uses_every_ranks_rows(two_ranks):
    single = simdino_and_centre(**global_batch())
    for part in two_ranks:
        torch.testing.assert_close(part["center"], single["center"])
