"""The reference itself against independent oracles: matplotlib's jet, PIL's bicubic resize, and a
straightforward per-image re-implementation of the released mask pipeline (docs/method.md §3)."""
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import rand, randn
from part_fast import reference

ROOT = Path(__file__).resolve().parents[1]
JET = matplotlib.colormaps["jet"]


# ----------------------------------------------------------------------------------------- jet LUT
def test_jet_lut_equals_matplotlib_exactly():
    expected = JET(np.arange(256))[:, :3]
    assert reference.jet_lut_numpy().shape == (256, 3)
    assert np.array_equal(reference.jet_lut_numpy(), expected)
    lut = reference.jet_lut()
    assert lut.dtype == torch.float64 and torch.equal(lut, torch.from_numpy(expected))


def test_jet_lut_equals_breakpoints():
    """Entry i is the piecewise-linear jet curve at i/255 (§3's breakpoints), within 1e-12."""
    breakpoints = {
        "red": [(0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1, 0.5)],
        "green": [(0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1, 0)],
        "blue": [(0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1, 0)],
    }
    x = np.arange(256) / 255
    lut = reference.jet_lut_numpy()
    for c, name in enumerate(("red", "green", "blue")):
        xs, ys = zip(*breakpoints[name])
        np.testing.assert_allclose(lut[:, c], np.interp(x, xs, ys), rtol=0, atol=1e-12)


