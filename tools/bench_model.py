"""Training-step benchmark of KoPE ViTs against timm's ViT of the same size, measured in one process.

Prints one JSON line per variant: training images/s (bf16 autocast, AdamW fused on CUDA, torch.compile when
enabled, after warm-up), TFLOP/s from torch's FLOP counter and the MFU against the GPU's bf16 peak (from the peak
table of ``pipeline.train.metrics``; none for a GPU not in it), peak GPU memory and the bytes autograd saves for
backward (an eager-mode activation figure that also works on the CPU). Every KoPE line carries its ratios to the
ViT line (``vs_vit``).

Variants (``--models``): ``vit`` (timm's ``vit_*_patch16_224``, the reference), ``kope`` (KoPE with the plain
attention path), ``kope_fused`` (KoPE with the fused Triton attention kernel: CUDA only), ``kope_eager`` (KoPE,
plain path, never compiled: what an uncompiled stage runs) and ``kope_output_saving`` (the rotation backward KoPE
had before it was made exact, which saved the rotated output and recovered the input by the inverse rotation,
right only for unit phasors; the ``kope`` line then carries its ratios to it too). ``--compile`` applies to every
variant but ``kope_eager``.

    python tools/bench_model.py --threads 1           # CPU defaults: tiny models, 64 px, a few steps
    python tools/bench_model.py --device cuda --size base --batch 256 --img-size 224 --steps 50
    python tools/bench_model.py --kope-args '{"vo_rotation": false}'   # an ablation
    python tools/bench_model.py --threads 1 --models vit,kope_output_saving,kope   # exact vs output-saving
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import pipeline.models  # noqa: F401  (registers the KoPE models)
from pipeline.models import phase as ph
from pipeline.train.metrics import peak_flops

CPU_DEFAULTS = dict(size="tiny", batch=8, img_size=64, steps=4, warmup=2)
CUDA_DEFAULTS = dict(size="base", batch=256, img_size=224, steps=30, warmup=10)


def _cpu_sdpa_flops(query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {
    # torch's counter knows the CUDA attention kernels only; the CPU ones cost the same
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


class OutputSavingRotation(ph._PairRotation):
    """The pre-exact rotation backward, for comparison only: saves the output, recovers ``x = y·e^{∓iψ}``."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, rot, ctx.conj = inputs
        ctx.save_for_backward(output, rot)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        y, rot = ctx.saved_tensors
        recovered = ph.rotate_pairs(y.detach(), rot.detach(), conj=not ctx.conj)
        return (*ph.pair_rotation_grads(grad, recovered, rot, ctx.conj, ctx.needs_input_grad[:2]), None)


@contextlib.contextmanager
def rotation_backward(kind: str) -> Iterator[None]:
    """Run with the exact rotation backward (``exact``) or the output-saving one it replaced."""
    if kind == "exact":
        yield
        return
    exact, ph._PairRotation = ph._PairRotation, OutputSavingRotation
    try:
        yield
    finally:
        ph._PairRotation = exact


VARIANTS = {"vit": "exact", "kope": "exact", "kope_fused": "exact", "kope_eager": "exact",
            "kope_output_saving": "output_saving"}
"""Each variant's rotation backward (the order is the order they run and print: references first)."""
ORDER = ("vit", "kope_output_saving", "kope", "kope_fused", "kope_eager")
ATTENTION = {"kope": False, "kope_fused": True, "kope_eager": False, "kope_output_saving": False}
"""Each KoPE variant's ``fused_attention``."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("tiny", "small", "base", "large"), help="ViT size (cpu: tiny, cuda: base)")
    parser.add_argument("--batch", type=int, help="images per step (cpu: 8, cuda: 256)")
    parser.add_argument("--img-size", type=int, help="input resolution (cpu: 64, cuda: 224)")
    parser.add_argument("--steps", type=int, help="timed steps (cpu: 4, cuda: 30)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, compilation included (cpu: 2, cuda: 10)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the models (default: on with CUDA, off on the CPU)")
    parser.add_argument("--kope-args", type=json.loads, default={}, help="JSON of extra KoPE constructor options")
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(VARIANTS)} (cpu: vit,kope; cuda: "
                                         "vit,kope,kope_fused,kope_eager)")
    parser.add_argument("--threads", type=int, help="CPU threads (on a shared machine 1 gives stable figures)")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = "vit,kope,kope_fused,kope_eager" if args.device.startswith("cuda") else "vit,kope"
    unknown = set(args.models.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    defaults = CUDA_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: torch.nn.Module, optimiser: torch.optim.Optimizer, device: torch.device) -> Callable:
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return step


def _flops_per_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Forward + backward FLOPs of one eager step (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter, torch.autocast(images.device.type, dtype=torch.bfloat16):
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one eager step: activations only, without
    parameters or their bf16 autocast copies (same for both models, they would hide the activation ratio)."""
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() > 1}
    weight_shapes |= {shape[::-1] for shape in weight_shapes}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.nn.Parameter) or tuple(tensor.shape) in weight_shapes:
            return tensor
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def measure(name: str, args: argparse.Namespace, extra: dict[str, Any], compile_model: bool) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=args.img_size, num_classes=1000, **extra).to(device).train()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    flops = _flops_per_step(model, images, labels)
    saved = _saved_activation_bytes(model, images, labels)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    runner = torch.compile(model) if compile_model else model
    step = _train_step(runner, optimiser, device)
    for _ in range(args.warmup):
        step(images, labels)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    _sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "img_size": args.img_size,
        "compile": compile_model,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "img_per_s": round(args.batch / seconds, 2),
        "step_ms": round(seconds * 1e3, 2),
        "gflop_per_img": round(flops / args.batch / 1e9, 3),
        "tflop_per_s": round(flops / seconds / 1e12, 4),
        "mfu": round(flops / seconds / peak, 4) if (peak := peak_flops(device)) else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "saved_activations_mb": round(saved / 2**20, 2),
    }
    del runner, model, optimiser
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def ratios(line: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    out = {"img_per_s": line["img_per_s"] / reference["img_per_s"],
           "saved_activations": line["saved_activations_mb"] / reference["saved_activations_mb"]}
    if line["peak_mem_gb"] is not None:
        out["peak_mem"] = line["peak_mem_gb"] / reference["peak_mem_gb"]
    return {key: round(value, 3) for key, value in out.items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.models.split(",")
    results: dict[str, dict[str, Any]] = {}
    for variant in (v for v in ORDER if v in wanted):
        name = f"vit_{args.size}_patch16_224" if variant == "vit" else f"vit_kope_{args.size}_patch16_224"
        extra = {} if variant == "vit" else {**args.kope_args, "fused_attention": ATTENTION[variant]}
        with rotation_backward(VARIANTS[variant]):
            line = {"variant": variant, **measure(name, args, extra, args.compile and variant != "kope_eager")}
        if variant != "vit":
            line["rotation_backward"] = VARIANTS[variant]
            line["fused_attention"] = ATTENTION[variant]
            if args.kope_args:
                line["kope_args"] = args.kope_args
            if "vit" in results:
                line["vs_vit"] = ratios(line, results["vit"])
            if variant == "kope" and "kope_output_saving" in results:
                line["vs_output_saving"] = ratios(line, results["kope_output_saving"])
        results[variant] = line
        print(json.dumps(line), flush=True)
    return list(results.values())


if __name__ == "__main__":
    main()
