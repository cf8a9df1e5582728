"""Import a checkpoint the KoPE authors released into our export folder format.

    python tools/import_checkpoint.py --format supervised supervised_vitkope_base_patch16_in1k_300e.pth OUT_DIR
    python tools/import_checkpoint.py --format simdino teacher_checkpoint.pth OUT_DIR --source-config config.yaml
    python tools/import_checkpoint.py --format open_clip epoch_32.pt OUT_DIR --source-config ViT-KoPE-B-16.json

``supervised``: their release ``{"backbone", "head", "meta"}`` (``.pth``, or the ``.safetensors`` mirror their
converter writes), the EMA weights when it holds both (``--weights``). ``simdino``: a SimDINOv2 teacher
checkpoint; the backbone is exported. ``open_clip``: an open_clip checkpoint of their KoPE CLIP, exported as
our ``ViT-KoPE-B-16`` (``--open-clip-model`` for a smaller config).

``--source-config`` is the authors' training config when the checkpoint does not carry its settings: the SimDINO
``config.yaml`` (its ``student`` section) or the open_clip model config JSON (its ``vision_cfg``). Settings our
models cannot represent fail with one line, as does any key the map (``pipeline.models.authors_layout``) does not
place or whose shape does not fit.

The folder is what our export stage writes (``pipeline.export``): ``config.json`` + ``model.safetensors`` for
timm, ``open_clip_config.json`` + ``open_clip_model.safetensors`` as well for CLIP, each reloaded through its
library and compared with the converted model, a model card and ``SHA256SUMS``. It is written under a
temporary name and renamed when complete. Prints one JSON line describing the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

import pipeline.models  # noqa: F401  (registers the KoPE models and towers)
from pipeline.checkpoint.consolidate import ConsolidatedCheckpoint
from pipeline.checkpoint.files import load_checkpoint_file
from pipeline.core.errors import KopeError
from pipeline.core.fsutil import atomic_write_text, sha256_file
from pipeline.export.checksums import write_checksums
from pipeline.export.exporter import TrainedModel, load_into, write_export
from pipeline.export.model_card import CardFacts, kope_settings, load_snippets, render_card
from pipeline.export.package import CARD_FILE
from pipeline.export.recipe import ModelRecipe
from pipeline.export.timm_format import CONFIG_FILE, WEIGHTS_FILE
from pipeline.models import authors_layout as layout

MODES = {"supervised": "supervised", "simdino": "dino", "open_clip": "clip"}
DINO_EVAL = {"crop_pct": 0.875}
"""SimDINO's k-NN and linear evaluation: resize 256, centre crop 224, bicubic."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=layout.FORMATS, help="the authors' checkpoint layout")
    parser.add_argument("source", type=Path, help="the authors' checkpoint file")
    parser.add_argument("out_dir", type=Path, help="export folder to create (must not exist or be empty)")
    parser.add_argument("--source-config", type=Path, help="their training config (SimDINO YAML, open_clip JSON)")
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                        help="supervised releases with both: the EMA (auto, ema) or the trained weights (model)")
    parser.add_argument("--open-clip-model", default="ViT-KoPE-B-16", help="our open_clip config to export as")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max output difference of the reloaded export")
    return parser.parse_args(argv)


def read_source(path: Path) -> Any:
    """A torch file (restricted ``weights_only`` load) or the ``.safetensors`` mirror of a supervised release."""
    if path.suffix != ".safetensors":
        return load_checkpoint_file(path)
    from safetensors import safe_open

    if not path.is_file():
        raise KopeError(f"{path}: checkpoint file is missing")
    release: dict[str, Any] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                group, _, name = key.partition(".")
                release.setdefault(group, {})[name] = handle.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise KopeError(f"{path}: unreadable safetensors file ({exc})") from None
    release["meta"] = {key: json.loads(value) for key, value in metadata.items() if key != "format"}
    return release