def test_jet_lut_hand_values():
    lut = reference.jet_lut_numpy()
    np.testing.assert_allclose(lut[0], [0.0, 0.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(lut[255], [0.5, 0.0, 0.0], atol=1e-12)
    x = 128 / 255  # between red (0.35, 0)-(0.66, 1), on green's plateau, blue (0.34, 1)-(0.65, 0)
    np.testing.assert_allclose(lut[128], [(x - 0.35) / 0.31, 1.0, (0.65 - x) / 0.31], atol=1e-12)
    x = 10 / 255  # blue rising from 0.5 to 1 over [0, 0.11]
    np.testing.assert_allclose(lut[10], [0.0, 0.0, 0.5 + 0.5 * x / 0.11], atol=1e-12)
    x = 240 / 255  # red falling from 1 to 0.5 over [0.89, 1]
    np.testing.assert_allclose(lut[240], [1.0 - 0.5 * (x - 0.89) / 0.11, 0.0, 0.0], atol=1e-12)


def test_committed_header_is_generated():
    """csrc/jet_lut.h is exactly what reference.jet_lut_header() generates, and `python -m
    part_fast.reference OUT` writes the same text."""
    committed = (ROOT / "csrc" / "jet_lut.h").read_text()
    assert committed == reference.jet_lut_header()


def test_header_literals_are_the_table(tmp_path):
    out = tmp_path / "jet_lut.h"
    subprocess.run([sys.executable, "-m", "part_fast.reference", str(out)], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    text = out.read_text()
    assert text == reference.jet_lut_header()
    rows = [line.strip().rstrip("\\").strip().rstrip(",") for line in text.splitlines() if line.strip().startswith("{0x")]
    parsed = np.array([[float.fromhex(v) for v in row.strip("{}").split(", ")] for row in rows])
    assert np.array_equal(parsed, reference.mask_jet_lut_numpy())


def test_mask_jet_lut_is_the_release_round_trip():
    """The mask's table is matplotlib's after process_overlay's (255 * rgb) / 255: 3 values move by
    one ulp, nothing else changes."""
    lut, mask = reference.jet_lut_numpy(), reference.mask_jet_lut_numpy()
    assert np.array_equal(mask, (255 * JET(np.arange(256) / 255)[:, :3]).astype(np.double) / 255)
    moved = mask != lut
    assert int(moved.sum()) == 3
    assert np.array_equal(np.nextafter(lut[moved], 0), mask[moved])


def _jet_probe_values():
    special = [-1.0, -1e-30, -1 / 512, -0.0, 0.0, 1e-45, 1 / 256, 255 / 256, 1.0, 1.0 + 2**-23, 1.5, 1e30]
    special += [k / 256 for k in range(257)] + [np.nextafter(np.float32(k / 256), np.float32(0)) for k in range(1, 257)]
    rng = np.random.default_rng(0)
    values = np.concatenate([np.array(special, dtype=np.float32), rng.uniform(-0.2, 1.2, 5000).astype(np.float32)])
    return values


def test_jet_index_rule_matches_matplotlib():
    """floor(v*256), v < 0 -> 0, v >= 1 -> 255: the same colour as matplotlib's Colormap on float32 input."""
    v = _jet_probe_values()
    ours = reference.jet_lut_numpy()[reference.jet_index(torch.from_numpy(v)).numpy()]
    assert np.array_equal(ours, JET(v)[:, :3])


def test_jet_index_hand_values():
    v = torch.tensor([-0.5, 0.0, 0.5 / 256, 1 / 256, 0.5, 255 / 256, 0.999, 1.0, 2.0], dtype=torch.float32)
    assert reference.jet_index(v).tolist() == [0, 0, 0, 1, 128, 255, 255, 255, 255]


def test_jet_colors_square_in_float32():
    """jet_colors colours up**2 computed in float32, as numpy squared the float32 image."""
    up = torch.from_numpy(_jet_probe_values()[:4096].reshape(1, 64, 64).clip(-1, 2))
    ours = reference.jet_colors(up)[0].permute(1, 2, 0).numpy()
    a = up[0].numpy()
    assert np.array_equal(ours, (255 * JET(a**2)[:, :, :3]).astype(np.double) / 255)


# ----------------------------------------------------------------------------------- PIL resize
def test_pil_bicubic_filter_hand_values():
    f = reference.pil_bicubic_filter
    assert f(0.0) == 1.0
    assert f(1.0) == 0.0 and f(-1.0) == 0.0
    assert f(2.0) == 0.0 and f(3.0) == 0.0
    assert f(0.5) == 0.5625 and f(-0.5) == 0.5625  # ((a+2)x - (a+3))x^2 + 1 with a = -0.5
    assert f(1.5) == -0.0625  # ((x-5)x + 8)x - 4) * a


@pytest.mark.parametrize("sizes", [(4, 32), (8, 32), (7, 32), (5, 32), (1, 32), (40, 32), (32, 32), (3, 1)])
def test_pil_taps_normalised(sizes):
    first, weights = reference.pil_bicubic_taps(*sizes)
    assert weights.shape[0] == sizes[1]
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=0, atol=1e-15)
    assert (first >= 0).all() and (first < sizes[0]).all()


RESIZE_CASES = [((4, 4), (32, 32)), ((8, 8), (32, 32)), ((7, 5), (32, 32)), ((4, 4), (32, 24)),
                ((1, 1), (32, 32)), ((3, 9), (17, 5)), ((40, 40), (32, 32)), ((8, 8), (8, 8)), ((2, 3), (1, 1))]


def pil_resize(a: np.ndarray, size) -> np.ndarray:
    img = Image.fromarray(a.astype(np.float32), mode="F")
    assert img.mode == "F"
    return np.asarray(img.resize((size[1], size[0]), Image.BICUBIC))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", RESIZE_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-to-{c[1][0]}x{c[1][1]}")
def test_pil_bicubic_resize_equals_pil(case, seed):
    (h, w), size = case
    g = torch.Generator().manual_seed(seed)
    a = rand((h, w), g) if seed % 2 == 0 else randn((h, w), g)
    ours = reference.pil_bicubic_resize(a, size)
    assert ours.dtype == torch.float32 and ours.shape == size
    assert np.array_equal(ours.numpy(), pil_resize(a.numpy(), size))


def test_pil_bicubic_resize_batched_equals_per_image(gen):
    a = rand((5, 7, 5), gen)
    ours = reference.pil_bicubic_resize(a, (32, 32))
    for i in range(5):
        assert np.array_equal(ours[i].numpy(), pil_resize(a[i].numpy(), (32, 32)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", [((4, 4), (32, 32)), ((8, 8), (32, 32)), ((7, 5), (32, 32)), ((4, 4), (32, 24))],
                         ids=lambda c: f"{c[0][0]}x{c[0][1]}-to-{c[1][0]}x{c[1][1]}")
def test_pil_bicubic_resize_close_to_antialiased_interpolate(case, seed):
    """F.interpolate(bicubic, antialias=True) follows the same rule: within 3e-7 on upsampling."""
    (h, w), size = case
    a = rand((h, w), torch.Generator().manual_seed(100 + seed))
    ours = reference.pil_bicubic_resize(a, size)
    theirs = F.interpolate(a[None, None], size=size, mode="bicubic", antialias=True, align_corners=False)[0, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=3e-7)
    # ... and differs from the non-antialiased bicubic, which the release did not use.
    plain = F.interpolate(a[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
    assert (ours - plain).abs().max() > 1e-3


def test_pil_resize_overshoots():
    """Bicubic overshoots [0, 1] on a normalised map (§3: values reached -0.11 and 1.02)."""
    a = torch.zeros((4, 4))
    a[1:3, 1:3] = 1.0
    up = reference.pil_bicubic_resize(a, (32, 32))
    assert float(up.min()) < 0 and float(up.max()) > 1


# ------------------------------------------------------------------------------- min-max and mask
def test_minmax_normalize_matches_numpy(gen):
    cam = randn((6, 4, 5), gen)
    cam[2] = 0.3  # constant: degenerate
    cam[3] = -1.0  # all negative -> all zero after ReLU: degenerate
    cam[4, 1, 1] = float("nan")
    norm, degenerate = reference.minmax_normalize(cam)
    assert degenerate.tolist() == [False, False, True, True, True, False]
    for i in (0, 1, 5):
        c = np.maximum(cam[i].numpy(), np.float32(0))
        c = c - c.min()
        c = c / c.max()
        assert np.array_equal(norm[i].numpy(), c)
        assert float(norm[i].min()) == 0.0 and float(norm[i].max()) == 1.0


def release_eps_map(cam: np.ndarray, size, eps, eps_low, mode):
    """The released pipeline for one image, written out with numpy / PIL / matplotlib (§3):
    ReLU + min-max in float32 (torchcam), PIL "F" bicubic resize, square, matplotlib jet (alpha dropped),
    (255 * rgb).astype(double) / 255, z-score with the population std over all 3*H*W values,
    clamp(z, 1, z.max()).float(), eps where > 1. NaNs flow through as they did."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        c = np.maximum(cam.astype(np.float32), np.float32(0))
        c = c - c.min()
        c = c / c.max()
        up = pil_resize(c, size)
        if mode == "jet":
            values = ((255 * JET(up**2)[:, :, :3]).astype(np.double) / 255).transpose(2, 0, 1)
        else:
            values = up.astype(np.float64)[None]
        z = (values - values.mean()) / values.std()
        weight = torch.clamp(torch.from_numpy(z), 1, float(z.max())).float().numpy()
    return np.where(weight > 1, np.float32(eps), np.float32(eps_low)).astype(np.float32)


def _row_with_last_z(target: float) -> torch.Tensor:
    """A float64 row whose last value has the smallest z-score (over the whole row) that is > target,
    found by bisecting that value between two adjacent doubles."""
    base = torch.tensor([-1.0] * 6 + [0.0] * 4 + [0.5], dtype=torch.float64)

    def z_of(x):
        row = base.clone()
        row[-1] = x
        m = row.mean()
        return float((row[-1] - m) / ((row - m) ** 2).mean().sqrt()), row

    lo, hi = -1.0, 10.0  # z(-1) < 0 < 1 < z(10)
    while np.nextafter(lo, hi) < hi:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if z_of(mid)[0] <= target else (lo, mid)
    z, row = z_of(hi)
    assert z > target
    return z, row


def test_zscore_threshold_rounds_z_to_float32_as_the_release():
    """The release compares clamp(z, 1, max).float() > 1: a float64 z just above 1 rounds to 1.0f and is
    not selected (a float64 comparison would select it); a z clearly above 1 in float32 is."""
    z, row = _row_with_last_z(1.0)
    assert 1.0 < z <= 1.0 + 2**-24
    assert not reference._zscore_above_one(row[None])[0, -1]
    z, row = _row_with_last_z(1.0 + 2**-22)
    assert np.float32(z) > 1
    assert reference._zscore_above_one(row[None])[0, -1]


@pytest.mark.parametrize("mode", ["jet", "cam"])
@pytest.mark.parametrize("kind", ["rand", "randn", "peaked", "all_equal", "one_hot"])
@pytest.mark.parametrize("case", [((4, 4), (32, 32)), ((8, 8), (32, 32)), ((7, 5), (32, 32)), ((4, 4), (24, 40)),
                                  ((1, 1), (32, 32)), ((6, 6), (6, 6))],
                         ids=lambda c: f"{c[0][0]}x{c[0][1]}-to-{c[1][0]}x{c[1][1]}")
def test_cam_eps_map_equals_release_pipeline(mode, kind, case, gen):
    (h, w), size = case
    batch = 8
    if kind == "rand":
        cam = rand((batch, h, w), gen)
    elif kind == "randn":
        cam = randn((batch, h, w), gen)
    elif kind == "peaked":
        cam = rand((batch, h, w), gen) ** 4 * 5
    elif kind == "all_equal":
        cam = torch.full((batch, h, w), 0.25)
    else:
        cam = torch.zeros((batch, h, w))
        for i in range(batch):
            cam[i].view(-1)[i % (h * w)] = 1.0
    out = reference.cam_eps_map(cam, size, 8 / 255, 7 / 255, mode)
    for i in range(batch):
        expected = release_eps_map(cam[i].numpy(), size, 8 / 255, 7 / 255, mode)
        assert np.array_equal(out[i].numpy(), expected), f"image {i}"


def test_release_pipeline_selects_something(gen):
    """Guard that the oracle comparison is not vacuous: random CAMs give both budgets in every mode."""
    cam = rand((4, 4, 4), gen)
    for mode in ("jet", "cam"):
        out = reference.cam_eps_map(cam, (32, 32), 1.0, 0.0, mode)
        assert 0 < float(out.mean()) < 0.5


# ------------------------------------------------------------------------------------ attack math
def test_pgd_step_hand_values():
    x_nat = torch.tensor([0.5, 0.5, 0.5, 0.98, 0.02, 0.5, 0.5], dtype=torch.float64).reshape(1, 1, 1, 7)
    x_adv = torch.tensor([0.5, 0.55, 0.45, 0.98, 0.02, 0.9, 0.5], dtype=torch.float64).reshape(1, 1, 1, 7)
    grad = torch.tensor([1.0, 1.0, -1.0, 5.0, -5.0, 0.0, float("nan")], dtype=torch.float64).reshape(1, 1, 1, 7)
    out = reference.pgd_step_(x_adv.clone(), grad, x_nat, 0.1, 0.25)
    # +step inside the ball -> clamped to x_nat + eps; above 1 -> 1; below 0 -> 0; grad 0 / NaN: no step,
    # but x_adv = 0.9 outside the ball is still projected to 0.6.
    expected = torch.tensor([0.6, 0.6, 0.4, 1.0, 0.0, 0.6, 0.5], dtype=torch.float64).reshape(1, 1, 1, 7)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    out = reference.project_(x_adv.clone(), x_nat, 0.01)
    expected = torch.tensor([0.5, 0.51, 0.49, 0.98, 0.02, 0.51, 0.5], dtype=torch.float64).reshape(1, 1, 1, 7)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
