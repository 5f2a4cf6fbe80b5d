"""part_fast.plots: the budget-map picture (title, legends, overlay) and the training curves, on synthetic input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from part_fast import plots
from part_fast.errors import ConfigError

EPS, EPS_LOW = 4 / 255, 2 / 255


def _budget_inputs(n=3, channels=3, size=8):
    """Images and eps maps whose full-eps share is 0 on the left half and k/3 (k = column % 4 over the
    right half's columns, capped by the channel count) on the right."""
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    maps = torch.full((n, channels, size, size), EPS_LOW)
    for c in range(channels):
        maps[:, c, :, size // 2 + c:] = EPS  # channel c gets the full eps from column size/2 + c on
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 2:5, 2:5] = True
    return images, maps, masks


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def _legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_budget_title_names_model_cam_mask_and_both_budgets():
    assert plots.budget_title("cnn-small", "gradcam", "jet", EPS, EPS_LOW) == \
        "PART budget, cnn-small, GradCAM, jet mask, ε = 4/255 (0.0157), ε_low = 2/255 (0.0078)"


def test_budget_png_has_its_title_legends_and_size(tmp_path):
    images, maps, masks = _budget_inputs()
    title = plots.budget_title("cnn-small", "gradcam", "jet", EPS, EPS_LOW)
    fig = plots.budget_overlay_figure(images, maps, EPS, ["a", "b", "c"], masks, suptitle=title)
    assert fig.get_suptitle() == title
    axes = np.array(fig.axes[:16]).reshape(4, 4)  # 3 images + the legend column, 4 rows
    assert _legend_labels(axes[1, 3]) == ["0: none (ε_low on all 3)", "1/3: 1 channel", "2/3: 2 channels",
                                          "1: all 3 channels"]
    assert axes[1, 3].get_legend().get_title().get_text() == "share of channels\ngiven the full ε"
    assert _legend_labels(axes[2, 3]) == ["untinted: ε_low", "1/3: 1 channel", "2/3: 2 channels", "1: all 3 channels"]
    assert _legend_labels(axes[3, 3]) == ["the object\n(ground truth)"]
    assert [axes[r, 0].get_ylabel() for r in range(4)] == ["image", "full-ε share", "overlay", "object"]
    png = plots.budget_overlay_png(tmp_path / "maps.png", images, maps, EPS, ["a", "b", "c"], masks, suptitle=title)
    assert png == tmp_path / "maps.png" and sorted(p.name for p in tmp_path.iterdir()) == ["maps.png"]
    with Image.open(png) as im:  # figsize (1.6 n + 2.3, 1.7 rows + 0.5) inches at 110 dpi
        assert im.format == "PNG" and im.size == (round((1.6 * 3 + 2.3) * 110), round((1.7 * 4 + 0.5) * 110))


def test_a_cam_mask_legend_has_two_levels_and_the_default_title_names_eps():
    images, maps, _ = _budget_inputs(n=2, channels=1)
    fig = plots.budget_overlay_figure(images, maps, EPS)
    assert fig.get_suptitle() == "PART budget, ε = 4/255 (0.0157)"
    axes = np.array(fig.axes[:9]).reshape(3, 3)  # no object row
    assert _legend_labels(axes[1, 2]) == ["0: ε_low", "1: full ε"]
    assert _legend_labels(axes[2, 2]) == ["untinted: ε_low", "1: full ε"]


def test_the_overlay_keeps_the_image_and_tints_only_full_eps_pixels():
    images, maps, _ = _budget_inputs(n=1)
    fig = plots.budget_overlay_figure(images, maps, EPS)
    overlay = fig.axes[4]  # row 2, column 0 (2 columns a row)
    base, tint = overlay.get_images()
    assert np.array_equal(np.asarray(base.get_array()), images[0].permute(1, 2, 0).numpy())
    assert base.get_alpha() is None  # drawn at full strength, not faded
    alpha = np.asarray(tint.get_array())[..., 3]
    share = plots.full_eps_share(maps, EPS)[0].numpy()
    assert (alpha[share == 0] == 0).all() and (alpha[share > 0] > 0).all()
    levels = {round(float(s), 4): tuple(np.asarray(tint.get_array())[share == s][0, :3]) for s in np.unique(share) if s}
    assert len(set(levels.values())) == len(levels) == 3  # one tint per level


@pytest.mark.parametrize("change, message", [
    (lambda i, m, t: (i, m[:, :2], t),
     r"eps_maps must be a \(3, 1 or 3, 8, 8\) tensor to match images, got shape \(3, 2, 8, 8\)"),
    (lambda i, m, t: (i[0], m, t), r"images must be a \(B, 3, H, W\) tensor, got shape \(3, 8, 8\)"),
    (lambda i, m, t: (i, m, t[:2]), r"titles must hold one title per image \(3\), got 2"),
])
def test_budget_inputs_that_do_not_match_are_named(change, message):
    images, maps, _ = _budget_inputs()
    images, maps, titles = change(images, maps, ["a", "b", "c"])
    with pytest.raises(ConfigError, match=message):
        plots.budget_overlay_figure(images, maps, EPS, titles)


# --------------------------------------------------------------------------------- training curves
def _record(epoch, phase="part", stages=True, **extra):
    r = {"epoch": epoch, "phase": phase, "lr": 0.05, "train_loss": 2.0 - 0.1 * epoch, "train_adv_acc": 10.0 * epoch,
         "train_nat_acc": None, "eps_high_fraction": 0.2, "epoch_seconds": 10.0}
    if stages:
        r.update(data_seconds=0.5, budget_seconds=1.0, attack_seconds=6.0, update_seconds=2.0)
    return {**r, **extra}


def _bars(ax) -> dict:
    """{label: [(x, bottom, height)]} of the time panel's bars."""
    out = {}
    for container in ax.containers:
        for patch in container.patches:
            out.setdefault(container.get_label(), []).append((patch.get_x() + patch.get_width() / 2, patch.get_y(),
                                                              patch.get_height()))
    return out


def test_one_epoch_draws_points_and_a_split_bar(tmp_path):
    fig = plots.training_curves_figure([_record(1)], "one epoch")
    loss_ax, acc_ax, time_ax, lr_ax = fig.axes  # the loss panel's learning-rate axis comes last
    assert lr_ax.get_ylabel() == "learning rate"
    assert fig.get_suptitle() == "one epoch"
    assert list(loss_ax.get_xticks()) == [1.0]
    assert _legend_labels(acc_ax) == ["train, adversarial"]  # train_nat_acc is None: not drawn
    bars = _bars(time_ax)
    assert {k: [h for _, _, h in v] for k, v in bars.items()} == {"data": [0.5], "budget": [1.0], "attack": [6.0],
                                                                  "update": [2.0], "other": [0.5]}
    assert bars["other"][0][1] == pytest.approx(9.5)  # stacked: it starts where the stages end
    assert _legend_labels(time_ax) == ["data", "budget", "attack", "update", "other"]
    png = plots.training_curves_png([_record(1)], tmp_path / "c.png", "one epoch")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (770, 880)  # 7 x 8 inches at 110 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temporary file left


def test_without_stage_times_the_bar_is_the_total_and_test_accuracies_are_drawn():
    records = [_record(e, stages=False, test_nat_acc=50.0 + e, test_pgd20_acc=30.0 + e, train_nat_acc=60.0)
               for e in (1, 2, 3)]
    fig = plots.training_curves_figure(records, "t")
    _, acc_ax, time_ax, _ = fig.axes
    assert {k: [h for _, _, h in v] for k, v in _bars(time_ax).items()} == {"total": [10.0, 10.0, 10.0]}
    assert _legend_labels(acc_ax) == ["train, adversarial", "train, natural", "test, natural", "test, PGD-20"]
    pgd = acc_ax.get_lines()[3]
    assert list(pgd.get_ydata()) == [31.0, 32.0, 33.0]


def test_missing_keys_leave_gaps_or_say_what_is_missing():
    records = [{"epoch": 1, "epoch_seconds": 3.0}, {"epoch": 2}, {"epoch": 3, "epoch_seconds": 4.0, "train_loss": None}]
    fig = plots.training_curves_figure(records, "sparse")
    texts = _texts(fig)
    assert "no train_loss in the records" in texts and "no accuracy in the records" in texts
    loss_ax, acc_ax, time_ax = fig.axes  # no learning rate: no second axis
    assert {k: [h for _, _, h in v] for k, v in _bars(time_ax).items()} == {"total": [3.0, 4.0]}


def test_the_warmup_to_part_boundary_is_marked():
    records = [_record(1, "warmup"), _record(2, "warmup"), _record(3, "part"), _record(4, "part")]
    fig = plots.training_curves_figure(records, "part run")
    assert "warm-up → PART (epoch 3)" in [t.strip() for t in _texts(fig)]
    loss_ax, acc_ax, time_ax, _ = fig.axes
    for ax in (loss_ax, acc_ax, time_ax):
        assert [tuple(line.get_xdata()) for line in ax.get_lines() if line.get_linestyle() == "--"] == [(2.5, 2.5)]
    at_run = plots.training_curves_figure([_record(e, "at") for e in (1, 2)], "at run")
    assert not any("PART" in t for t in _texts(at_run))


def test_the_callers_pyplot_state_is_left_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    mine = plt.figure()
    try:
        plots.training_curves_png([_record(1)], tmp_path / "c.png", "t")
        images, maps, _ = _budget_inputs(n=1)
        plots.budget_overlay_png(tmp_path / "m.png", images, maps, EPS)
        assert plt.get_fignums() == [mine.number] and plt.gcf() is mine
        assert matplotlib.get_backend() == backend
    finally:
        plt.close(mine)


@pytest.mark.parametrize("records, message", [
    ([], "records must be a non-empty list of metrics.jsonl lines"),
    ("epoch 1", "records must be a non-empty list"),
    ([{"epoch": 1}, 3], r"records\[1\] must be a dict \(a metrics.jsonl line\), got int"),
    ([{"epoch": 1, "train_loss": "high"}], r"records\[0\]\['train_loss'\] must be a number or null, got 'high'"),
])
def test_records_that_are_not_metrics_lines_are_named(records, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        plots.training_curves_png(records, tmp_path / "c.png", "t")
    assert not any(tmp_path.iterdir())


def test_a_nan_loss_is_a_gap_not_an_error():
    fig = plots.training_curves_figure([_record(1), _record(2, train_loss=math.nan), _record(3)], "t")
    loss = fig.axes[0].get_lines()[0].get_ydata()
    assert loss[0] == pytest.approx(1.9) and math.isnan(loss[1]) and loss[2] == pytest.approx(1.7)
