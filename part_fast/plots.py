"""PNG figures: images with their PART budget maps, and a run's training curves.

matplotlib is imported here only, through its object API (Figure + Agg canvas), so a caller's pyplot
backend and open figures are left alone. Each picture has a `*_figure` function that draws it (what the
tests read) and a `*_png` function that writes it atomically through part_fast.files."""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import torch

from .eps_text import eps_text
from .errors import ConfigError
from .extras import require
from .files import atomic_write_bytes

# What needs matplotlib, as its MissingExtraError names it.
BUDGET_PNG = "the budget-map PNG"
CURVES_PNG = "the training-curves PNG"


def require_matplotlib(what: str) -> None:
    """A MissingExtraError naming the extra [plots] when matplotlib is not installed: the commands that draw
    call it before their work starts (the demo trains for minutes first)."""
    require("matplotlib", what)


CAM_NAMES = {"gradcam": "GradCAM", "xgradcam": "XGradCAM", "layercam": "LayerCAM"}

# The full-eps share of a pixel is the fraction of its colour channels given the full eps: a per-channel
# ("jet") map has 4 levels, a channel-shared ("cam") map 2. Legend text per level, by channel count.
SHARE_LEVELS = {
    3: ((0.0, "0: none (ε_low on all 3)"), (1 / 3, "1/3: 1 channel"), (2 / 3, "2/3: 2 channels"),
        (1.0, "1: all 3 channels")),
    1: ((0.0, "0: ε_low"), (1.0, "1: full ε")),
}
# Overlay tint of each share level above 0 (share 0 is left untinted, so the image keeps its colours).
_TINTS = {1 / 3: (1.0, 0.85, 0.0), 2 / 3: (1.0, 0.45, 0.0), 1.0: (0.85, 0.0, 0.15)}
_TINT_ALPHA = 0.45
_OBJECT_COLOUR = "lime"


def _figure(rows: int, cols: int, figsize, **gridspec):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, gridspec_kw=gridspec or None)


def _write_png(fig, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    return path


# ------------------------------------------------------------------------------------ budget maps
def budget_title(arch: str, cam: str, mask: str, eps: float, eps_low: float) -> str:
    """'PART budget, cnn-small, GradCAM, jet mask, ε = 4/255 (0.0157), ε_low = 2/255 (0.0078)'."""
    return (f"PART budget, {arch}, {CAM_NAMES.get(cam, cam)}, {mask} mask, "
            f"ε = {eps_text(eps)}, ε_low = {eps_text(eps_low)}")


def full_eps_share(eps_maps: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, C, H, W) eps map -> (B, H, W): the share of each pixel's channels that get the full eps."""
    return (eps_maps.detach().float().cpu() == torch.tensor(eps, dtype=torch.float32)).float().mean(1)


def _validate_budget_inputs(images, eps_maps, titles, object_masks) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"images must be a (B, 3, H, W) tensor, got {_shape_text(images)}")
    b, _, h, w = images.shape
    if not isinstance(eps_maps, torch.Tensor) or eps_maps.dim() != 4 or eps_maps.shape[1] not in SHARE_LEVELS \
            or (eps_maps.shape[0], *eps_maps.shape[2:]) != (b, h, w):
        raise ConfigError(f"eps_maps must be a ({b}, 1 or 3, {h}, {w}) tensor to match images, "
                          f"got {_shape_text(eps_maps)}")
    if titles is not None and len(titles) != b:
        raise ConfigError(f"titles must hold one title per image ({b}), got {len(titles)}")
    if object_masks is not None and (not isinstance(object_masks, torch.Tensor)
                                     or tuple(object_masks.shape) != (b, h, w)):
        raise ConfigError(f"object_masks must be a ({b}, {h}, {w}) tensor to match images, "
                          f"got {_shape_text(object_masks)}")


