"""tools/bench_train.py at toy size on the CPU: the trainer's own step against a plain loop, then save and resume
(its figures mean nothing here; the test keeps the tool working as the loop it measures changes)."""

from __future__ import annotations

import json

import pytest

from tests.tools import load_tool
from tests.train.helpers import use_shared_torch_extensions


@pytest.mark.slow
def test_bench_train_times_the_trainer_against_a_plain_loop(capsys, tmp_path, one_rank):
    use_shared_torch_extensions()
    result = load_tool("bench_train").main([
        "--model", "vit_kope_tiny_patch16_224", "--batch", "2", "--img", "32", "--classes", "4", "--steps", "1",
        "--warmup", "1", "--rounds", "2", "--pool", "1", "--zero", "2", "--precision", "fp32", "--compile", "false",
        "--ema-decay", "0.9", "--checkpoint-dir", str(tmp_path / "checkpoints")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["plain_img_per_s"] > 0 and result["engine_img_per_s"] > 0 and result["rounds"] == 2
    assert result["engine_vs_plain"] == pytest.approx(result["engine_img_per_s"] / result["plain_img_per_s"])
    assert result["checkpoint_bytes"] > 0 and result["resume_to_first_step_s"] > 0
    assert "mfu_engine" not in result, "no MFU without a known peak"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
