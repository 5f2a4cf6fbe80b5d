"""Argument checks shared by every Python-side backend (reference, triton).

The C++ ops (csrc/validate.h) make the same checks with the same words and raise ValueError. The stable ABI
they are built on cannot raise TypeError, so part_fast.ops runs validate_kernel_dtypes before a compiled op:
a bad argument raises the same exception type (ValueError / TypeError) naming the same argument whichever
backend runs.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF_OR_FLOAT = frozenset(FLOAT_DTYPES[:3])  # every device's kernels take these


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def memory_format_of(x: torch.Tensor, name: str) -> torch.memory_format:
    """The dense layout of a 4-D tensor, or a ValueError naming it."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    raise ValueError(
        f"{name} must be dense (contiguous or channels_last), got strides {tuple(x.stride())}; "
        "call .contiguous() yourself if a copy is what you want"
    )


def device_of(x, name: str) -> torch.device:
    """x.device, or a TypeError naming the argument when x is not a tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.device


def validate_float_tensor(x: torch.Tensor, name: str, allow_float64: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = FLOAT_DTYPES if allow_float64 else FLOAT_DTYPES[:3]
    if x.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        where = "" if allow_float64 else "; float64 is CPU-only"  # the C++ checks' wording (csrc/validate.h)
        raise TypeError(f"{name} must be a floating-point tensor ({names}{where}), got {_dtype_name(x.dtype)}")


def validate_attack_tensors(x_adv, grad, x_nat, allow_float64=True):
    """x_adv, (grad), x_nat: same 4-D shape, dtype, device and dense layout."""
    validate_float_tensor(x_adv, "x_adv", allow_float64)
    if x_adv.dim() != 4:
        raise ValueError(f"x_adv must be 4-D (B, C, H, W), got shape {tuple(x_adv.shape)}")
    fmt = memory_format_of(x_adv, "x_adv")
    others = [("x_nat", x_nat)] if grad is None else [("grad", grad), ("x_nat", x_nat)]
    for name, t in others:
        validate_float_tensor(t, name, allow_float64)
        if t.shape != x_adv.shape:
            raise ValueError(f"{name} must have the same shape as x_adv {tuple(x_adv.shape)}, got {tuple(t.shape)}")
        if t.dtype != x_adv.dtype:
            raise TypeError(f"{name} must have x_adv's dtype {_dtype_name(x_adv.dtype)}, got {_dtype_name(t.dtype)}")
        if t.device != x_adv.device:
            raise ValueError(f"{name} must be on x_adv's device {x_adv.device}, got {t.device}")
        if not t.is_contiguous(memory_format=fmt):
            layout = "contiguous" if fmt == torch.contiguous_format else "channels_last"
            raise ValueError(f"{name} must have x_adv's memory layout ({layout}), got strides {tuple(t.stride())}")
    return fmt


def validate_kernel_dtypes(x_adv, others, eps_map=None) -> None:
    """The TypeErrors of validate_attack_tensors / validate_eps / validate_cam_args, before a compiled op (whose own
    checks raise ValueError for a wrong dtype). x_adv: the first tensor (x_adv, or cam); others: (name,
    tensor) pairs that must share its dtype; eps_map: None or the tensor budget. float64 only on the CPU."""
    # The common case first, in a few attribute reads: this runs before every compiled op call.
    dtype = getattr(x_adv, "dtype", None)
    if dtype in _HALF_OR_FLOAT and (eps_map is None or eps_map.dtype == dtype or eps_map.dtype == torch.float32):
        for _, t in others:
            if getattr(t, "dtype", None) != dtype:
                break
        else:
            return
    name = "cam" if not others else "x_adv"
    validate_float_tensor(x_adv, name, allow_float64=x_adv.device.type == "cpu")
    for other_name, t in others:
        validate_float_tensor(t, other_name, allow_float64=x_adv.device.type == "cpu")
        if t.dtype != x_adv.dtype:
            raise TypeError(f"{other_name} must have x_adv's dtype {_dtype_name(x_adv.dtype)}, got {_dtype_name(t.dtype)}")
    if eps_map is not None and eps_map.dtype not in (torch.float32, x_adv.dtype):
        raise TypeError(f"eps must be a float32 tensor or have x_adv's dtype {_dtype_name(x_adv.dtype)}, "
                        f"got {_dtype_name(eps_map.dtype)}")


def validate_eps(eps, x_adv: torch.Tensor) -> None:
    """eps: a float >= 0, or a floating tensor broadcastable to x_adv on its device (float32 or x_adv's dtype)."""
    if isinstance(eps, torch.Tensor):
        if eps.dtype not in (torch.float32, x_adv.dtype):
            raise TypeError(
                f"eps must be a float32 tensor or have x_adv's dtype {_dtype_name(x_adv.dtype)}, "
                f"got {_dtype_name(eps.dtype)}"
            )
        if eps.device != x_adv.device:
            raise ValueError(f"eps must be on x_adv's device {x_adv.device}, got {eps.device}")
        try:
            shape = torch.broadcast_shapes(eps.shape, x_adv.shape)
        except RuntimeError:
            shape = None
        if shape != x_adv.shape:
            raise ValueError(f"eps of shape {tuple(eps.shape)} is not broadcastable to x_adv's shape {tuple(x_adv.shape)}")
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float or a tensor, got {type(eps).__name__}")
    if not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


def validate_scalars(step_size, lo, hi) -> None:
    for name, v in (("step_size", step_size), ("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
        if math.isnan(v):
            raise ValueError(f"{name} must not be NaN")
    if not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if lo > hi:
        raise ValueError(f"lo must be <= hi, got lo={lo}, hi={hi}")


def _is_int(s) -> bool:
    # A torch.SymInt is a size traced symbolically (torch.compile with dynamic shapes, fake kernels).
    return (isinstance(s, int) and not isinstance(s, bool)) or isinstance(s, torch.SymInt)


def normalize_size(size) -> tuple[int, int]:
    if _is_int(size):
        size = (size, size)
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 or not all(_is_int(s) for s in size):
        raise TypeError(f"size must be an int or a pair of ints (H, W), got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    # int() of a SymInt would specialise the traced size to its current value: keep it symbolic
    return tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size)


def validate_cam_args(cam, size, eps, eps_low, mode, allow_float64=True) -> tuple[int, int]:
    validate_float_tensor(cam, "cam", allow_float64)
    if cam.dim() != 3:
        raise ValueError(f"cam must be 3-D (B, h, w), got shape {tuple(cam.shape)}")
    if cam.shape[1] == 0 or cam.shape[2] == 0:
        raise ValueError(f"cam must have a non-empty map, got shape {tuple(cam.shape)}")
    size = normalize_size(size)
    for name, v in (("eps", eps), ("eps_low", eps_low)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
        if not v >= 0 or math.isinf(v):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if eps_low > eps:
        raise ValueError(f"eps_low must be <= eps, got eps_low={eps_low}, eps={eps}")
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str ('jet' or 'cam'), got {type(mode).__name__}")
    if mode not in ("jet", "cam"):
        raise ValueError(f"mode must be 'jet' or 'cam', got {mode!r}")
    return size