def _shape_text(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _tint(share):
    """RGBA layer for the overlay: a colour per share level, fully transparent where the share is 0."""
    import numpy as np

    rgba = np.zeros((*share.shape, 4))
    for level, colour in _TINTS.items():
        at = np.isclose(share, level)
        rgba[at, :3] = colour
        rgba[at, 3] = _TINT_ALPHA
    return rgba


def budget_overlay_figure(images: torch.Tensor, eps_maps: torch.Tensor, eps: float,
                          titles: list[str] | None = None, object_masks: torch.Tensor | None = None,
                          row_names: tuple[str, ...] | None = None, *, suptitle: str | None = None):
    """The figure budget_overlay_png writes (a matplotlib Figure, not yet saved)."""
    require_matplotlib(BUDGET_PNG)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    _validate_budget_inputs(images, eps_maps, titles, object_masks)
    images = images.detach().float().cpu().clamp(0, 1)
    share = full_eps_share(eps_maps, eps)
    levels = SHARE_LEVELS[eps_maps.shape[1]]
    n = images.shape[0]
    rows = 3 + (object_masks is not None)
    names = row_names or ("image", "full-ε share", "overlay", "object")[:rows]
    # One extra, narrower column on the right holds each row's legend.
    fig, axes = _figure(rows, n + 1, figsize=(1.6 * n + 2.3, 1.7 * rows + 0.5), width_ratios=[1] * n + [1.45])
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        s = share[i].numpy()
        axes[0, i].imshow(img, interpolation="nearest")
        axes[1, i].imshow(s, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[2, i].imshow(img, interpolation="nearest")
        axes[2, i].imshow(_tint(s), interpolation="nearest")
        if object_masks is not None:
            axes[3, i].imshow(img, interpolation="nearest")
            axes[3, i].contour(object_masks[i].float().cpu().numpy(), levels=[0.5], colors=_OBJECT_COLOUR,
                               linewidths=0.9)
        if titles:
            axes[0, i].set_title(titles[i], fontsize=7)
    for r in range(rows):
        for ax in axes[r, :n]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(names[r], fontsize=8)
        axes[r, n].axis("off")
    legend = dict(loc="center left", fontsize=6.5, title_fontsize=7, frameon=False, handlelength=1.2)
    axes[1, n].legend(handles=[Patch(facecolor=str(v), edgecolor="0.5", label=text) for v, text in levels],
                      title="share of channels\ngiven the full ε", **legend)
    tinted = [Patch(facecolor=(*_TINTS[v], _TINT_ALPHA), edgecolor="0.5", label=text)
              for v, text in levels if v > 0]
    axes[2, n].legend(handles=[Patch(facecolor="none", edgecolor="0.5", label="untinted: ε_low"), *tinted],
                      title="tint = full-ε share", **legend)
    if object_masks is not None:
        axes[3, n].legend(handles=[Line2D([], [], color=_OBJECT_COLOUR, label="the object\n(ground truth)")],
                          **legend)
    fig.suptitle(suptitle if suptitle is not None else f"PART budget, ε = {eps_text(eps)}", fontsize=9)
    fig.tight_layout()
    return fig


def budget_overlay_png(path: str | os.PathLike, images: torch.Tensor, eps_maps: torch.Tensor, eps: float,
                       titles: list[str] | None = None, object_masks: torch.Tensor | None = None,
                       row_names: tuple[str, ...] | None = None, *, suptitle: str | None = None,
                       dpi: int = 110) -> Path:
    """One column per image: the image; the share of its colour channels given the full eps (grey levels,
    white = all three, black = none, with a legend); the image at full strength, tinted only where some
    channel gets the full eps. `eps_maps` is (B, 1 or 3, H, W). With object_masks (B, H, W), a last row
    outlines the ground-truth object. suptitle: the figure's title (budget_title(...) says what the budget
    is; without it the title names eps only)."""
    fig = budget_overlay_figure(images, eps_maps, eps, titles, object_masks, row_names, suptitle=suptitle)
    return _write_png(fig, path, dpi)


# -------------------------------------------------------------------------------- training curves
STAGES = ("data", "budget", "attack", "update")
_STAGE_COLOURS = {"data": "tab:gray", "budget": "tab:purple", "attack": "tab:red", "update": "tab:blue",
                  "other": "tab:olive", "total": "tab:cyan"}
ACCURACIES = (("train_adv_acc", "train, adversarial"), ("train_nat_acc", "train, natural"),
              ("test_nat_acc", "test, natural"), ("test_pgd20_acc", "test, PGD-20"))


def _number(record: dict, key: str, position: int) -> float:
    """The record's value as a float; NaN when absent or None (a line with a gap). Anything else is an error."""
    value = record.get(key)
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"records[{position}][{key!r}] must be a number or null, got {value!r}")
    return float(value)


def _validate_records(records) -> None:
    if not isinstance(records, (list, tuple)) or not records:
        raise ConfigError("records must be a non-empty list of metrics.jsonl lines (one dict per finished epoch), "
                          f"got {records!r}"[:300])
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ConfigError(f"records[{i}] must be a dict (a metrics.jsonl line), got {type(r).__name__}")


def _epochs(records) -> list[float]:
    """Each record's epoch number; a record without one is placed after the one before it."""
    out = []
    for i, r in enumerate(records):
        e = _number(r, "epoch", i)
        out.append(e if math.isfinite(e) else (out[-1] + 1 if out else 1.0))
    return out


def part_start(records, epochs: list[float]) -> float | None:
    """The epoch the PART phase starts at, when the records show a warm-up before it (else None)."""
    for i in range(1, len(records)):
        if records[i - 1].get("phase") == "warmup" and records[i].get("phase") == "part":
            return epochs[i]
    return None


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the records", transform=ax.transAxes, ha="center", va="center",
            fontsize=8, color="0.4")


