"""Render CLS attention maps per block and per-block phase synchrony curves for a model and a few images.

    python tools/plot_attention.py --model vit_kope_small_patch16_224 --checkpoint model.safetensors \\
        --images cat.jpg dog.png --out plots/

Without ``--checkpoint`` the model keeps its random initialisation (useful to see the 2-D RoPE start).
Writes ``attention_maps.png`` (rows: images; columns: the image, then each block's head-averaged CLS
attention over the patches), ``synchrony.png`` (per-block attention-weighted phase synchrony, one thin line
per head and the head mean; KoPE models only) and ``metrics.json`` (Gini, entropy, synchrony).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.models import load_state_dict  # noqa: E402

import pipeline.models  # noqa: E402,F401
from pipeline.models.analysis import attention_metrics, metrics_to_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered timm name, e.g. vit_kope_base_patch16_224")
    parser.add_argument("--checkpoint", type=Path, help="timm-loadable weights (.pth, .pt or .safetensors)")
    parser.add_argument("--images", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=Path("attention_plots"))
    parser.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    return parser.parse_args(argv)


def load_model(name: str, checkpoint: Path | None, img_size: int | None) -> torch.nn.Module:
    """The model with the checkpoint's weights; its classifier size is read from the checkpoint."""
    kwargs = {"img_size": img_size} if img_size else {}
    if checkpoint is None:
        return timm.create_model(name, **kwargs).eval()
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint}: no such checkpoint file")
    state = load_state_dict(str(checkpoint))
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise SystemExit(f"{checkpoint}: does not fit {name}: {str(error).splitlines()[0]}") from None
    return model.eval()


def load_images(model: torch.nn.Module, paths: list[Path]) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Normalised model inputs and the matching resized RGB pictures to draw under the maps."""
    config = resolve_data_config({"input_size": (3, *model.patch_embed.img_size)}, model=model)
    transform = create_transform(**config)
    size = config["input_size"][-2:]
    inputs, pictures = [], []
    for path in paths:
        try:
            image = Image.open(path).convert("RGB")
        except OSError as error:
            raise SystemExit(f"{path}: cannot read image ({error})") from None
        inputs.append(transform(image))
        pictures.append(np.asarray(image.resize(size[::-1], Image.BICUBIC)))
    return torch.stack(inputs), pictures


def _save(figure: plt.Figure, path: Path) -> None:
    """Write to a temporary name, then rename: a killed run never leaves a half-written picture."""
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, dpi=110, bbox_inches="tight", format=path.suffix.lstrip("."))
    plt.close(figure)
    os.replace(partial, path)


def plot_attention_maps(cls_attention: torch.Tensor, pictures: list[np.ndarray], grid: tuple[int, int],
                        num_prefix: int, path: Path) -> None:
    blocks = cls_attention.shape[0]
    maps = cls_attention[..., num_prefix:].mean(dim=2)  # (L, B, P): head mean over the patches
    figure, axes = plt.subplots(len(pictures), blocks + 1, figsize=(1.6 * (blocks + 1), 1.7 * len(pictures)),
                                squeeze=False)
    for row, picture in enumerate(pictures):
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title("image" if row == 0 else "", fontsize=8)
        height, width = picture.shape[:2]
        for block in range(blocks):
            ax = axes[row, block + 1]
            ax.imshow(picture, alpha=0.45)
            ax.imshow(maps[block, row].reshape(grid).cpu().numpy(), cmap="inferno", alpha=0.7,
                      extent=(0, width, height, 0), interpolation="nearest")
            if row == 0:
                ax.set_title(f"block {block}", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    _save(figure, path)


def plot_synchrony(synchrony: torch.Tensor, path: Path) -> None:
    per_block_head = synchrony.mean(dim=1).cpu().numpy()  # (L, H): batch mean
    blocks = np.arange(per_block_head.shape[0])
    figure, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(blocks, per_block_head, color="tab:blue", alpha=0.3, linewidth=0.8)
    ax.plot(blocks, per_block_head.mean(axis=1), color="tab:blue", linewidth=2.2, marker="o", label="head mean")
    ax.set_xlabel("block")
    ax.set_ylabel("attention-weighted phase synchrony")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    _save(figure, path)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    model = load_model(args.model, args.checkpoint, args.img_size)
    inputs, pictures = load_images(model, args.images)
    probes = model.forward_cls_attention(inputs)
    metrics = attention_metrics(probes)
    args.out.mkdir(parents=True, exist_ok=True)
    written = {"attention_maps": args.out / "attention_maps.png", "metrics": args.out / "metrics.json"}
    plot_attention_maps(probes["cls_attention"], pictures, tuple(model.patch_embed.grid_size),
                        model.num_prefix_tokens, written["attention_maps"])
    if "synchrony" in metrics:
        written["synchrony"] = args.out / "synchrony.png"
        plot_synchrony(metrics["synchrony"], written["synchrony"])
    partial = written["metrics"].with_name(".metrics.json.partial")
    partial.write_text(json.dumps({"model": args.model, **metrics_to_json(metrics)}, indent=1))
    os.replace(partial, written["metrics"])
    for path in written.values():
        print(path)
    return written


if __name__ == "__main__":
    main()
