"""Pure-PyTorch reference for every part_fast op: the ground truth for tests, the fallback when the
compiled extension is missing, and the baseline of the benchmarks.

A leaf module: it knows nothing of models. Readability over speed; every rounding point is the one the
released PART code had (see docs/method.md §3-4), so the compiled kernels can match it exactly.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import _validate

# matplotlib's "jet" segment data: (x, value) breakpoints per channel (matplotlib/_cm.py).
JET_BREAKPOINTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
JET_N = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are computed in float32, float64 in float64: the same rule as the kernels.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sign_nan_zero(g: torch.Tensor) -> torch.Tensor:
    # sign with sign(NaN) = 0: a NaN gradient element takes no step.
    return (g > 0).to(g.dtype) - (g < 0).to(g.dtype)


def _project(x, x_nat, eps, lo, hi):
    x = torch.maximum(x, x_nat - eps)
    x = torch.minimum(x, x_nat + eps)
    return x.clamp(lo, hi)


def _eps_in(eps, dtype):
    return eps.to(dtype) if isinstance(eps, torch.Tensor) else float(eps)


def pgd_step_(x_adv, grad, x_nat, eps, step_size, lo=0.0, hi=1.0):
    """In place: x_adv <- clip(clamp(x_adv + step_size*sign(grad), x_nat - eps, x_nat + eps), lo, hi)."""
    _validate.validate_attack_tensors(x_adv, grad, x_nat)
    _validate.validate_eps(eps, x_adv)
    _validate.validate_scalars(step_size, lo, hi)
    ct = _compute_dtype(x_adv.dtype)
    x = x_adv.to(ct) + float(step_size) * _sign_nan_zero(grad.to(ct))
    x_adv.copy_(_project(x, x_nat.to(ct), _eps_in(eps, ct), float(lo), float(hi)))
    return x_adv


def project_(x_adv, x_nat, eps, lo=0.0, hi=1.0):
    """In place: x_adv <- clip(clamp(x_adv, x_nat - eps, x_nat + eps), lo, hi)."""
    _validate.validate_attack_tensors(x_adv, None, x_nat)
    _validate.validate_eps(eps, x_adv)
    _validate.validate_scalars(0.0, lo, hi)
    ct = _compute_dtype(x_adv.dtype)
    x_adv.copy_(_project(x_adv.to(ct), x_nat.to(ct), _eps_in(eps, ct), float(lo), float(hi)))
    return x_adv


def pgd_step_release(x_adv, grad, x_nat, eps, step_size):
    """The released code's eager update (sign, multiply, add, subtract, two torch.where clamps, add,
    clamp): the benchmark baseline. Out of place, as the release wrote it."""
    x_adv = x_adv.detach() + step_size * grad.sign()
    delta = x_adv - x_nat
    delta = torch.where(delta > eps, eps, delta)
    delta = torch.where(delta < -eps, -eps, delta)
    return torch.clamp(x_nat + delta, 0.0, 1.0)


# ----------------------------------------------------------------------------------------- jet LUT
@functools.lru_cache(maxsize=None)
def jet_lut_numpy() -> np.ndarray:
    """(256, 3) float64 RGB table, computed as matplotlib's _create_lookup_table builds "jet"."""
    n = JET_N
    xind = (n - 1) * np.linspace(0, 1, n) ** 1.0
    channels = []
    for name in ("red", "green", "blue"):
        data = np.array(JET_BREAKPOINTS[name], dtype=np.float64)
        x = data[:, 0] * (n - 1)
        y = data[:, 1]
        ind = np.searchsorted(x, xind)[1:-1]
        distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
        lut = np.concatenate([[y[0]], distance * (y[ind] - y[ind - 1]) + y[ind - 1], [y[-1]]])
        channels.append(np.clip(lut, 0.0, 1.0))
    return np.stack(channels, axis=1)


def jet_lut(device=None) -> torch.Tensor:
    return torch.from_numpy(jet_lut_numpy().copy()).to(device)


@functools.lru_cache(maxsize=None)
def mask_jet_lut_numpy() -> np.ndarray:
    """(256, 3) float64: the jet colours the released mask standardises. The release's process_overlay
    writes (255 * rgb).astype(double) / 255, which moves 3 of the 768 table values by 1 ulp; a z-score
    near 1 can see that, so the mask uses these values, not matplotlib's table itself."""
    return (255 * jet_lut_numpy()).astype(np.float64) / 255


def mask_jet_lut(device=None) -> torch.Tensor:
    return torch.from_numpy(mask_jet_lut_numpy().copy()).to(device)


def jet_index(v: torch.Tensor) -> torch.Tensor:
    """matplotlib's Colormap.__call__ index rule for floats: floor(v*256), v<0 -> 0 (under),
    v>=1 -> 255 (1.0 is in range, above is over). NaN is handled by the caller (degenerate map)."""
    idx = torch.floor(v * JET_N)
    return idx.clamp(0, JET_N - 1).nan_to_num(0).long()


# --------------------------------------------------------------------------- PIL bicubic resize
def pil_bicubic_filter(x: float) -> float:
    """PIL's bicubic kernel, a = -0.5."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=None)
def pil_bicubic_taps(in_size: int, out_size: int):
    """PIL's precompute_coeffs for BICUBIC: per output index the first input index and the normalised
    float64 weights (zero-padded to a common width). Pixel centres at half-integers; at the borders the
    window is cut to the image and the weights renormalised to sum to 1."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    first = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [pil_bicubic_filter((x + xmin - center + 0.5) * (1.0 / filterscale)) for x in range(xmax)]
        ww = sum_sequential(k)
        first[xx] = xmin
        for x in range(xmax):
            weights[xx, x] = k[x] / ww if ww != 0.0 else k[x]
    return first, weights


