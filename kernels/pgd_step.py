"""Fused PGD update and L-inf projection: one streaming pass over x_adv, grad and x_nat.

    x_adv <- clip(clamp(x_adv + step_size * sign(grad), x_nat - eps, x_nat + eps), lo, hi)

The per-element math is csrc/part_fast_math.h's pgd_step_elem / project_elem: sign(NaN) = 0, and each
clamp follows torch.maximum / torch.minimum, so a NaN in x or in a bound (x_nat, eps) gives NaN. Half types compute in
float32, float64 in float64 (float64 is CPU-only, so it only runs under TRITON_INTERPRET=1). Results are
stored rounded to nearest even, as torch's .to() does.

x_adv, grad and x_nat share one dense layout (contiguous or channels_last), so all three are streamed by
their linear memory index whatever the layout. eps is walked by the rule of csrc/validate.h make_eps_plan:
  EPS_MODE 0  a Python float,
  EPS_MODE 1  a tensor in x's layout: read with the same linear index,
  EPS_MODE 2  any broadcast / strided tensor: the linear index is decomposed over up to 4 coalesced dims
              (x's memory order, outermost first) and dotted with eps's strides (0 where broadcast).
"""
from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

# Under the interpreter every program is a Python loop iteration: few big programs are much faster than
# many small ones. On a GPU, 2048 elements per program (16 per thread at 4 warps) gives each thread four
# 128-bit accesses per float32 tensor, or two for 16-bit types.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 131072 if _INTERPRET else 2048
NUM_WARPS = 4

EPS_SCALAR, EPS_DENSE, EPS_STRIDED = 0, 1, 2


