"""Exports of real DeepSpeed checkpoints reload with timm's and open_clip's own calls in fresh processes and
reproduce the training model; the DINO export is the teacher; the fine-tune starts from the export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from pipeline.export.checksums import verify_checksums
from pipeline.export.exporter import load_trained_model
from pipeline.export.recipe import ModelRecipe
from tests.downstream.fresh_load import TEXTS
from tests.train.helpers import checkpoint_weights, train_env

pytestmark = pytest.mark.slow
FRESH_LOAD = Path(__file__).with_name("fresh_load.py")
TOLERANCE = 1e-5


def fresh_outputs(how: str, folder: Path, images: torch.Tensor, tmp_path: Path) -> dict[str, torch.Tensor]:
    inputs, outputs = tmp_path / f"{how}-in.safetensors", tmp_path / f"{how}-out.safetensors"
    save_file({"images": images.contiguous()}, inputs)
    result = subprocess.run([sys.executable, str(FRESH_LOAD), how, str(folder), str(inputs), str(outputs)],
                            env=train_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(outputs)


def training_model(run_dir: Path, stage: str) -> torch.nn.Module:
    """The model the training stage itself exported from its live engine (``model.safetensors``)."""
    spec = json.loads((run_dir / stage / "model.json").read_text())
    weights = load_file(run_dir / stage / "model.safetensors")
    if spec["library"] == "timm":
        model = timm.create_model(spec["name"], **spec["kwargs"])
    else:
        from pipeline.models.clip import register_open_clip_configs

        register_open_clip_configs()
        model = open_clip.create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(weights)
    return model.eval()


def images_for(size: int) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("how", ["timm", "timm-by-name"])
def test_supervised_zero1_export_reloads_in_a_fresh_process(downstream_run, tmp_path, how):
    checkpoint = downstream_run / "pretrain_sup" / "checkpoints"
    assert len(list((checkpoint / (checkpoint / "latest").read_text().strip()).glob("zero_pp_rank_*optim*"))) == 2
    images = images_for(64)
    with torch.no_grad():
        expected = training_model(downstream_run, "pretrain_sup")(images)
    actual = fresh_outputs(how, downstream_run / "export_sup", images, tmp_path)["logits"]
    assert actual.shape == (3, 90)
    assert max_diff(expected, actual) <= TOLERANCE


def test_clip_zero3_export_reloads_with_open_clip_and_timm_in_fresh_processes(downstream_run, tmp_path):
    checkpoint = downstream_run / "pretrain_clip" / "checkpoints"
    tag = (checkpoint / "latest").read_text().strip()
    assert list((checkpoint / tag).glob("zero_pp_rank_*_model_states.pt"))  # ZeRO-3 partitioned files
    model = training_model(downstream_run, "pretrain_clip")
    images = images_for(64)
    with torch.no_grad():
        expected_image = model.encode_image(images)
        expected_text = model.encode_text(open_clip.get_tokenizer("ViT-KoPE-Ti-16-64")(TEXTS))
        expected_tower = model.visual.trunk(images)
    clip = fresh_outputs("open_clip", downstream_run / "export_clip", images, tmp_path)
    assert max_diff(expected_image, clip["image"]) <= TOLERANCE
    assert max_diff(expected_text, clip["text"]) <= TOLERANCE
    tower = fresh_outputs("timm", downstream_run / "export_clip", images, tmp_path)["logits"]
    assert max_diff(expected_tower, tower) <= TOLERANCE


def test_every_export_has_a_card_and_checksums_that_match(downstream_run):
    for stage, files in (("export_sup", {"config.json", "model.safetensors"}),
                         ("export_dino", {"config.json", "model.safetensors"}),
                         ("export_clip", {"config.json", "model.safetensors", "open_clip_config.json",
                                          "open_clip_model.safetensors"}),
                         ("finetune/export", {"config.json", "model.safetensors"})):
        folder = downstream_run / stage
        verify_checksums(folder)
        listed = {line.split("  ", 1)[1] for line in (folder / "SHA256SUMS").read_text().splitlines()}
        assert listed == files | {"README.md"}
        card = (folder / "README.md").read_text()
        assert "## KoPE settings" in card and "manifest sha256" in card and "samples seen" in card
    assert "open_clip.create_model_and_transforms" in (downstream_run / "export_clip" / "README.md").read_text()


def test_dino_export_is_the_teacher_and_trained_picks_the_student(downstream_run):
    exported = load_file(downstream_run / "export_dino" / "model.safetensors")
    teacher = load_file(downstream_run / "pretrain_dino" / "model.safetensors")
    assert sorted(exported) == sorted(teacher)
    assert all(torch.equal(exported[name], teacher[name]) for name in teacher)
    student = {name.removeprefix("backbone."): tensor for name, tensor in
               checkpoint_weights(downstream_run, "pretrain_dino").items() if name.startswith("backbone.")}
    assert any(not torch.equal(exported[name], student[name].reshape(exported[name].shape)) for name in exported)
    recipe = ModelRecipe.load(downstream_run / "pretrain_dino")
    trained = load_trained_model(downstream_run / "pretrain_dino" / "checkpoints", recipe, weights="trained")
    assert trained.weights == "trained"
    state = trained.model.state_dict()
    assert all(torch.equal(state[name], student[name].reshape(state[name].shape)) for name in state)


def test_finetune_starts_from_the_export_and_exports_a_classifier(downstream_run):
    init = load_file(downstream_run / "export_dino" / "model.safetensors")
    tuned = load_file(downstream_run / "finetune" / "export" / "model.safetensors")
    assert set(tuned) == set(init) | {"head.weight", "head.bias"}
    assert max(max_diff(init[name], tuned[name]) for name in init) <= 1e-6  # lr 1e-12: the backbone stayed put
    config = json.loads((downstream_run / "finetune" / "export" / "config.json").read_text())
    assert config["num_classes"] == 90 and len(config["label_names"]) == 90
    assert config["architecture"] == "vit_kope_tiny_patch16_224_reg4"
    for folder in ("export_dino", "finetune/export"):  # evaluation must preprocess at the trained size
        pretrained_cfg = json.loads((downstream_run / folder / "config.json").read_text())["pretrained_cfg"]
        assert pretrained_cfg["input_size"] == [3, 32, 32], folder
    outputs = json.loads((downstream_run / "state" / "finetune.json").read_text())["outputs"]
    assert outputs["export"] == "finetune/export" and outputs["export_weights"] == "ema"


def test_the_clip_vision_tower_is_a_finetuning_init(downstream_run):
    from stages.finetune import backbone

    model, norm = backbone(downstream_run / "export_clip", {})
    config = json.loads((downstream_run / "export_clip" / "config.json").read_text())
    assert model.name == config["architecture"] and model.init == downstream_run / "export_clip"
    assert norm["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)  # the tower's own normalisation
    built = model.create(num_classes=90, img_size=64)
    tower = load_file(downstream_run / "export_clip" / "model.safetensors")
    state = built.state_dict()
    assert set(state) == set(tower) | {"head.weight", "head.bias"}
    assert all(torch.equal(state[key], tower[key]) for key in tower)
    spec = model.spec(num_classes=90, img_size=64)  # rebuilt without the export folder
    assert set(timm.create_model(spec["name"], **spec["kwargs"]).state_dict()) == set(state)
