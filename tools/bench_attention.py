"""Fused KoPE attention against the plain path (rotations in PyTorch + SDPA + the inverse rotation), forward and
backward, measured in one run at ViT-B/16 shapes.

Prints one JSON line: per variant the milliseconds of one forward + backward of one attention layer (and of the
forward alone), the images/s that makes for one layer, and the peak memory the call adds; then the fused path's
speed-ups over each other variant. Variants: ``fused``; ``plain`` (what ``KopeAttention`` runs, eager);
``plain_compiled`` (the same under ``torch.compile``, as training runs it); ``sdpa`` (attention alone, no
rotations: the floor a fused kernel approaches). Inputs are what the model has there: a ``(B, N, 3, H, D)`` qkv
projection and a per-sample, per-head fp32 rotation phasor, both receiving gradients.

    python tools/bench_attention.py                        # CUDA: B 256, H 12, N 197, D 64, bf16
    python tools/bench_attention.py --no-rotate-vo --no-compile

On the CPU it prints ``{"device": "cpu", "skipped": ...}``: the fused kernels run there only in Triton's
interpreter, whose speed means nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=197, help="N: 196 patches + CLS at 224 px")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--rotate-vo", action=argparse.BooleanOptionalAction, default=True,
                        help="rotate v and the output too (the model's default)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the plain path under torch.compile")
    parser.add_argument("--steps", type=int, default=50, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first (compilation included)")
    return parser.parse_args(argv)


def plain_attention(qkv: torch.Tensor, phasor: torch.Tensor, rotate_vo: bool) -> torch.Tensor:
    """``KopeAttention.forward`` between its projections: tokens ``(B, N, H·D)``."""
    from pipeline.models import phase as ph

    b, n, _, h, d = qkv.shape
    rot = ph.token_major(ph.split_phasor(phasor), qkv.dtype)
    q, k, v = ph.rotate_qkv(qkv, rot, rotate_v=rotate_vo).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return ph.unrotate_heads(out, rot) if rotate_vo else out.transpose(1, 2).reshape(b, n, h * d)


def fused_attention(qkv: torch.Tensor, phasor: torch.Tensor, rotate_vo: bool) -> torch.Tensor:
    """The same with the fused op: q, k, v are views of qkv, the output reshapes to tokens as a view."""
    from pipeline.models.fused import kope_attention

    b, n, _, h, d = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return kope_attention(q, k, v, phasor, rotate_vo=rotate_vo).transpose(1, 2).reshape(b, n, h * d)


def sdpa_attention(qkv: torch.Tensor, phasor: torch.Tensor, rotate_vo: bool) -> torch.Tensor:
    """Attention without rotations, as timm's ViT runs it (the phasor is unused)."""
    b, n, _, h, d = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(call: Callable[[], None], steps: int, device: torch.device) -> float:
    """Wall time of ``steps`` back-to-back calls, synchronised once at each end."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        call()
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure(fn: Callable, qkv: torch.Tensor, phasor: torch.Tensor, grad: torch.Tensor, args: argparse.Namespace
            ) -> tuple[dict[str, Any], torch.Tensor]:
    """Timings and peak added memory of one variant, and its output (to check the variants agree)."""
    device = qkv.device

    def forward_backward() -> None:
        fn(qkv, phasor, args.rotate_vo).backward(grad)
        qkv.grad = phasor.grad = None

    def forward() -> None:
        with torch.no_grad():
            fn(qkv, phasor, args.rotate_vo)

    for _ in range(args.warmup):
        forward_backward()
        forward()  # a compiled variant compiles its no-grad graph here, not in the timed loop
    fwd_bwd = _seconds_per_call(forward_backward, args.steps, device)
    fwd = _seconds_per_call(forward, args.steps, device)
    peak_mb = None
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward()
        peak_mb = round((torch.cuda.max_memory_allocated(device) - baseline) / 2**20, 1)
    with torch.no_grad():
        out = fn(qkv, phasor, args.rotate_vo)
    result = {"fwd_bwd_ms": round(fwd_bwd * 1e3, 3), "fwd_ms": round(fwd * 1e3, 3),
              "layer_img_per_s": round(args.batch / fwd_bwd, 1), "peak_added_mb": peak_mb}
    return result, out


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant on the same inputs in this process, with the fused path's speed-ups over the others."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(args.batch, args.tokens, 3, args.heads, args.head_dim, device=device, dtype=dtype,
                      generator=generator).requires_grad_()
    theta = 3 * torch.randn(args.batch, args.heads, args.tokens, args.head_dim // 2, device=device,
                            generator=generator)
    phasor = torch.cat((theta.cos(), theta.sin()), dim=-1).requires_grad_()
    grad = torch.randn(args.batch, args.tokens, args.heads * args.head_dim, device=device, dtype=dtype,
                       generator=generator)
    variants: dict[str, Callable] = {"fused": fused_attention, "plain": plain_attention}
    if args.compile:
        variants["plain_compiled"] = torch.compile(plain_attention)
    variants["sdpa"] = sdpa_attention
    results, outputs = {}, {}
    for name, fn in variants.items():
        results[name], outputs[name] = measure(fn, qkv, phasor, grad, args)
    fused_ms = results["fused"]["fwd_bwd_ms"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "shape": {"batch": args.batch, "heads": args.heads, "tokens": args.tokens, "head_dim": args.head_dim},
        "dtype": args.dtype,
        "rotate_vo": args.rotate_vo,
        "steps": args.steps,
        "variants": results,
        "fused_speedup": {name: round(result["fwd_bwd_ms"] / fused_ms, 3) for name, result in results.items()
                          if name != "fused"},
        "fused_vs_plain_max_abs_diff": (outputs["fused"].float() - outputs["plain"].float()).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        result = {"device": args.device, "skipped": "the fused kernels need CUDA (on the CPU they run only in "
                                                     "Triton's interpreter, whose speed means nothing)"}
    else:
        result = benchmark(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
