"""PNG figures: images with their PART budget maps. matplotlib is imported here only, through its
object API (Figure + Agg canvas), so a caller's pyplot backend and open figures are left alone."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .files import atomic_write_bytes


def _figure(rows: int, cols: int, figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def budget_overlay_png(path: str | os.PathLike, images: torch.Tensor, eps_maps: torch.Tensor, eps: float,
                       titles: list[str] | None = None, object_masks: torch.Tensor | None = None,
                       row_names: tuple[str, ...] | None = None) -> Path:
    """One column per image: the image, the share of its colour channels given the full eps (white = all
    three, black = none), and the image with that share overlaid in red. `eps_maps` is (B, 1 or 3, H, W).
    With object_masks (B, H, W), a last row outlines the ground-truth object."""
    images = images.detach().float().cpu().clamp(0, 1)
    high = (eps_maps.detach().float().cpu() == torch.tensor(eps, dtype=torch.float32)).float().mean(1)  # (B, H, W)
    n = images.shape[0]
    rows = 3 + (object_masks is not None)
    names = row_names or ("image", "full-eps share", "overlay", "object")[:rows]
    fig, axes = _figure(rows, n, figsize=(1.6 * n, 1.7 * rows))
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        axes[0, i].imshow(img, interpolation="nearest")
        axes[1, i].imshow(high[i].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[2, i].imshow(img, interpolation="nearest")
        axes[2, i].imshow(high[i].numpy(), cmap="Reds", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
        if object_masks is not None:
            axes[3, i].imshow(img, interpolation="nearest")
            axes[3, i].contour(object_masks[i].float().cpu().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        if titles:
            axes[0, i].set_title(titles[i], fontsize=7)
    for r in range(rows):
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(names[r], fontsize=8)
    fig.tight_layout()
    path = Path(path)

    def write(f):
        fig.savefig(f, format="png", dpi=110)

    atomic_write_bytes(path, write)
    return path
