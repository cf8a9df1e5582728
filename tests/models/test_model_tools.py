"""The model tools: the training-step benchmark and the attention plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401
from tests.tools import load_tool


def test_bench_prints_one_line_per_model_with_ratios(capsys):
    bench = load_tool("bench_model")
    bench.main(["--device", "cpu", "--size", "tiny", "--batch", "2", "--img-size", "32", "--steps", "1",
                "--warmup", "1", "--no-compile"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["model"] for line in lines] == ["vit_tiny_patch16_224", "vit_kope_tiny_patch16_224"]
    vit, kope = lines
    for line in lines:
        assert line["img_per_s"] > 0 and line["tflop_per_s"] > 0 and line["saved_activations_mb"] > 0
        assert line["peak_mem_gb"] is None and line["compile"] is False
    assert abs(kope["vs_vit"]["img_per_s"] - kope["img_per_s"] / vit["img_per_s"]) < 1e-2
    # KoPE adds the coupling projections and attention and the mixes: more work, well under 1.5x
    assert 1.0 < kope["gflop_per_img"] / vit["gflop_per_img"] < 1.5
    assert kope["params_m"] > vit["params_m"]


def test_bench_compares_the_exact_rotation_backward_with_the_output_saving_one(capsys):
    bench = load_tool("bench_model")
    exact = bench.ph._PairRotation
    bench.main(["--device", "cpu", "--size", "tiny", "--batch", "2", "--img-size", "32", "--steps", "1",
                "--warmup", "1", "--models", "kope,kope_output_saving"])
    saving, kope = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert bench.ph._PairRotation is exact  # the swap is undone
    assert (saving["rotation_backward"], kope["rotation_backward"]) == ("output_saving", "exact")
    # the exact backward keeps the q/k/v projection output as well: more saved bytes, the same FLOPs
    assert kope["saved_activations_mb"] > saving["saved_activations_mb"]
    assert kope["gflop_per_img"] == saving["gflop_per_img"]
    ratio = kope["vs_output_saving"]["saved_activations"]
    assert abs(ratio - kope["saved_activations_mb"] / saving["saved_activations_mb"]) < 1e-3


def test_bench_model_runs_the_fused_and_eager_variants_beside_the_vit(capsys):
    """The fused variant runs its kernels in Triton's interpreter here (see tests/conftest.py)."""
    load_tool("bench_model").main(["--device", "cpu", "--size", "tiny", "--batch", "1", "--img-size", "32",
                                   "--steps", "1", "--warmup", "1", "--models", "vit,kope,kope_fused,kope_eager",
                                   "--kope-args", '{"depth": 1}'])
    lines = {line["variant"]: line for line in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert list(lines) == ["vit", "kope", "kope_fused", "kope_eager"]
    assert [lines[v]["fused_attention"] for v in ("kope", "kope_fused", "kope_eager")] == [False, True, False]
    assert all(line["img_per_s"] > 0 and line["mfu"] is None for line in lines.values())
    assert all("vs_vit" in lines[v] for v in ("kope", "kope_fused", "kope_eager"))
    assert lines["kope_fused"]["gflop_per_img"] == lines["kope"]["gflop_per_img"], "the same model FLOPs"


def test_bench_names_an_unknown_model(capsys):
    bench = load_tool("bench_model")
    with pytest.raises(SystemExit):
        bench.main(["--models", "vit,kope_fast"])
    assert "unknown kope_fast" in capsys.readouterr().err


def test_bench_counts_attention_flops_on_the_cpu():
    bench = load_tool("bench_model")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    flops = bench._flops_per_step(model, images, labels)
    batch, n, c, depth = 2, 5, 192, 12
    attention_forward = batch * depth * 2 * (2 * n * n * c)  # q·kᵀ and p·v, 2 FLOPs per multiply-add
    linear_forward = batch * depth * 2 * n * 12 * c * c  # qkv (3C²), proj (C²), MLP (8C²)
    assert flops > 3 * (linear_forward + attention_forward)  # backward adds about twice the forward
    counter = FlopCounterMode(display=False)  # the same step without the CPU attention formulas
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    # attention backward recomputes q·kᵀ and runs four more products: 2.5x its forward
    assert flops - counter.get_total_flops() == attention_forward * 7 // 2


def test_plot_attention_writes_maps_curves_and_metrics(tmp_path):
    plot = load_tool("plot_attention")
    torch.manual_seed(0)
    model = timm.create_model("vit_kope_tiny_patch16_224", num_classes=3, img_size=64)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    paths = []
    for i in range(2):
        pixels = (np.random.default_rng(i).random((40, 56, 3)) * 255).astype(np.uint8)
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    written = plot.main(["--model", "vit_kope_tiny_patch16_224", "--checkpoint", str(tmp_path / "weights.pth"),
                         "--img-size", "64", "--images", *map(str, paths), "--out", str(tmp_path / "plots")])
    assert set(written) == {"attention_maps", "synchrony", "metrics"}
    maps = Image.open(written["attention_maps"])
    assert maps.width > 3 * maps.height  # 2 rows, 13 columns
    assert Image.open(written["synchrony"]).size[0] > 100
    metrics = json.loads(written["metrics"].read_text())
    assert len(metrics["synchrony"]["per_block"]) == 12 and len(metrics["gini"]["per_block_head"][0]) == 3
    assert not list((tmp_path / "plots").glob(".*partial"))


def test_plot_attention_names_an_unreadable_image(tmp_path):
    plot = load_tool("plot_attention")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    try:
        plot.main(["--model", "vit_kope_tiny_patch16_224", "--img-size", "32", "--images", str(bad),
                   "--out", str(tmp_path / "out")])
    except SystemExit as error:
        assert str(bad) in str(error) and "cannot read image" in str(error)
    else:
        raise AssertionError("an unreadable image must stop the tool")
