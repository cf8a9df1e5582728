"""Fused KoPE attention against the plain PyTorch path, forward and backward (q, k, v and phasor gradients).

Without CUDA the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set before Triton is
first imported (``tests/conftest.py``, and here for a file run on its own). With CUDA the same tests check the
compiled kernels. Sizes are small so that the interpreter stays fast, yet span several of its 16-row tiles with a
ragged last one. The last tests run the kernels inside the KoPE model (``fused_attention=True``) against its plain
path.

The gradient reference is plain autograd through ordinary differentiable ops in fp64, not the hand-written
backward of ``pipeline.models.phase``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are built

import pytest  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

from pipeline.models import phase as ph  # noqa: E402
from pipeline.models.fused import available, kope_attention  # noqa: E402
from pipeline.models.fused.kernels import interpreted  # noqa: E402
from pipeline.models.kope_vit import KopeAttention  # noqa: E402

DEVICE = torch.device("cpu" if interpreted() else "cuda")


@pytest.fixture(autouse=True, scope="module")
def fused_path_runs_here():
    if not available(DEVICE):
        pytest.fail(f"fused attention cannot run on {DEVICE}: without CUDA, pipeline.models.fused must be imported "
                    "after TRITON_INTERPRET=1 is set (run this file in its own process)")


def random(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit_phasor(batch: int, heads: int, n: int, head_dim: int, seed: int) -> torch.Tensor:
    return ph.phasor(random(batch, heads, n, head_dim // 2, seed=seed, scale=3.0))


def clamped_phasor(batch: int, heads: int, n: int, head_dim: int, seed: int) -> torch.Tensor:
    """A block rotation whose mix is so small that ``|ẑ|²`` falls under ``MIX_EPS`` for many oscillators: the
    renormalisation clamps there and leaves non-unit phasors beside unit ones."""
    rot_dim = head_dim // 2
    mix = random(heads, rot_dim, rot_dim, seed=seed, scale=(ph.MIX_EPS / rot_dim) ** 0.5)
    out = ph.mix_rotation(unit_phasor(batch, 1, n, head_dim, seed + 1), mix).flatten(-2)
    clamped = (out.unflatten(-1, (2, rot_dim)).norm(dim=-2) < 0.99).double().mean()
    assert 0.2 < clamped < 0.9, clamped
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    re, im = x.unflatten(-1, (x.shape[-1] // 2, 2)).unbind(-1)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


def reference(q, k, v, phasor, rotate_vo: bool) -> torch.Tensor:
    """The maths written out with differentiable fp64 ops: rotate, attend with scale 1/√D, multiply by the
    conjugate phasor."""
    cos, sin = phasor.double().chunk(2, dim=-1)
    q, k = _rotate(q.double(), cos, sin), _rotate(k.double(), cos, sin)
    v = _rotate(v.double(), cos, sin) if rotate_vo else v.double()
    out = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v
    return _rotate(out, cos, -sin) if rotate_vo else out


def plain_path(q, k, v, phasor, rotate_vo: bool) -> torch.Tensor:
    """What ``KopeAttention`` runs today, in the activations' dtype: ``rotate_qkv`` on a fused projection, SDPA,
    ``unrotate_heads``; returned as ``(B, H, N, D)``."""
    b, h, n, d = q.shape
    rot = ph.token_major(ph.split_phasor(phasor), q.dtype)
    qkv = torch.stack((q, k, v), dim=2).transpose(1, 3)  # (B, N, 3, H, D)
    q, k, v = ph.rotate_qkv(qkv, rot, rotate_v=rotate_vo).permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = ph.unrotate_heads(out, rot) if rotate_vo else out.transpose(1, 2).reshape(b, n, h * d)
    return out.view(b, n, h, d).transpose(1, 2)


def run_both(shape, phasor, rotate_vo: bool, dtype: torch.dtype, seed: int = 0):
    """Fused output and gradients (inputs in ``dtype``, phasor fp32) beside the fp64 reference's on the same
    values; the upstream gradient is random so every output element matters."""
    data = [random(*shape, seed=seed + i) for i in range(3)] + [phasor]
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in data[:3]] + [phasor.to(DEVICE, torch.float32)
                                                                         .requires_grad_()]
    exact = [t.detach().cpu().double().requires_grad_() for t in leaves]
    out = kope_attention(*leaves, rotate_vo=rotate_vo)
    grad = random(*out.shape, seed=seed + 9)
    out.backward(grad.to(DEVICE, dtype))
    expected = reference(*exact, rotate_vo)
    expected.backward(grad)
    fused = [out.detach()] + [t.grad for t in leaves]
    return [t.cpu().double() for t in fused], [expected.detach()] + [t.grad for t in exact]


def assert_matches(actual: list, expected: list, rtol: float, atol: float) -> None:
    for name, a, e in zip(("out", "dq", "dk", "dv", "dphasor"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("rotate_vo", [True, False])
@pytest.mark.parametrize("kind", ["unit", "clamped"])
def test_fp32_matches_reference_forward_and_backward(kind, rotate_vo):
    b, h, n, d = 2, 2, 20, 32
    make = unit_phasor if kind == "unit" else clamped_phasor
    actual, expected = run_both((b, h, n, d), make(b, h, n, d, seed=5), rotate_vo, torch.float32)
    assert_matches(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("phasor_batch, phasor_heads", [(1, 1), (2, 1), (1, 2)])
def test_broadcast_phasor_gets_gradients_summed_over_shared_dims(phasor_batch, phasor_heads):
    b, h, n, d = 2, 2, 20, 16
    actual, expected = run_both((b, h, n, d), unit_phasor(phasor_batch, phasor_heads, n, d, seed=6), True,
                                torch.float32)
    assert actual[4].shape == (phasor_batch, phasor_heads, n, d)
    assert_matches(actual, expected, rtol=1e-5, atol=1e-5)


def test_prefix_tokens_at_phase_zero_and_grid_phases():
    """The model's initial phasors: CLS and registers at phase 0 (cos 1, sin 0), 2-D RoPE on a 3×6 grid."""
    d = 16
    phasor = ph.phasor(ph.grid_phases((3, 6), d // 2, num_prefix_tokens=2, dtype=torch.float64))[None, None]
    actual, expected = run_both((1, 2, 20, d), phasor, True, torch.float32, seed=3)
    assert_matches(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotate_vo", [True, False])
def test_bf16_matches_reference_to_bf16_precision(rotate_vo):
    """bf16 inputs, fp32 phasor, against fp64 maths on the same bf16 values. The bound is loose: bf16 resolves
    2⁻⁸ ≈ 0.4 %, the kernels round the rotated tiles and the softmax weights to bf16 as GPU flash attention does,
    and Triton's interpreter rounds its fp32 → bf16 casts toward zero, about doubling those errors (1–2 % of the
    largest value here, against under 1 % for the plain bf16 path)."""
    b, h, n, d = 1, 2, 40, 64
    actual, expected = run_both((b, h, n, d), unit_phasor(b, h, n, d, seed=7), rotate_vo, torch.bfloat16)
    for name, a, e in zip(("out", "dq", "dk", "dv", "dphasor"), actual, expected, strict=True):
        error, scale = (a - e).abs().max().item(), e.abs().max().item()
        assert error < 0.03 * scale, f"{name}: max error {error:.3g} for values up to {scale:.3g}"


def test_fp16_matches_reference():
    b, h, n, d = 1, 2, 20, 32
    actual, expected = run_both((b, h, n, d), clamped_phasor(b, h, n, d, seed=8), True, torch.float16)
    assert_matches(actual, expected, rtol=2e-2, atol=2e-2)


def test_scores_far_below_zero_keep_gradients_finite():
    """Every score of a row far below zero (its log-sum-exp too): the weights of the zero-padded keys of the
    ragged last tile, exp2(0 − lse), overflow unless they are masked."""
    b, h, n, d = 1, 1, 20, 16
    keys = random(1, 1, 1, d, seed=1).abs().expand(b, h, n, d)
    data = [-200.0 * keys, keys + 0.01 * random(b, h, n, d, seed=2), random(b, h, n, d, seed=3)]
    phasor = ph.phasor(torch.zeros(1, 1, n, d // 2, dtype=torch.float64))
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (*data, phasor)]
    out = kope_attention(*leaves)
    out.sum().backward()
    exact = [t.clone().requires_grad_() for t in (*data, phasor)]
    reference(*exact, True).sum().backward()
    assert (data[0] @ data[1].transpose(-2, -1)).max() * d**-0.5 < -150  # below fp32's exp range
    for name, a, e in zip(("dq", "dk", "dv", "dphasor"), leaves, exact, strict=True):
        assert torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad.cpu().double(), e.grad, rtol=2e-3, atol=2e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fp32_forward_equals_the_plain_path_with_clamped_phasors():
    """The plain path's forward multiplies the output by the conjugate of a non-unit phasor (no division)."""
    b, h, n, d = 2, 2, 20, 16
    phasor = clamped_phasor(b, h, n, d, seed=4).float().to(DEVICE)
    q, k, v = (random(b, h, n, d, seed=i).float().to(DEVICE) for i in range(3))
    torch.testing.assert_close(kope_attention(q, k, v, phasor), plain_path(q, k, v, phasor, True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vo_rotation", [True, False])
def test_drops_into_kope_attention_between_its_projections(vo_rotation):
    """KopeAttention's forward with the fused op in place of rotate/SDPA/unrotate: q, k, v are views of the qkv
    projection, the phasor is the block's mixed rotation flattened, the output reshapes to tokens as a view; the
    module's output and the gradients of its input, phasors and parameters (the phase mix included) agree."""
    torch.manual_seed(0)
    attn = KopeAttention(dim=64, num_heads=2, vo_rotation=vo_rotation).to(DEVICE)
    x0 = torch.randn(2, 19, 64, device=DEVICE)
    z0 = ph.phasor(ph.grid_phases((3, 6), 16, num_prefix_tokens=1, device=DEVICE))[None, None]

    def fused_forward(x, z):
        b, n, c = x.shape
        qkv = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = kope_attention(q, k, v, attn.rotation(z).flatten(-2), rotate_vo=attn.vo_rotation)
        tokens = out.transpose(1, 2).reshape(b, n, c)
        assert tokens.data_ptr() == out.data_ptr()  # a view, no copy
        return attn.proj(tokens)

    results = []
    for forward in (attn, fused_forward):
        attn.zero_grad()
        x, z = x0.clone().requires_grad_(), z0.clone().requires_grad_()
        out = forward(x, z)
        out.square().sum().backward()
        results.append([out.detach(), x.grad, z.grad, attn.phase_mix.grad, attn.qkv.weight.grad])
    for name, plain, fused in zip(("out", "dx", "dz", "dmix", "dqkv"), *results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_flops_are_counted_as_for_sdpa():
    """torch's FLOP counter sees the fused op as attention: the forward and backward FLOPs it counts for SDPA."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    shape = (2, 2, 20, 16)
    q, k, v = (random(*shape, seed=i).float().to(DEVICE).requires_grad_() for i in range(3))
    phasor = unit_phasor(1, 1, 20, 16, seed=4).float().to(DEVICE)
    with FlopCounterMode(display=False) as counter:
        kope_attention(q, k, v, phasor).sum().backward()
    expected = sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)
    assert expected == 4 * 2 * 2 * 20 * 20 * 16 * 7 // 2 and counter.get_total_flops() == expected


def test_constant_phasor_gets_no_gradient():
    q, k, v = (random(1, 2, 20, 16, seed=i).float().to(DEVICE).requires_grad_() for i in range(3))
    phasor = unit_phasor(1, 1, 20, 16, seed=1).float().to(DEVICE)
    kope_attention(q, k, v, phasor).sum().backward()
    assert phasor.grad is None and q.grad is not None and torch.isfinite(q.grad).all()


def test_traces_into_one_graph_with_its_backward():
    """torch.compile(fullgraph=True) keeps the op (opaque, with its fake implementation) inside one graph, the
    backward op inside the compiled backward graph, and computes what eager computes."""
    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = str(gm.graph)
            return make_boxed_func(gm)
        return compiler

    def block(q, k, v, phasor):
        out = kope_attention(q * 0.5, k, v, phasor)
        return (out.transpose(1, 2).flatten(2) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=aot_autograd(fw_compiler=keep("fw"),
                                                                        bw_compiler=keep("bw")))
    results = []
    for fn in (block, compiled):
        leaves = [random(2, 2, 20, 16, seed=i).float().to(DEVICE).requires_grad_() for i in range(3)]
        leaves.append(unit_phasor(2, 2, 20, 16, seed=4).float().to(DEVICE).requires_grad_())
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    assert "kope.fused_attention_forward" in graphs["fw"] and "kope.fused_attention_backward" in graphs["bw"]
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager)


def test_ops_pass_torch_library_checks():
    """Schema, fake implementations (shapes, strides, dynamic shapes) and the autograd registration of both ops,
    as ``torch.library.opcheck`` checks them against real runs."""
    from pipeline.models.fused import attention

    q, k, v = (random(1, 1, 16, 16, seed=i).float().to(DEVICE).requires_grad_() for i in range(3))
    phasor = unit_phasor(1, 1, 16, 16, seed=3).float().to(DEVICE).requires_grad_()
    torch.library.opcheck(attention._forward_op, (q, k, v, phasor, True))
    out, lse = attention._forward_op(q, k, v, phasor, True)
    saved = [t.detach() for t in (q, k, v, phasor, out, lse)]
    torch.library.opcheck(attention._backward_op, (*saved, torch.ones_like(out), True, True))


@pytest.mark.slow
def test_compiles_with_inductor():
    """The default backend: inductor generates code around the op (C++ on the CPU, Triton on CUDA)."""
    torch._dynamo.reset()
    leaves = [random(1, 2, 20, 32, seed=i).float().to(DEVICE).requires_grad_() for i in range(3)]
    phasor = unit_phasor(1, 2, 20, 32, seed=4).float().to(DEVICE).requires_grad_()

    def block(q, k, v, z):
        return kope_attention(q.sin(), k, v, z * 1.0).cos().sum()

    loss = torch.compile(block, fullgraph=True)(*leaves, phasor)
    loss.backward()
    grads = [t.grad for t in (*leaves, phasor)]
    for t in (*leaves, phasor):
        t.grad = None
    block(*leaves, phasor).backward()
    for traced, t in zip(grads, (*leaves, phasor), strict=True):
        torch.testing.assert_close(traced, t.grad)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rotate_vo", [True, False])
def test_larger_heads_and_sequences(head_dim, rotate_vo):
    b, h, n = 1, 2, 150  # several tiles on CUDA too
    actual, expected = run_both((b, h, n, head_dim), clamped_phasor(b, h, n, head_dim, seed=2), rotate_vo,
                                torch.float32)
    assert_matches(actual, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("change, message", [
    (dict(k=(1, 2, 21, 16)), "share one"),
    (dict(q=(1, 2, 20, 24), k=(1, 2, 20, 24), v=(1, 2, 20, 24), phasor=(1, 1, 20, 24)), "head dims"),
    (dict(phasor=(1, 1, 20, 8)), "phasor must be"),
    (dict(phasor=(3, 1, 20, 16)), "phasor must be"),
])
def test_rejects_inputs_it_cannot_take(change, message):
    shapes = dict(q=(1, 2, 20, 16), k=(1, 2, 20, 16), v=(1, 2, 20, 16), phasor=(1, 1, 20, 16)) | change
    tensors = {name: torch.zeros(shape, device=DEVICE) for name, shape in shapes.items()}
    with pytest.raises(ValueError, match=message):
        kope_attention(**tensors)
    with pytest.raises(ValueError, match="dtype"):
        kope_attention(*(torch.zeros(1, 2, 20, 16, device=DEVICE, dtype=torch.float64),) * 3,
                       torch.zeros(1, 1, 20, 16, device=DEVICE))


def test_available_only_where_the_kernels_run():
    assert available(DEVICE)
    assert not available("meta")


def load_bench():
    path = Path(__file__).resolve().parents[2] / "tools" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_skips_on_the_cpu(capsys):
    result = load_bench().main(["--device", "cpu"])
    assert json.loads(capsys.readouterr().out) == result and result["device"] == "cpu" and "skipped" in result


def test_bench_times_every_variant_on_the_same_inputs():
    """The benchmark's own code at toy size (interpreted on the CPU: its timings mean nothing there); the fused
    and plain variants it times compute the same tokens."""
    bench = load_bench()
    args = bench.parse_args(["--device", str(DEVICE), "--batch", "1", "--heads", "2", "--tokens", "20",
                             "--head-dim", "16", "--dtype", "fp32", "--steps", "1", "--warmup", "1", "--no-compile"])
    result = bench.benchmark(args)
    assert set(result["variants"]) == {"fused", "plain", "sdpa"} and set(result["fused_speedup"]) == {"plain", "sdpa"}
    for timing in result["variants"].values():
        assert timing["fwd_bwd_ms"] > 0 and timing["fwd_ms"] > 0 and timing["layer_img_per_s"] > 0
    assert result["fused_vs_plain_max_abs_diff"] < 1e-5


# --- the fused path inside the model -------------------------------------------------------------------------------


def tiny_models(vo_rotation: bool, clamped: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 2-block KoPE ViT (17 tokens, heads of 32) with the plain path and the same model with the fused kernel.
    ``clamped``: phase mixes so small that the renormalisation clamps for part of the oscillators."""
    import timm

    import pipeline.models  # noqa: F401  (registers vit_kope_*)

    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5,
                vo_rotation=vo_rotation, learnable_gamma=True)
    torch.manual_seed(0)
    plain = timm.create_model("vit_kope_tiny_patch16_224", fused_attention=False, **args)
    if clamped:
        with torch.no_grad():
            for i, block in enumerate(plain.blocks):
                rot_dim = block.attn.phase_mix.shape[-1]
                block.attn.phase_mix.copy_(random(*block.attn.phase_mix.shape, seed=20 + i,
                                                  scale=(ph.MIX_EPS / rot_dim) ** 0.5))
        z = plain.initial_phasor((4, 4), torch.device("cpu"))
        rotation = plain.blocks[0].attn.rotation(z)
        shortened = (rotation.norm(dim=-2) < 0.99).double().mean()
        assert 0.2 < shortened < 0.9, shortened
    fused = timm.create_model("vit_kope_tiny_patch16_224", fused_attention=True, **args)
    fused.load_state_dict(plain.state_dict())
    return plain.to(DEVICE), fused.to(DEVICE)


@pytest.mark.parametrize(("vo_rotation", "clamped"), [
    (True, True), (False, True), pytest.param(True, False, marks=pytest.mark.slow),
    pytest.param(False, False, marks=pytest.mark.slow)])
def test_the_model_on_the_fused_path_equals_the_plain_path_forward_and_backward(vo_rotation, clamped):
    plain, fused = tiny_models(vo_rotation, clamped)
    assert not plain.blocks[0].attn.uses_fused(torch.zeros(1, device=DEVICE))
    assert fused.blocks[0].attn.uses_fused(torch.zeros(1, device=DEVICE))
    images = random(2, 3, 32, 32, seed=1).float().to(DEVICE)
    results = []
    for model in (plain, fused):
        x = images.clone().requires_grad_()
        logits = model(x)
        logits.square().sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), x.grad, grads))
    (out_p, dx_p, grads_p), (out_f, dx_f, grads_f) = results
    torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-4, atol=1e-5)
    assert grads_f.keys() == grads_p.keys() and any("phase_mix" in name for name in grads_p)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_auto_takes_the_fused_kernels_on_cuda_only_and_true_refuses_attention_dropout():
    attention = KopeAttention(dim=64, num_heads=2)
    assert attention.fused_attention == "auto"
    assert not attention.uses_fused(torch.zeros(1)), "auto on a CPU tensor: the plain path"
    if DEVICE.type == "cuda":
        assert attention.uses_fused(torch.zeros(1, device=DEVICE))
        assert not KopeAttention(64, 2, attn_drop=0.1).train().uses_fused(torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="no attention dropout"):
        KopeAttention(64, 2, attn_drop=0.1, fused_attention=True)
    with pytest.raises(ValueError, match="fused_attention must be"):
        KopeAttention(64, 2, fused_attention="always")


@pytest.mark.slow
def test_the_model_on_the_fused_path_compiles_into_one_graph():
    _, fused = tiny_models(vo_rotation=True, clamped=False)
    images = random(2, 3, 32, 32, seed=2).float().to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(images), fused(images), rtol=1e-5, atol=1e-6)
