"""The engine's setup: which GPU a rank takes, TF32, ZeRO's communication buckets, the ``deepspeed:`` mapping
(refused keys at config time, DeepSpeed's own models when the engine is built), ``compile:`` and its caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.cli import main
from pipeline.core.ranks import rank_info_from_env
from pipeline.train.engine import (
    BUCKET_MAX,
    BUCKET_MIN,
    BatchPlan,
    allow_tf32_matmuls,
    bind_cuda_device,
    build_engine,
    check_deepspeed_config,
    compile_cache,
    deepspeed_config,
    init_distributed,
    resolve_compile,
)
from pipeline.train.optim import OptimSettings
from pipeline.train.settings import DEEPSPEED_KEYS, DEEPSPEED_OWNED
from tests.train.helpers import use_shared_torch_extensions

REPO = Path(__file__).resolve().parents[2]

# --- rank -> device ------------------------------------------------------------------------------------------


@pytest.fixture
def cuda_devices(monkeypatch):
    """``torch.cuda`` as a process sees it with ``count`` visible GPUs (the only part faked: no GPU here)."""
    chosen: list[int] = []

    def visible(count: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return visible


def test_one_gpu_per_task_binding_takes_the_only_visible_device(cuda_devices, monkeypatch):
    """Slurm with --gpus-per-task=1 and GPU binding: task 3 of a node sees one GPU, as cuda:0."""
    env = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu[01-02]",
           "CUDA_VISIBLE_DEVICES": "3"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    chosen = cuda_devices(1)
    local_rank = rank_info_from_env().local_rank
    assert local_rank == 3
    assert bind_cuda_device(local_rank) == 0 and chosen == [0]
    assert os.environ["LOCAL_RANK"] == "0", "DeepSpeed reads LOCAL_RANK as the device index"


def test_all_gpus_visible_gives_local_rank_i_device_i(cuda_devices, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    chosen = cuda_devices(8)
    assert bind_cuda_device(5) == 5 and chosen == [5] and os.environ["LOCAL_RANK"] == "5"
    chosen.clear()
    cuda_devices(4)  # 8 tasks on a node that shows each process 4 GPUs
    assert bind_cuda_device(6) == 2 and chosen == [2]


def test_no_visible_gpu_names_the_visibility_variable(cuda_devices, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cuda_devices(0)
    with pytest.raises(RuntimeError, match=r"local rank 1 sees no CUDA device \(CUDA_VISIBLE_DEVICES=\)"):
        bind_cuda_device(1)


def test_tf32_for_fp32_matmuls():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        allow_tf32_matmuls()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


# --- ZeRO buckets and the deepspeed: mapping -------------------------------------------------------------------


def test_zero_stages_overlap_communication_in_buckets_sized_to_the_model():
    plan = BatchPlan.derive(64, 8, 2)
    assert deepspeed_config(plan, 0, "fp32", 0.0, 86_000_000)["zero_optimization"] == {"stage": 0}
    for stage in (1, 2):
        zero = deepspeed_config(plan, stage, "bf16", 1.0, 86_000_000)["zero_optimization"]
        assert zero["overlap_comm"] and zero["contiguous_gradients"]
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 86_000_000 // 8
    zero3 = deepspeed_config(plan, 3, "bf16", 1.0, 86_000_000)["zero_optimization"]
    assert zero3["overlap_comm"] and zero3["stage3_prefetch_bucket_size"] == zero3["reduce_bucket_size"]
    assert zero3["stage3_param_persistence_threshold"] == 100_000
    assert not zero3["stage3_gather_16bit_weights_on_model_save"]
    small = deepspeed_config(plan, 2, "fp32", 1.0, 1_000)["zero_optimization"]
    huge = deepspeed_config(plan, 2, "fp32", 1.0, 10**11)["zero_optimization"]
    assert small["reduce_bucket_size"] == BUCKET_MIN and huge["reduce_bucket_size"] == BUCKET_MAX


def test_the_deepspeed_mapping_merges_into_the_generated_config():
    overrides = {"zero_optimization": {"reduce_bucket_size": 123_456, "round_robin_gradients": True},
                 "comms_logger": {"enabled": True}, "steps_per_print": 10}
    config = deepspeed_config(BatchPlan.derive(8, 8, 1), 2, "fp32", 1.0, 1_000, overrides)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                           "reduce_bucket_size": 123_456, "allgather_bucket_size": BUCKET_MIN,
                                           "round_robin_gradients": True}
    assert config["comms_logger"] == {"enabled": True} and config["steps_per_print"] == 10
    assert config["train_batch_size"] == 8


@pytest.fixture
def pipeline_with(tmp_path: Path):
    (tmp_path / "data").mkdir()

    def write(**settings) -> Path:
        block = {"kind": "pretrain", "data": str(tmp_path / "data"), "steps": 10, "global_batch_size": 8,
                 "loader": {"batch_size": 4}, **settings}
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"name": "t", "run_dir": str(tmp_path / "run"),
                                        "stages": {"pretrain": block}}, sort_keys=False))
        return path

    return write


@pytest.mark.parametrize(("mapping", "line"), [
    ({"train_batch_size": 64}, "stages.pretrain.deepspeed.train_batch_size: set by the pipeline from "
                               "global_batch_size: set that instead"),
    ({"bf16": {"enabled": True}}, "stages.pretrain.deepspeed.bf16: set by the pipeline from precision"),
    ({"optimizer": {"type": "Adam"}}, "stages.pretrain.deepspeed.optimizer: set by the pipeline from optim"),
    ({"zero_optimization": {"stage": 3}}, "stages.pretrain.deepspeed.zero_optimization.stage: set by the pipeline "
                                          "from zero_stage"),
    ({"zero_optimisation": {"overlap_comm": False}}, "stages.pretrain.deepspeed.zero_optimisation: not a DeepSpeed "
                                                     "config key (did you mean 'zero_optimization'?)"),
    ({"zero_optimization": 3}, "stages.pretrain.deepspeed.zero_optimization: expected a mapping, got 3"),
])
def test_keys_the_pipeline_owns_or_deepspeed_does_not_know_stop_the_config(pipeline_with, capsys, mapping, line):
    path = pipeline_with(deepspeed=mapping)
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kope: {path}: {line}"), err


def test_a_valid_mapping_and_compile_settings_load(pipeline_with, capsys):
    path = pipeline_with(deepspeed={"zero_optimization": {"reduce_bucket_size": 50_000_000}}, compile=True,
                         compile_cache_dir="caches/compile")
    assert main(["config", str(path)]) == 0, capsys.readouterr().err
    for choice in ("auto", False):
        assert main(["config", str(pipeline_with(compile=choice))]) == 0
    assert main(["config", str(pipeline_with(compile="yes"))]) == 2


class _Reads(dict):
    """A config mapping that remembers every top-level key DeepSpeed's parser asks for, present or not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["asked"] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def keys(self):
        outer = self

        class Keys:
            def __contains__(self, key):
                return outer.__contains__(key)

            def __iter__(self):
                return iter(dict.keys(outer))

        return Keys()