def sum_sequential(values):
    total = 0.0
    for v in values:
        total += v
    return total


def _resize_last_dim(img: torch.Tensor, out_size: int) -> torch.Tensor:
    """One PIL pass along the last dim: float64 accumulation in tap order, result rounded to float32."""
    in_size = img.shape[-1]
    first, weights = pil_bicubic_taps(in_size, out_size)
    src = img.to(torch.float64)
    acc = torch.zeros(*img.shape[:-1], out_size, dtype=torch.float64, device=img.device)
    for k in range(weights.shape[1]):
        w = torch.from_numpy(weights[:, k].copy()).to(img.device)
        idx = torch.from_numpy(np.minimum(first + k, in_size - 1)).to(img.device)
        # padded taps have weight 0 and read a valid pixel: adding +0.0 leaves the sum unchanged
        acc = acc + src[..., idx] * w
    return acc.to(torch.float32)


def pil_bicubic_resize(img: torch.Tensor, size) -> torch.Tensor:
    """(..., h, w) float32 -> (..., H, W) float32, as PIL's Image.resize(BICUBIC) on a mode-"F" image:
    horizontal pass first, float32 intermediate, then the vertical pass."""
    out_h, out_w = size
    tmp = _resize_last_dim(img.to(torch.float32), out_w)
    return _resize_last_dim(tmp.transpose(-1, -2), out_h).transpose(-1, -2).contiguous()


# ------------------------------------------------------------------------------------ cam_eps_map
def minmax_normalize(cam: torch.Tensor):
    """ReLU, then per-image min-max in float32 as torchcam does (subtract the min, divide by the new max).
    Returns the map and a (B,) bool mask of degenerate images (non-finite CAM or max == min)."""
    c = torch.relu(cam.to(torch.float32))
    flat = c.flatten(1)
    degenerate = ~torch.isfinite(flat).all(1)
    c = torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)
    flat = c.flatten(1)
    cmin = flat.amin(1)
    c = c - cmin[:, None, None]
    cmax = c.flatten(1).amax(1)
    degenerate |= cmax == 0
    safe = torch.where(cmax == 0, torch.ones_like(cmax), cmax)
    return c / safe[:, None, None], degenerate


def _zscore_above_one(values: torch.Tensor) -> torch.Tensor:
    """values (B, N) float64 -> (B, N) bool: float32((v - mean) / std) > 1 with the population std.
    The release casts the float64 z-score to float32 before comparing (clamp(z, 1, max).float() > 1),
    so z in (1, 1 + 2**-24] rounds to 1 and is not selected. A zero std (a constant map) selects
    nothing."""
    mean = values.mean(1, keepdim=True)
    std = ((values - mean) ** 2).mean(1, keepdim=True).sqrt()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return (((values - mean) / safe).to(torch.float32) > 1) & (std > 0)


def jet_colors(up: torch.Tensor) -> torch.Tensor:
    """(B, H, W) upsampled float32 map -> (B, 3, H, W) float64 jet colours of its square, as the
    release's process_overlay holds them (mask_jet_lut)."""
    rgb = mask_jet_lut(up.device)[jet_index(up * up)]  # square in float32, as numpy did on the float32 image
    return rgb.permute(0, 3, 1, 2)


def cam_eps_map(cam, size, eps, eps_low, mode="jet"):
    """Raw CAM (B, h, w) at feature resolution -> per-pixel budget, float32:
    (B, 3, H, W) for mode "jet" (the released mask, docs/method.md §3) or (B, 1, H, W) for mode
    "cam" (channel-shared). eps where the standardised value is > 1, eps_low elsewhere; a degenerate
    CAM (all equal, or non-finite) gives eps_low everywhere."""
    size = _validate.validate_cam_args(cam, size, eps, eps_low, mode)
    batch = cam.shape[0]
    if batch == 0:
        return torch.empty(0, 3 if mode == "jet" else 1, *size, dtype=torch.float32, device=cam.device)
    norm, degenerate = minmax_normalize(cam)
    up = pil_bicubic_resize(norm, size)
    if mode == "jet":
        values = jet_colors(up)
    else:
        values = up.to(torch.float64).unsqueeze(1)
    keep = _zscore_above_one(values.reshape(batch, -1)).reshape(values.shape)
    keep &= ~degenerate[:, None, None, None]
    high = torch.tensor(eps, dtype=torch.float32, device=cam.device)
    low = torch.tensor(eps_low, dtype=torch.float32, device=cam.device)
    return torch.where(keep, high, low)


def jet_lut_header() -> str:
    """The text of csrc/jet_lut.h: the mask's jet table (mask_jet_lut_numpy) as exact hex-float
    literals for the C++/CUDA kernels."""
    rows = ", \\\n".join("    {%s, %s, %s}" % tuple(float(v).hex() for v in row) for row in mask_jet_lut_numpy())
    return (
        "// Generated by `python -m part_fast.reference csrc/jet_lut.h`: do not edit by hand.\n"
        "// matplotlib's 256-entry \"jet\" lookup table (RGB, float64) as the released mask holds it:\n"
        "// (255 * rgb) / 255 in double, bit-exact; a test checks that this\n"
        "// file is what part_fast.reference.jet_lut_header() generates.\n"
        "#pragma once\n\n"
        f"#define PART_FAST_JET_N {JET_N}\n\n"
        "// Initializer for a double[PART_FAST_JET_N][3] table (host constexpr or CUDA __constant__).\n"
        "#define PART_FAST_JET_LUT_INITIALIZER { \\\n" + rows + " \\\n}\n"
    )


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m part_fast.reference OUT_HEADER")
    with open(sys.argv[1], "w") as f:
        f.write(jet_lut_header())
