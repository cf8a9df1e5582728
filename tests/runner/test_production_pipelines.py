"""Every shipped pipeline validates with placeholder paths (``kope config``, exit 0), the paths being the only
settings left to give; with the Slurm example profile every stage gets the ranks its batches need; the
documented size and ablation overrides are valid and switch what they say; README shows every command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.core.cli import main
from pipeline.core.cluster_profile import load_profile
from pipeline.core.config.loader import load_pipeline
from pipeline.core.config.types import SettingError
from pipeline.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PIPELINES = sorted((REPO / "configs" / "pipelines").glob("*.yaml"))
PRODUCTION = ("imagenet-supervised", "imagenet-dino", "datacomp-clip")
README = (REPO / "README.md").read_text(encoding="utf-8")
ABLATION = re.compile(r"^#\s+(ViT baseline|w/o Kuramoto|only-qk rotation|w/o phase mix)\s+(\S+=\S+)$", re.M)
SIZE = re.compile(r"^#\s+([BL]/16):((?:.*\n#\s{6,}\S.*)*.*)$", re.M)
TRAINING_KINDS = ("pretrain", "finetune")


def placeholder_paths(pipeline: Path, root: Path) -> list[str]:
    """``key=folder`` for every path the pipeline leaves to the user, found by validating it: each missing
    setting must be a path, and a fresh empty folder stands in for it."""
    overrides: list[str] = []
    while True:
        try:
            load_pipeline(pipeline, overrides)
            return overrides
        except ConfigError as error:
            assert error.detail == "missing required value (path)", f"{pipeline.name}: {error}"
            folder = root / error.key
            folder.mkdir(parents=True)
            overrides.append(f"{error.key.removeprefix('stages.')}={folder}")


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[path.stem for path in PIPELINES])
def test_every_shipped_pipeline_validates_with_placeholder_paths(pipeline, tmp_path, capsys):
    overrides = placeholder_paths(pipeline, tmp_path)
    assert main(["config", str(pipeline), *overrides]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert set(resolved["stages"]) == set(load_pipeline(pipeline, overrides).stages)
    header = "".join(line for line in pipeline.read_text().splitlines(keepends=True) if line.startswith("#"))
    for override in overrides:  # the file says which paths to give
        assert f"{override.split('=')[0]}=" in header, f"{pipeline.name} does not document {override}"
    if pipeline.stem in PRODUCTION:
        assert overrides, "a production pipeline reads the user's data"


@pytest.mark.parametrize("name", PRODUCTION)
def test_the_slurm_example_profile_gives_every_stage_what_its_settings_need(name, tmp_path):
    pipeline = REPO / "configs" / "pipelines" / f"{name}.yaml"
    config = load_pipeline(pipeline, placeholder_paths(pipeline, tmp_path))
    profile = load_profile("slurm-example")
    for stage, spec in config.stages.items():
        resources = profile.slurm_resources(stage, spec.kind.name)
        if check_world := getattr(spec.settings, "check_world", None):
            try:
                check_world(resources.nodes * resources.tasks_per_node)
            except SettingError as error:
                pytest.fail(f"{name}: stage {stage} on slurm-example: {error}")
        if spec.kind.name in (*TRAINING_KINDS, "evaluate"):
            assert resources.gpus_per_node > 0, f"{name}: stage {stage} would run without a GPU"
        assert not resources.array or spec.kind.parts, f"{name}: stage {stage} cannot run as an array"


def documented_overrides(pipeline: Path) -> dict[str, list[str]]:
    """The header's size lines (``B/16: ...`` with their indented continuations) and ablations, each as its
    overrides."""
    text = pipeline.read_text()
    found = {label: re.findall(r"\S+=\S+", body) for label, body in SIZE.findall(text)}
    found.update({label: [override] for label, override in ABLATION.findall(text)})
    return found


def builds_what_it_says(label: str, model) -> bool:
    attention = model.blocks[0].attn
    if label == "ViT baseline":
        return not model.kope and model.coupling is None and not hasattr(attention, "vo_rotation")
    if label == "w/o Kuramoto":
        return model.kope and model.coupling is None
    if label == "only-qk rotation":
        return model.coupling is not None and attention.vo_rotation is False
    if label == "w/o phase mix":
        return model.coupling is not None and attention.phase_mix is None
    return model.coupling is not None and attention.vo_rotation and attention.phase_mix is not None  # a size


@pytest.mark.parametrize("name", ["imagenet-supervised", "imagenet-dino"])
def test_documented_sizes_and_ablations_validate_and_switch_the_model(name, tmp_path):
    import timm

    import pipeline.models  # noqa: F401  (registers the KoPE models)

    pipeline = REPO / "configs" / "pipelines" / f"{name}.yaml"
    paths = placeholder_paths(pipeline, tmp_path)
    documented = documented_overrides(pipeline)
    assert {"B/16", "ViT baseline", "w/o Kuramoto", "only-qk rotation", "w/o phase mix"} <= set(documented)
    stage = f"pretrain_{name.split('-')[1]}"
    for label, overrides in documented.items():
        for override in overrides:
            assert override in README, f"README does not show {label}: {override}"
        model = load_pipeline(pipeline, paths + overrides).stages[stage].settings.model
        built = timm.create_model(model.name, **{**model.kwargs, "depth": 1})
        assert builds_what_it_says(label, built), f"{name}: {label} ({' '.join(overrides)}) builds another model"


def test_the_clip_baseline_names_an_open_clip_config(tmp_path):
    import open_clip

    pipeline = REPO / "configs" / "pipelines" / "datacomp-clip.yaml"
    override = re.search(r"^#\s+ViT baseline.*: (\S+=\S+)$", pipeline.read_text(), re.M).group(1)
    assert override in README
    model = load_pipeline(pipeline, placeholder_paths(pipeline, tmp_path) + [override]).stages["pretrain_clip"]
    assert open_clip.get_model_config(model.settings.model.name)["vision_cfg"]["patch_size"] == 16


def test_readme_shows_how_to_run_each_pipeline_and_its_imagenet_v2_file_validates(tmp_path):
    section = README.split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
    for name in PRODUCTION:
        assert f"kope run configs/pipelines/{name}.yaml" in section
    snippet = next(block for block in re.findall(r"```yaml\n(.*?)```", section, re.S) if "shard_imagenet_v2" in block)
    user_file = tmp_path / "my-imagenet-supervised.yaml"
    user_file.write_text(snippet.replace("configs/pipelines/", f"{REPO}/configs/pipelines/"))
    for folder in ("imagenet", "imagenet-v2"):
        (tmp_path / folder).mkdir()
    text = user_file.read_text().replace("/data/imagenet-v2", str(tmp_path / "imagenet-v2"))
    user_file.write_text(text.replace("/data/imagenet", str(tmp_path / "imagenet")))
    config = load_pipeline(user_file)
    assert config.stages["evaluate_supervised"].settings.extra_val == {"v2": "@shard_imagenet_v2/val"}
    assert "shard_imagenet_v2" in config.stages["evaluate_supervised"].needs
