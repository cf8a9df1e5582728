"""The fine-tuning recipe is a valid ``finetune`` stage block with the paper's hyper-parameters."""

from __future__ import annotations

import yaml

from pipeline.core.config.loader import load_pipeline
from tests.train.helpers import REPO

RECIPE = REPO / "configs" / "recipes" / "finetune.yaml"


def test_recipe_validates_and_sets_the_paper_values(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "train").mkdir()
    pipeline = tmp_path / "finetune.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "finetune", "stages": {"finetune": {
        "kind": "finetune", "include": str(RECIPE), "init": str(tmp_path / "export"), "data": str(tmp_path / "train"),
        "supervised": {"val_data": str(tmp_path / "train")}}}}))
    settings = load_pipeline(pipeline).stages["finetune"].settings
    assert (settings.optim.name, settings.optim.lr, settings.optim.layer_decay) == ("adamw", 1.2e-3, 0.9)
    aug = settings.supervised.aug
    assert aug.auto_augment.startswith("rand-m9") and not aug.three_augment
    assert (aug.mixup_alpha, aug.cutmix_alpha, aug.label_smoothing) == (0.8, 1.0, 0.1)
    assert settings.supervised.ema_decay > 0 and settings.supervised.val_data == str(tmp_path / "train")
