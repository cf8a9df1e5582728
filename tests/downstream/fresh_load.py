"""Load an export folder the way a downstream user would, in a fresh interpreter with only torch, timm, open_clip
and this package's model code, and write the model's outputs on given inputs.

    python fresh_load.py timm|timm-by-name|open_clip FOLDER INPUTS.safetensors OUTPUTS.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import pipeline.models  # noqa: F401  (the only project import: registers the KoPE models with timm)

TEXTS = ["a 3 left of a 7", "a 1 left of a 0"]
TRAINING_STACK = ("deepspeed", "webdataset", "submitit")


def main(how: str, folder: Path, inputs_path: Path, outputs_path: Path) -> None:
    images = load_file(inputs_path)["images"]
    with torch.no_grad():
        if how == "timm":
            import timm

            outputs = {"logits": timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(images)}
        elif how == "timm-by-name":
            import timm

            config = json.loads((folder / "config.json").read_text())
            args = {key: value for key, value in config["model_args"].items() if key != "num_classes"}
            overlay = {"file": str(folder / "model.safetensors"), "num_classes": config["num_classes"]}
            model = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                      num_classes=config["num_classes"], **args)
            outputs = {"logits": model.eval()(images)}
        else:
            import open_clip

            model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
            model.eval()
            outputs = {"image": model.encode_image(images), "text": model.encode_text(tokenizer(TEXTS))}
    loaded = sorted(name for name in TRAINING_STACK if name in sys.modules)
    if loaded:
        raise SystemExit(f"loading the export imported the training stack: {loaded}")
    save_file({name: tensor.contiguous() for name, tensor in outputs.items()}, outputs_path)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