def read_settings(path: Path | None, fmt: str) -> dict[str, Any]:
    """The part of their training config that describes the model."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads their JSON configs too
    except (OSError, yaml.YAMLError) as exc:
        raise KopeError(f"{path}: unreadable config ({exc})") from None
    section = "vision_cfg" if fmt == "open_clip" else "student"
    if not isinstance(data, dict) or not isinstance(data.get(section), dict):
        raise KopeError(f"{path}: no '{section}' mapping (expected the authors' {fmt} config)")
    return dict(data[section])


def imagenet_labels(num_classes: int) -> dict[str, Any]:
    """ImageNet-1K class names for a 1000-way head (timm ships them), else none."""
    if num_classes != 1000:
        return {}
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = info.label_names()
    return {"label_names": names, "label_descriptions": {n: info.index_to_description(i) for i, n in enumerate(names)}}


def card(trained: TrainedModel, recipe: ModelRecipe, folder: Path, args: argparse.Namespace, settings: dict,
         files: dict[str, str], folded: bool) -> CardFacts:
    folder_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    timm_code, clip_code = load_snippets(folder_config, recipe.library == "open_clip")
    source = {"imported from": f"`{args.source.name}`", "source sha256": f"`{sha256_file(args.source)}`",
              "layout": f"the KoPE authors' {args.format} checkpoint", "CLS position row folded": folded}
    source.update({key: settings[key] for key in ("source_epoch", "source_model_field") if key in settings})
    metrics = {}
    if isinstance(settings.get("source_best_acc1"), int | float):
        metrics["authors' best top-1 (their evaluation)"] = settings["source_best_acc1"]
    return CardFacts(
        title=f"{folder_config['architecture']} (the authors' {args.format} checkpoint)",
        mode=recipe.mode,
        architecture=folder_config["architecture"],
        model_args=folder_config.get("model_args", {}),
        parameters=sum(p.numel() for p in trained.timm_model.parameters()),
        kope=kope_settings(trained.timm_model),
        weights=trained.weights,
        checkpoint=source,
        data={"dataset": "the authors' (not recorded in the checkpoint)"},
        files=files,
        load_timm=timm_code,
        load_open_clip=clip_code,
        metrics=metrics,
        config=settings,
    )


def convert(args: argparse.Namespace) -> dict[str, Any]:
    source = str(args.source)
    obj = read_source(args.source)
    theirs, settings, weights = layout.read_release(args.format, obj, args.weights, source)
    settings = settings | read_settings(args.source_config, args.format)
    target = layout.model_for(args.format, theirs, settings, source, args.open_clip_model)
    ours, dropped = layout.from_authors(args.format, theirs, target, source)
    model = target.build().eval()
    load_into(model, ours, source)
    timm_model = model.visual.trunk if target.library == "open_clip" else model
    recipe = ModelRecipe(MODES[args.format], target.library, target.name, dict(target.kwargs))
    # write_export takes a training checkpoint's description; an imported file is a checkpoint of one rank
    checkpoint = ConsolidatedCheckpoint(args.source.parent, args.source.name, zero_stage=0, world_size=1,
                                        global_steps=int(settings.get("source_epoch", 0) or 0), state_dict={})
    trained = TrainedModel(model, timm_model, {"teacher": "teacher", "ema": "ema"}.get(weights, "trained"), checkpoint)
    labels = imagenet_labels(int(target.kwargs.get("num_classes", 0))) if args.format == "supervised" else {}
    folder = args.out_dir
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise KopeError(f"{folder}: exists and is not empty; give a new export folder")
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        result = write_export(trained, recipe, partial, data_config=DINO_EVAL if args.format == "simdino" else None,
                              tolerance=args.tolerance, **labels)
        files = write_checksums(partial, result.files)
        folded = target.registers > 0
        atomic_write_text(partial / CARD_FILE, render_card(card(trained, recipe, partial, args, settings, files,
                                                                folded)))
        write_checksums(partial, [*result.files, partial / CARD_FILE])
        if folder.exists():
            folder.rmdir()
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"export": str(folder), "format": args.format, "library": target.library, "name": target.name,
            "model_args": target.kwargs, "weights": trained.weights, "cls_position_row_folded": folded,
            "dropped": dropped, "sha256": files[WEIGHTS_FILE], "max_abs_diff": result.max_abs_diff}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        with torch.no_grad():
            summary = convert(args)
    except (KopeError, layout.LayoutError) as error:
        print(f"import_checkpoint: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
