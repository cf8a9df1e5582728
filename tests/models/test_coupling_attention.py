"""The Kuramoto coupling's attention (the mean field ``m = K·[cos|sin]``) runs as one fused SDPA call in both coupling
variants, and computes what the softmax formula written out computes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.models import phase as ph


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def written_out(coupling: ph.KuramotoCoupling, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    h, d = coupling.num_heads, coupling.head_dim
    q, k = coupling.qk(x).view(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    z = z.expand(b, h, n, d)
    if coupling.variant == "rms_qk":
        rms = lambda t: t / (t.square().mean(-1, keepdim=True) + torch.finfo(t.dtype).eps).sqrt()  # noqa: E731
        q, k, values = rms(q) * coupling.q_scale.unsqueeze(1), rms(k), z
    else:
        values = coupling.v(z.transpose(1, 2).reshape(b, n, c)).view(b, n, h, d).transpose(1, 2)
    weights = (q @ k.transpose(-2, -1) / d**0.5).softmax(-1)
    out = weights @ values
    if coupling.variant == "vo_proj":
        out = coupling.o(out.transpose(1, 2).reshape(b, n, c)).view(b, n, h, d).transpose(1, 2)
    return out


@pytest.mark.parametrize("variant", ["rms_qk", "vo_proj"])
def test_the_mean_field_is_one_sdpa_call(variant):
    torch.manual_seed(0)
    coupling = ph.KuramotoCoupling(32, 2, variant=variant)
    x = torch.randn(2, 10, 32)
    z = ph.phasor(torch.rand(1, 1, 10, 8) * 6)
    with Ops() as ops:
        field = coupling.mean_field(x, z)
    attention = [name for name in ops.names if "scaled_dot_product" in name]
    assert len(attention) == 1, ops.names
    assert not {"aten._softmax.default", "aten.bmm.default"} & set(ops.names), "no unfused softmax attention"
    torch.testing.assert_close(field, written_out(coupling, x, z), rtol=1e-5, atol=1e-6)
