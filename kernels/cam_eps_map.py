"""Per-pixel PGD budget from a raw CAM: the whole chain of part_fast.reference.cam_eps_map in one program
per image, with nothing written to global memory but the result.

    cam (h, w) -> float32, relu, min-max normalise    (degenerate if relu(cam) has a NaN or +inf, or
                                                        max == min; relu(-inf) = 0 is fine)
               -> PIL bicubic resize to (H, W)         (horizontal pass, float32, vertical pass, float32)
               -> "jet": jet colours of up*up, 3 channels  |  "cam": the upsampled value, 1 channel
               -> z-score over the image's values (float64 mean, population std)
               -> eps where float32(z) > 1, eps_low elsewhere (and everywhere for a degenerate CAM)

Bit-exactness with the reference (PIL / matplotlib):
- The min-max division is correctly rounded (div_rn): Triton's float32 `/` is approximate on a GPU.
- PIL accumulates each output value in float64, in tap order, without FMA. Here every pass is a
  sequential sum over *all* input indices with a dense float64 weight matrix that is zero outside the
  tap window: the extra terms are +-0 products, which leave the sum unchanged, so the result is
  PIL's. The kernel must be compiled with enable_fp_fusion=False so mul + add stay two roundings.
- The horizontal pass (h x W values) is computed once and kept in registers; the vertical pass and
  everything after it run over tiles of output rows. When the image is one tile its values are
  computed once; otherwise each of the three passes (sum, sum of squared deviations, write)
  recomputes the tile from the registers, which is cheaper than a round trip through global memory.
- The mean and std are float64 sums in tile order; torch sums in another order, so they can differ
  from the reference in the last bits. That only matters for a value whose z-score is 1 to ~1e-15.

Every tensor carries a leading image axis of IMAGES images per program: 1 on a GPU (one program per
image), many under TRITON_INTERPRET=1, where each Triton op costs ~0.1 ms of Python whatever its size.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from .. import reference

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Outputs per tile (images x rows x padded width): on a GPU 2048 float64 accumulators, 16 per thread at
# 4 warps; under the interpreter as many whole images as fit 2**20 values.
TILE_ELEMENTS = 1 << 20 if _INTERPRET else 2048
NUM_WARPS = 4
# Compile option the kernel needs for PIL-exact sums (see the module docstring).
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _per_image_sum(x):
    """[IMAGES, R, C] -> [IMAGES]."""
    return tl.sum(tl.sum(x, axis=2), axis=1)


@triton.jit
def _resized_rows(horizontal, y0, h, H, wv_ptr, IMAGES: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """Output rows y0 .. y0 + BLOCK_Y - 1 of the resized maps, float32 [IMAGES, BLOCK_Y, BLOCK_X]: the
    vertical pass over `horizontal` (float32 [IMAGES, BLOCK_H, BLOCK_X]) with the weights at wv_ptr
    (float64 (h, H), row r holding input row r's weight for every output row), in input-row order."""
    rows_in = tl.arange(0, BLOCK_H)[None, :, None]
    out_rows = y0 + tl.arange(0, BLOCK_Y)
    acc = tl.zeros((IMAGES, BLOCK_Y, BLOCK_X), dtype=tl.float64)
    for r in range(h):
        # Row r of a register tensor: the sum of one value and zeros, hence exact.
        row = tl.sum(tl.where(rows_in == r, horizontal, 0.0), axis=1).to(tl.float64)
        weight = tl.load(wv_ptr + r * H + out_rows, mask=out_rows < H, other=0.0)
        acc += weight[None, :, None] * row[:, None, :]
    return acc.to(tl.float32)


@triton.jit
def cam_eps_map_kernel(
    cam_ptr,
    out_ptr,  # (B, NUM_CHANNELS, H, W) float32, contiguous
    lut_ptr,  # (256, 3) float64 jet table (unused for mode "cam")
    wh_ptr,  # (w, W) float64 horizontal weights, row c holding input column c's weight for every output column
    wv_ptr,  # (h, H) float64 vertical weights
    eps,
    eps_low,
    batch,
    cam_stride_b,
    cam_stride_h,
    cam_stride_w,
    h,
    w,
    H,
    W,
    NUM_CHANNELS: tl.constexpr,  # 3 for "jet", 1 for "cam"
    JET: tl.constexpr,
    IMAGES: tl.constexpr,  # images per program: 1 on a GPU; many under the interpreter (see launch_config)
    BLOCK_H: tl.constexpr,  # >= h, power of two
    BLOCK_W: tl.constexpr,  # >= w
    BLOCK_Y: tl.constexpr,  # output rows per tile
    BLOCK_X: tl.constexpr,  # >= W
    ONE_TILE: tl.constexpr,  # BLOCK_Y >= H: the resized map is computed once, not once per pass
):
    # Every tensor carries a leading image axis; per-image scalars are [IMAGES] vectors.
    images = tl.program_id(0).to(tl.int64) * IMAGES + tl.arange(0, IMAGES)
    image_valid = images < batch

    # ---- the CAM in registers: float32, relu, min-max normalised (torchcam's order of operations).
    rows_in = tl.arange(0, BLOCK_H)[None, :, None]
    cols_in = tl.arange(0, BLOCK_W)[None, None, :]
    in_valid = image_valid[:, None, None] & (rows_in < h) & (cols_in < w)
    cam_offsets = images[:, None, None] * cam_stride_b + rows_in * cam_stride_h + cols_in * cam_stride_w
    c = tl.load(cam_ptr + cam_offsets, mask=in_valid, other=0.0).to(tl.float32)
    # Degenerate if relu(c) is non-finite somewhere (NaN or +inf; relu(-inf) = 0 is fine), as the
    # reference checks after its relu; then relu with those values set to 0, as nan_to_num does.
    non_finite = _per_image_sum((in_valid & ((c != c) | (c == float("inf")))).to(tl.int32)) > 0  # noqa: PLR0124 (NaN)
    c = tl.where((c > 0.0) & (c < float("inf")), c, 0.0)
    cmin = tl.min(tl.min(tl.where(in_valid, c, float("inf")), axis=2), axis=1)
    c = tl.where(in_valid, c - cmin[:, None, None], 0.0)
    cmax = tl.max(tl.max(c, axis=2), axis=1)
    degenerate = non_finite | (cmax == 0.0)
    norm = tl.math.div_rn(c, tl.where(cmax == 0.0, 1.0, cmax)[:, None, None])

    # ---- horizontal pass, once: float64 sums in input-column order, rounded to float32
    # [IMAGES, BLOCK_H, BLOCK_X].
    out_cols = tl.arange(0, BLOCK_X)
    col_valid = out_cols < W
    horizontal = tl.zeros((IMAGES, BLOCK_H, BLOCK_X), dtype=tl.float64)
    for col in range(w):
        column = tl.sum(tl.where(cols_in == col, norm, 0.0), axis=2).to(tl.float64)  # exact, as above
        weight = tl.load(wh_ptr + col * W + out_cols, mask=col_valid, other=0.0)
        horizontal += column[:, :, None] * weight[None, None, :]
    horizontal = horizontal.to(tl.float32)

    # ---- three passes over the output tiles: sum -> mean, squared deviations -> population std, write.
    n_values = tl.cast(NUM_CHANNELS * H * W, tl.float64)
    plane = H * W
    out_images = out_ptr + images[:, None, None] * (NUM_CHANNELS * plane)
    tile_rows = tl.arange(0, BLOCK_Y)
    first_tile = _resized_rows(horizontal, 0, h, H, wv_ptr, IMAGES, BLOCK_H, BLOCK_Y, BLOCK_X)
    mean = tl.zeros((IMAGES,), dtype=tl.float64)
    std = tl.zeros((IMAGES,), dtype=tl.float64)
    threshold = tl.zeros((IMAGES,), dtype=tl.float64)
    for phase in tl.static_range(3):
        total = tl.zeros((IMAGES,), dtype=tl.float64)
        for y0 in range(0, H, BLOCK_Y):
            if ONE_TILE:
                up = first_tile
            else:
                up = _resized_rows(horizontal, y0, h, H, wv_ptr, IMAGES, BLOCK_H, BLOCK_Y, BLOCK_X)
            out_rows = (y0 + tile_rows)[None, :, None]
            valid = image_valid[:, None, None] & (out_rows < H) & col_valid[None, None, :]
            if JET:
                # matplotlib's index of up*up (squared in float32): floor(v * 256) clamped to [0, 255];
                # v * 256 is exact and truncation is floor for v >= 0.
                scaled = (up * up) * 256.0
                lut_row = tl.where(scaled >= 255.0, 255, scaled.to(tl.int32))
                lut_row = tl.where(scaled >= 0.0, lut_row, 0)
            for ch in tl.static_range(NUM_CHANNELS):
                if JET:
                    v = tl.load(lut_ptr + lut_row * 3 + ch)
                else:
                    v = up.to(tl.float64)
                if phase == 0:
                    total += _per_image_sum(tl.where(valid, v, 0.0))
                elif phase == 1:
                    d = v - mean[:, None, None]
                    total += _per_image_sum(tl.where(valid, d * d, 0.0))
                else:
                    # float64 `/` is div.rn.f64; z is rounded to float32 before the comparison, as the
                    # release casts it (cvt.rn.f32.f64).
                    z = ((v - mean[:, None, None]) / std[:, None, None]).to(tl.float32)
                    keep = z > threshold[:, None, None]
                    out_offsets = ch * plane + out_rows * W + out_cols[None, None, :]
                    tl.store(out_images + out_offsets, tl.where(keep, eps, eps_low), mask=valid)
        if phase == 0:
            mean = total / n_values
        elif phase == 1:
            std = tl.sqrt(total / n_values)  # float64 sqrt is sqrt.rn.f64
            # z > 1 selects; a constant map (std 0) or a degenerate CAM selects nothing (z > inf is false
            # for every z). A zero std is replaced by 1 as the reference does, so nothing divides by 0.
            threshold = tl.where((std > 0.0) & ~degenerate, 1.0, float("inf")).to(tl.float32)
            std = tl.where(std > 0.0, std, 1.0)


# ------------------------------------------------------------------------------------------ host side
@functools.cache
def dense_weights_numpy(in_size: int, out_size: int) -> np.ndarray:
    """(in_size, out_size) float64: PIL's normalised bicubic weight of input index i for output index o
    (reference.pil_bicubic_taps laid out densely, 0 outside each window)."""
    first, weights = reference.pil_bicubic_taps(in_size, out_size)
    dense = np.zeros((in_size, out_size), dtype=np.float64)
    outs = np.arange(out_size)
    for k in range(weights.shape[1]):
        taps = first + k
        real = taps < in_size  # zero padding of the tap table; padding inside the image has weight 0
        dense[taps[real], outs[real]] = weights[real, k]
    return dense


@functools.lru_cache(maxsize=64)
def _dense_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(dense_weights_numpy(in_size, out_size)).to(device)


@functools.lru_cache(maxsize=8)
def _jet_lut(device: torch.device) -> torch.Tensor:
    return reference.mask_jet_lut(device).contiguous()


def launch_config(batch: int, h: int, w: int, H: int, W: int) -> dict:
    """Constexpr block sizes for one problem. On a GPU: one image per program, tiles of up to
    TILE_ELEMENTS outputs. Under the interpreter each Triton op costs ~0.1 ms of Python whatever its size,
    so as many images and rows as fit TILE_ELEMENTS go into one program."""
    block_x = triton.next_power_of_2(W)
    block_y = max(1, min(triton.next_power_of_2(H), TILE_ELEMENTS // block_x))
    images = 1
    if _INTERPRET:
        images = max(1, min(triton.next_power_of_2(batch), TILE_ELEMENTS // (block_y * block_x)))
    return dict(
        IMAGES=images,
        BLOCK_H=triton.next_power_of_2(h),
        BLOCK_W=triton.next_power_of_2(w),
        BLOCK_Y=block_y,
        BLOCK_X=block_x,
        ONE_TILE=block_y >= H,
    )


def launch_args(cam: torch.Tensor, out: torch.Tensor, eps: float, eps_low: float, mode: str):
    """(grid, args, constexprs) of the cam_eps_map_kernel launch writing `out` (B, C, H, W); ptx.py
    compiles from the same description (on meta tensors), so what it inspects is what runs."""
    batch, h, w = cam.shape
    H, W = out.shape[-2:]
    device = cam.device
    config = launch_config(batch, h, w, H, W)
    args = (
        cam,
        out,
        _jet_lut(device),
        _dense_weights(w, W, device),
        _dense_weights(h, H, device),
        float(eps),
        float(eps_low),
        batch,
        *cam.stride(),
        h,
        w,
        H,
        W,
    )
    constexprs = dict(NUM_CHANNELS=3 if mode == "jet" else 1, JET=mode == "jet", **config)
    return (triton.cdiv(batch, config["IMAGES"]),), args, constexprs


def cam_eps_map(cam: torch.Tensor, size, eps: float, eps_low: float, mode: str = "jet") -> torch.Tensor:
    """Raw CAM (B, h, w) -> float32 budget (B, 3, H, W) for mode "jet", (B, 1, H, W) for mode "cam".
    Arguments are validated by the caller (part_fast._validate.validate_cam_args)."""
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    num_channels = 3 if mode == "jet" else 1
    out = torch.empty((cam.shape[0], num_channels, H, W), dtype=torch.float32, device=cam.device)
    if cam.shape[0] == 0:
        return out
    grid, args, constexprs = launch_args(cam, out, eps, eps_low, mode)
    cam_eps_map_kernel[grid](*args, **constexprs, num_warps=NUM_WARPS, **COMPILE_OPTIONS)
    return out
