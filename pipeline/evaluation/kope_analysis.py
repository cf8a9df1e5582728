"""KoPE analysis of an exported model: per-block Gini, phase synchrony and entropy of the CLS attention,
as JSON, as per-block curves and as CLS attention maps over the patch grid (PNG).

The metrics are :mod:`pipeline.models.analysis`'s; this module runs them on a batch of evaluation images
and draws them. Plain ViTs (``kope=False``) get Gini and entropy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.fsutil import atomic_write_json
from pipeline.models.analysis import attention_metrics, metrics_to_json

METRIC_TITLES = {"gini": "Gini concentration", "synchrony": "phase synchrony", "entropy": "entropy (nats)"}


@torch.no_grad()
def cls_probes(backbone: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``forward_cls_attention`` of the backbone in eval mode, on its device, in fp32."""
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        return {name: value.float().cpu() for name, value in backbone.forward_cls_attention(images.to(device)).items()}
    finally:
        backbone.train(was_training)


def patch_grid(backbone: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    patch = backbone.patch_embed.patch_size
    return images.shape[-2] // patch[0], images.shape[-1] // patch[1]


def plot_block_curves(metrics: dict[str, Any], path: Path) -> None:
    """One panel per metric: the mean over heads per block (thick) and every head (thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [name for name in METRIC_TITLES if name in metrics]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        per_head = torch.tensor(metrics[name]["per_block_head"])
        blocks = range(1, per_head.shape[0] + 1)
        for head in range(per_head.shape[1]):
            ax.plot(blocks, per_head[:, head], color="tab:blue", alpha=0.3, linewidth=0.8)
        ax.plot(blocks, metrics[name]["per_block"], color="tab:red", linewidth=2, label="mean over heads")
        ax.set_title(METRIC_TITLES[name])
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_attention_maps(
    images: torch.Tensor,
    attention: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    mean: Sequence[float],
    std: Sequence[float],
    path: Path,
    blocks: Sequence[int] | None = None,
) -> None:
    """Rows: images; columns: the image, then the CLS attention over patches (mean over heads) of ``blocks``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = attention.shape[0]
    blocks = list(blocks) if blocks is not None else sorted({0, depth // 2, depth - 1})
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, 1 + len(blocks), figsize=(2 * (1 + len(blocks)), 2 * rows), squeeze=False)
    shown = (images.cpu().float() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1))
    shown = shown.clamp(0, 1).permute(0, 2, 3, 1)
    for row in range(rows):
        axes[row][0].imshow(shown[row])
        for col, block in enumerate(blocks, 1):
            patches = attention[block, row, :, num_prefix_tokens:].mean(dim=0).reshape(grid)
            axes[row][col].imshow(patches, cmap="inferno")
            if row == 0:
                axes[row][col].set_title(f"block {block + 1}", fontsize=9)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def analyse_to_files(
    backbone: nn.Module,
    images: torch.Tensor,
    out_dir: Path,
    mean: Sequence[float],
    std: Sequence[float],
    maps: int = 4,
) -> dict[str, Any]:
    """Write ``analysis.json``, ``analysis_blocks.png`` and ``attention_maps.png`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probes = cls_probes(backbone, images)
    metrics = metrics_to_json(attention_metrics(probes))
    atomic_write_json(out_dir / "analysis.json", {"images": int(images.shape[0]), "metrics": metrics})
    plot_block_curves(metrics, out_dir / "analysis_blocks.png")
    if maps:
        plot_attention_maps(images[:maps], probes["cls_attention"][:, :maps], patch_grid(backbone, images),
                            int(backbone.num_prefix_tokens), mean, std, out_dir / "attention_maps.png")
    return metrics