@triton.jit
def _bf16_round_nearest_even(x):
    """float32 -> bfloat16 rounded to nearest even, as torch's .to(bfloat16) (NaN -> 0x7FC0).
    The GPU's cvt.rn.bf16.f32 does the same, but Triton 3.8's interpreter truncates; integer ops give one
    exact code path for both, and cost nothing in a memory-bound kernel."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # noqa: PLR0124  x != x: NaN
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _bf16_bits_to_float32(raw):
    """int16 bfloat16 bits -> float32, exact for every value. Triton 3.8's interpreter converts bfloat16
    subnormals wrongly; widening the bits by hand is one code path for the interpreter and the GPU."""
    return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load(ptr, offsets, mask, BF16_BITS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    raw = tl.load(ptr + offsets, mask=mask)
    if BF16_BITS:
        return _bf16_bits_to_float32(raw).to(COMPUTE_DTYPE)
    return raw.to(COMPUTE_DTYPE)


@triton.jit(do_not_specialize=["eps_bits", "step_bits", "lo_bits", "hi_bits"])
def pgd_step_kernel(
    x_ptr,  # x_adv, updated in place
    grad_ptr,  # unused when HAS_GRAD is False (pass x_ptr)
    x_nat_ptr,
    eps_ptr,  # unused when EPS_MODE == 0 (pass x_ptr)
    eps_bits: tl.int64,
    step_bits: tl.int64,
    lo_bits: tl.int64,
    hi_bits: tl.int64,
    n_elements,
    # EPS_MODE 2: eps's coalesced dims, outermost first (size of dim 0 is implied), and its strides.
    eps_size1,
    eps_size2,
    eps_size3,
    eps_stride0,
    eps_stride1,
    eps_stride2,
    eps_stride3,
    EPS_MODE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BF16_BITS: tl.constexpr,  # x_adv, grad, x_nat are bfloat16 passed as their int16 bits
    EPS_BF16_BITS: tl.constexpr,  # eps likewise
    COMPUTE_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 tensors
    INDEX_64: tl.constexpr,  # int64 offsets when an index can pass 2**31 - 1
    BLOCK: tl.constexpr,
):
    # eps, step_size, lo and hi arrive as the int64 bit pattern of a Python float (a C double): one
    # signature then serves float32 and float64 compute exactly, each rounded once to COMPUTE_DTYPE as
    # the host would. A float argument would be typed fp32 by Triton (and by its interpreter), which
    # rounds a float64 eps before the kernel sees it. (Inline, not a helper: every nested jit call costs
    # the interpreter milliseconds.)
    step = step_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE_DTYPE)
    lo = lo_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE_DTYPE)
    hi = hi_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE_DTYPE)

    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    # BLOCK consecutive offsets from a multiple of BLOCK: with 16-byte aligned pointers and n_elements
    # divisible by 16 (Triton specializes both at launch), the compiler proves every 4 (float32) or 8
    # (16-bit) elements aligned and unmasked together, and emits 128-bit loads and stores.
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements

    x_raw = tl.load(x_ptr + offsets, mask=mask)
    out_dtype = x_raw.dtype
    if BF16_BITS:
        x = _bf16_bits_to_float32(x_raw).to(COMPUTE_DTYPE)
    else:
        x = x_raw.to(COMPUTE_DTYPE)
    x_nat = _load(x_nat_ptr, offsets, mask, BF16_BITS, COMPUTE_DTYPE)

    if HAS_GRAD:
        g = _load(grad_ptr, offsets, mask, BF16_BITS, COMPUTE_DTYPE)
        # sign with sign(NaN) = 0; step * sign is exact, so contraction into an FMA cannot change it.
        sign = (g > 0).to(COMPUTE_DTYPE) - (g < 0).to(COMPUTE_DTYPE)
        x = x + step * sign

    if EPS_MODE == 0:
        eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE_DTYPE)
    elif EPS_MODE == 1:
        eps = _load(eps_ptr, offsets, mask, EPS_BF16_BITS, COMPUTE_DTYPE)
    else:
        rest = offsets
        eps_offsets = (rest % eps_size3) * eps_stride3
        rest = rest // eps_size3
        eps_offsets += (rest % eps_size2) * eps_stride2
        rest = rest // eps_size2
        eps_offsets += (rest % eps_size1) * eps_stride1
        rest = rest // eps_size1
        eps_offsets += rest * eps_stride0
        eps = _load(eps_ptr, eps_offsets, mask, EPS_BF16_BITS, COMPUTE_DTYPE)

    # clamp_keep_nan twice: to the eps box around x_nat, then to [lo, hi]. A NaN x fails every
    # comparison and stays NaN; a NaN bound is taken, as torch.maximum would give NaN.
    box_lo = x_nat - eps
    box_hi = x_nat + eps
    x = tl.where((x < box_lo) | (box_lo != box_lo), box_lo, x)  # noqa: PLR0124  b != b: NaN bound
    x = tl.where((x > box_hi) | (box_hi != box_hi), box_hi, x)  # noqa: PLR0124
    x = tl.where(x < lo, lo, x)
    x = tl.where(x > hi, hi, x)
    if BF16_BITS:
        tl.store(x_ptr + offsets, _bf16_round_nearest_even(x), mask=mask)
    else:
        tl.store(x_ptr + offsets, x.to(out_dtype), mask=mask)


def double_bits(value: float) -> int:
    """The int64 bit pattern of a Python float, as the kernels take their float scalars."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def eps_plan(eps, x: torch.Tensor):
    """csrc/validate.h make_eps_plan in Python: (EPS_MODE, sizes[4], strides[4]) for eps against x.
    Dims are x's, in x's memory order, size-1 dims dropped, adjacent dims merged where eps's strides
    allow; the result is left-padded to 4 dims with size 1, stride 0."""
    if not isinstance(eps, torch.Tensor):
        return EPS_SCALAR, [1, 1, 1, 1], [0, 0, 0, 0]
    pad = 4 - eps.dim()
    eps_sizes = [1] * pad + list(eps.shape)
    eps_strides = [0] * pad + list(eps.stride())
    eps_strides = [0 if s == 1 else st for s, st in zip(eps_sizes, eps_strides)]
    # x's memory order, outermost first (contiguous wins when x is both, as in validate.h).
    order = (0, 1, 2, 3) if x.is_contiguous() else (0, 2, 3, 1)
    sizes, strides = [], []
    for d in order:
        size = x.shape[d]
        if size == 1:
            continue
        if sizes and strides[-1] == eps_strides[d] * size:
            sizes[-1] *= size
            strides[-1] = eps_strides[d]
        else:
            sizes.append(size)
            strides.append(eps_strides[d])
    if not sizes:  # a single element
        sizes, strides = [1], [1]
    mode = EPS_DENSE if len(sizes) == 1 and strides[0] == 1 else EPS_STRIDED
    pad = 4 - len(sizes)
    return mode, [1] * pad + sizes, [0] * pad + strides


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def launch_args(x_adv, grad, x_nat, eps, step_size, lo, hi):
    """(grid, args, constexprs) of the pgd_step_kernel launch for these operands; ptx.py compiles from
    the same description (on meta tensors), so what it inspects is what runs."""
    n_elements = x_adv.numel()
    mode, sizes, strides = eps_plan(eps, x_adv)
    eps_extent = sum((s - 1) * st for s, st in zip(sizes, strides)) if mode == EPS_STRIDED else 0
    n_blocks = triton.cdiv(n_elements, BLOCK)
    # bfloat16 tensors travel as their int16 bits (see _bf16_bits_to_float32).
    bf16_bits = x_adv.dtype == torch.bfloat16
    eps_bf16_bits = mode != EPS_SCALAR and eps.dtype == torch.bfloat16
    x_adv, x_nat = _as_bits(x_adv), _as_bits(x_nat)
    grad = _as_bits(grad) if grad is not None else None
    if mode != EPS_SCALAR:
        eps = _as_bits(eps)
    args = (
        x_adv,
        grad if grad is not None else x_adv,
        x_nat,
        eps if mode != EPS_SCALAR else x_adv,
        double_bits(eps if mode == EPS_SCALAR else 0.0),
        double_bits(step_size if grad is not None else 0.0),
        double_bits(lo),
        double_bits(hi),
        n_elements,
        *sizes[1:],
        *strides,
    )
    constexprs = dict(
        EPS_MODE=mode,
        HAS_GRAD=grad is not None,
        BF16_BITS=bf16_bits,
        EPS_BF16_BITS=eps_bf16_bits,
        COMPUTE_DTYPE=tl.float64 if x_adv.dtype == torch.float64 else tl.float32,
        INDEX_64=n_blocks * BLOCK > 2**31 - 1 or eps_extent > 2**31 - 1,
        BLOCK=BLOCK,
    )
    return (n_blocks,), args, constexprs


def pgd_step_(x_adv, grad, x_nat, eps, step_size, lo=0.0, hi=1.0) -> None:
    """In place: x_adv <- clip(clamp(x_adv + step_size*sign(grad), x_nat-eps, x_nat+eps), lo, hi).
    grad=None projects only. Arguments are validated by the caller (part_fast._validate)."""
    if x_adv.numel() == 0:
        return
    grid, args, constexprs = launch_args(x_adv, grad, x_nat, eps, step_size, lo, hi)
    pgd_step_kernel[grid](*args, **constexprs, num_warps=NUM_WARPS)


def project_(x_adv, x_nat, eps, lo=0.0, hi=1.0) -> None:
    """In place: x_adv <- clip(clamp(x_adv, x_nat - eps, x_nat + eps), lo, hi)."""
    pgd_step_(x_adv, None, x_nat, eps, 0.0, lo, hi)
