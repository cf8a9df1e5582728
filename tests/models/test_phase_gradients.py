"""The hand-written backward passes of the phase maths against finite differences (float64 gradcheck),
including the broadcast shapes the model uses (initial phases shared by every sample and head)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from pipeline.models import phase as ph


def random(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit_phasor(*shape, seed: int = 0) -> torch.Tensor:
    return ph.phasor(random(*shape, seed=seed) * 3)


@pytest.mark.parametrize("batch, heads", [(2, 3), (1, 1), (2, 1)])
def test_mix_rotation_gradients(batch, heads):
    z = unit_phasor(batch, heads, 5, 4, seed=1).requires_grad_()
    mix = (torch.eye(4, dtype=torch.float64) + 0.3 * random(3, 4, 4, seed=2)).requires_grad_()
    assert gradcheck(ph.mix_rotation, (z, mix))


@pytest.mark.parametrize("conj", [False, True])
@pytest.mark.parametrize("rot_batch", [3, 1])
def test_pair_rotation_gradients(conj, rot_batch):
    x = random(3, 5, 2, 6, seed=3).requires_grad_()
    rot = ph.split_phasor(unit_phasor(rot_batch, 5, 1, 3, seed=4)).requires_grad_()  # broadcast over dim 2
    assert gradcheck(lambda a, b: ph.rotate_pairs(a, b, conj=conj), (x, rot))


def test_pair_rotation_is_inverted_by_its_conjugate():
    x = random(2, 4, 3, 8, seed=5)
    rot = ph.split_phasor(unit_phasor(2, 4, 3, 4, seed=6))
    assert torch.allclose(ph.rotate_pairs(ph.rotate_pairs(x, rot), rot, conj=True), x, atol=1e-12)


@pytest.mark.parametrize("z_shape", [(2, 3, 5, 4), (1, 1, 5, 4)])
def test_kuramoto_step_gradients(z_shape):
    z = unit_phasor(*z_shape, seed=7).requires_grad_()
    mean_field = (0.7 * random(2, 3, 5, 8, seed=8)).requires_grad_()
    gamma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(ph.kuramoto_step, (z, mean_field, gamma))


def test_phase_gradients_reach_bf16_inputs_in_their_dtype():
    z = unit_phasor(2, 2, 3, 4).float().requires_grad_()
    field = random(2, 2, 3, 8).bfloat16().requires_grad_()
    x = random(2, 3, 2, 8).bfloat16().requires_grad_()
    rot = ph.token_major(ph.mix_rotation(z, torch.eye(4).expand(2, 4, 4)), torch.bfloat16)
    loss = ph.kuramoto_step(z, field, 0.1).sum() + ph.rotate_pairs(x, rot).float().sum()
    loss.backward()
    assert field.grad.dtype == x.grad.dtype == torch.bfloat16 and z.grad.dtype == torch.float32
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_rms_normalise_matches_rms_norm_and_its_gradients():
    x = random(2, 3, 5, 8, seed=9).requires_grad_()
    assert torch.allclose(ph.rms_normalise(x), torch.nn.functional.rms_norm(x, (8,)), atol=1e-14)
    assert gradcheck(ph.rms_normalise, (x,))