def test_the_known_keys_are_the_top_level_keys_deepspeed_reads():
    """The list the config check uses (torch-free, so it cannot ask DeepSpeed) against the installed DeepSpeed's
    config parser: every key either list names is one DeepSpeed reads, and every key it reads is in a list."""
    script = (
        "import json\n"
        "from deepspeed.runtime.config import DeepSpeedConfig\n"
        "from tests.train.test_engine_config import _Reads\n"
        "config = _Reads({'train_batch_size': 8, 'train_micro_batch_size_per_gpu': 8, "
        "'gradient_accumulation_steps': 1})\n"
        "DeepSpeedConfig(config)\n"
        "print(json.dumps(sorted(key for key in config.asked if isinstance(key, str))))\n"
    )
    # A fresh interpreter: which keys the parser asks for depends on process state (an initialised process group)
    # that earlier tests in this session may leave behind.
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    read = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert read == DEEPSPEED_KEYS | set(DEEPSPEED_OWNED), (sorted(read - DEEPSPEED_KEYS - set(DEEPSPEED_OWNED)),
                                                           sorted(DEEPSPEED_KEYS | set(DEEPSPEED_OWNED) - read))


def test_deepspeeds_models_check_inside_each_section_in_one_line():
    plan = BatchPlan.derive(8, 8, 1)
    overrides = {"zero_optimization": {"overlap_com": False}}
    with pytest.raises(ValueError) as error:
        check_deepspeed_config(deepspeed_config(plan, 2, "fp32", 1.0, 1_000, overrides), overrides)
    assert str(error.value) == "deepspeed.zero_optimization.overlap_com: Extra inputs are not permitted"
    bad_type = {"zero_optimization": {"reduce_bucket_size": "large"}}
    with pytest.raises(ValueError, match=r"^deepspeed.zero_optimization.reduce_bucket_size: Input should be"):
        check_deepspeed_config(deepspeed_config(plan, 2, "fp32", 1.0, 1_000, bad_type), bad_type)
    fine = {"zero_optimization": {"reduce_bucket_size": 2_000_000}}
    check_deepspeed_config(deepspeed_config(plan, 2, "fp32", 1.0, 1_000, fine), fine)


def test_a_real_engine_takes_the_buckets_and_the_overrides(one_rank):
    use_shared_torch_extensions()
    device = init_distributed(0, 1, 0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    engine = build_engine(module, OptimSettings(), BatchPlan.derive(4, 4, 1), 2, "fp32", device,
                          {"zero_optimization": {"reduce_bucket_size": 7_000_000}})
    assert engine.zero_overlap_comm() and engine.zero_reduce_bucket_size() == 7_000_000
    assert engine.zero_allgather_bucket_size() == BUCKET_MIN
    with pytest.raises(ValueError, match="deepspeed.zero_optimization.overlap_com"):
        build_engine(torch.nn.Linear(2, 2), OptimSettings(), BatchPlan.derive(4, 4, 1), 2, "fp32", device,
                     {"zero_optimization": {"overlap_com": True}})


# --- compile -----------------------------------------------------------------------------------------------------


def test_compile_auto_is_on_for_gpus_only():
    assert resolve_compile("auto", torch.device("cuda", 0)) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile(True, torch.device("cpu")) and not resolve_compile(False, torch.device("cuda"))


def test_compile_cache_points_inductor_and_triton_at_the_folder_then_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with compile_cache(tmp_path / "cache") as folder:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
        assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        assert cache_dir() == str(tmp_path / "cache" / "inductor"), "inductor reads it when it compiles"
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
