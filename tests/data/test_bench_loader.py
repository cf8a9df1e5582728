"""tools/bench_loader.py at toy size: every figure it prints, the loader's stream with float and uint8 batches
included (the figures mean nothing here; the test keeps the tool working as the loader changes)."""

from __future__ import annotations

import json

from tests.tools import load_tool


def test_bench_loader_reports_the_stream_for_float_and_uint8_batches(capsys):
    report = load_tool("bench_loader").main(["--images", "8", "--width", "48", "--height", "40", "--size", "32",
                                             "--local-crops", "1", "--seconds", "0.05", "--workers", "1",
                                             "--batch", "4"])
    assert json.loads(capsys.readouterr().out) == report
    loader = report["loader"]
    assert loader["workers"] == 1 and loader["supervised_train_images_per_s"] > 0
    assert loader["supervised_train_uint8_images_per_s"] > 0 and loader["plain_recipe_images_per_s"] > 0
    assert loader["read_syscalls_per_sample"]["indexed"] < loader["read_syscalls_per_sample"]["header_scan"]
    assert {"supervised_train_uint8", "dino_uint8"} <= set(report["per_worker_images_per_cpu_s"])