def _loss_panel(ax, records, epochs) -> None:
    loss = [_number(r, "train_loss", i) for i, r in enumerate(records)]
    ax.set_ylabel("train loss")
    if all(math.isnan(v) for v in loss):
        _no_data(ax, "train_loss")
    else:
        ax.plot(epochs, loss, marker="o", ms=3.5, color="black", label="train loss")
    lr = [_number(r, "lr", i) for i, r in enumerate(records)]
    if not all(math.isnan(v) for v in lr):
        twin = ax.twinx()
        twin.plot(epochs, lr, drawstyle="steps-mid", marker=".", ms=4, color="0.55", linestyle=":",
                  label="learning rate")
        twin.set_ylabel("learning rate", color="0.45", fontsize=8)
        twin.tick_params(labelsize=7, colors="0.45")
        twin.set_ylim(bottom=0)
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=lines, fontsize=7, loc="upper right")


def _accuracy_panel(ax, records, epochs) -> None:
    drawn = 0
    for key, label in ACCURACIES:
        values = [_number(r, key, i) for i, r in enumerate(records)]
        if all(math.isnan(v) for v in values):
            continue
        ax.plot(epochs, values, marker="o", ms=3.5, label=label)
        drawn += 1
    ax.set_ylabel("accuracy (%)")
    if drawn:
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="upper left")
    else:
        _no_data(ax, "accuracy")


def _time_panel(ax, records, epochs) -> None:
    """Stacked bars: each stage's seconds where the record has them (--time-stages), the rest of the epoch
    as 'other'; a record without stages gets one bar of its total."""
    bottoms = [0.0] * len(records)
    drawn = set()

    def bar(i, name, seconds):
        ax.bar(epochs[i], seconds, bottom=bottoms[i], width=0.7, color=_STAGE_COLOURS[name], label=name)
        drawn.add(name)
        bottoms[i] += seconds

    for i, r in enumerate(records):
        total = _number(r, "epoch_seconds", i)
        stages = {s: _number(r, f"{s}_seconds", i) for s in STAGES}
        if all(math.isnan(v) for v in stages.values()):
            if not math.isnan(total):
                bar(i, "total", total)
            continue
        for s, v in stages.items():
            if not math.isnan(v):
                bar(i, s, v)
        if not math.isnan(total) and total > bottoms[i]:
            bar(i, "other", total - bottoms[i])  # between the timed stages: logging, checkpoints, evaluation
    ax.set_ylabel("epoch time (s)")
    if drawn:
        order = [n for n in (*STAGES, "other", "total") if n in drawn]
        handles, labels = ax.get_legend_handles_labels()
        by_label = dict(zip(labels, handles))
        ax.legend([by_label[n] for n in order], order, fontsize=7, loc="upper left", ncol=3)
        ax.set_ylim(0, max(bottoms) * 1.3)
    else:
        _no_data(ax, "epoch_seconds")


def training_curves_figure(records: list[dict], title: str):
    """The figure training_curves_png writes (a matplotlib Figure, not yet saved)."""
    require_matplotlib(CURVES_PNG)
    from matplotlib.ticker import MaxNLocator

    _validate_records(records)
    epochs = _epochs(records)
    fig, axes = _figure(3, 1, figsize=(7.0, 8.0), height_ratios=[1, 1.15, 1])
    loss_ax, acc_ax, time_ax = axes[:, 0]
    _loss_panel(loss_ax, records, epochs)
    _accuracy_panel(acc_ax, records, epochs)
    _time_panel(time_ax, records, epochs)
    start = part_start(records, epochs)
    for ax in (loss_ax, acc_ax, time_ax):
        ax.set_xlim(min(epochs) - 0.6, max(epochs) + 0.6)
        if len(epochs) <= 15:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if start is not None:
            ax.axvline(start - 0.5, color="tab:green", linestyle="--", linewidth=1)
    if start is not None:
        loss_ax.text(start - 0.45, 1.0, f" warm-up → PART (epoch {start:g})", transform=loss_ax.get_xaxis_transform(),
                     va="bottom", ha="left", fontsize=7, color="tab:green")
    time_ax.set_xlabel("epoch")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def training_curves_png(records: list[dict], path: str | os.PathLike, title: str, *, dpi: int = 110) -> Path:
    """Draw a run's training curves from its metrics.jsonl lines into a PNG at `path`: the train loss (with
    the learning rate), the accuracies present (train adversarial / natural, test natural / PGD-20), and
    the epoch time split by stage when it was timed (--time-stages), else the total; a dashed line marks
    the warm-up -> PART boundary. Missing keys and None values leave gaps; one epoch is drawn as points."""
    return _write_png(training_curves_figure(records, title), path, dpi)
