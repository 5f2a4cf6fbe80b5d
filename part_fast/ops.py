"""The fused ops of part_fast and the choice of backend that runs them.

Ops (all tensors in, tensors out; nothing here knows of models):
  pgd_step_(x_adv, grad, x_nat, eps, step_size, lo=0.0, hi=1.0) -> x_adv   (in place)
  project_(x_adv, x_nat, eps, lo=0.0, hi=1.0) -> x_adv                      (in place)
  cam_eps_map(cam, size, eps, eps_low, mode="jet") -> Tensor

Backends: "reference" (pure PyTorch, part_fast.reference), "cpu" and "cuda" (the compiled extension
part_fast._C, registered as torch.ops.part_fast.*), "triton" (part_fast.kernels; CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1). By default the fastest usable backend for the tensors' device runs;
PART_FAST_BACKEND=<name> or `use_backend(name)` forces one. The backend choice is the only global state.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import _checks, reference

BACKENDS = ("reference", "cpu", "cuda", "triton")

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.part_fast.*)

    EXTENSION_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or an OSError from a library the build linked against
    EXTENSION_ERROR = exc
    warnings.warn(
        f"part_fast: the compiled extension part_fast._C could not be loaded ({exc!r}); "
        "every op runs on the pure-PyTorch reference backend",
        RuntimeWarning,
        stacklevel=2,
    )


def _read_env_backend() -> str | None:
    name = os.environ.get("PART_FAST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"PART_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


_forced_backend: str | None = _read_env_backend()


def _registered_kernels() -> frozenset[str]:
    """Dispatch keys ("CPU", "CUDA") the loaded extension has kernels for, read once at import so that
    backend selection is plain Python that torch.compile traces as constants."""
    if EXTENSION_ERROR is not None:
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(key for key in ("CPU", "CUDA") if has("part_fast::pgd_step_", key))


_EXTENSION_KERNELS = _registered_kernels()


def _extension_has(dispatch_key: str) -> bool:
    return dispatch_key in _EXTENSION_KERNELS


_TRITON_UNSET = object()
_triton_module = _TRITON_UNSET


def _triton_kernels():
    """part_fast.kernels, or None when Triton cannot run here (imported on first use, then remembered)."""
    global _triton_module
    if _triton_module is _TRITON_UNSET:
        try:
            from . import kernels
        except Exception:  # triton missing or broken: the backend is simply not offered
            kernels = None
        _triton_module = kernels
    return _triton_module


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _usable(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device_type == "cpu" and _extension_has("CPU")
    if name == "cuda":
        return device_type == "cuda" and _extension_has("CUDA")
    if name == "triton":
        ok_device = device_type == "cuda" or (device_type == "cpu" and _triton_interpreted())
        return ok_device and _triton_kernels() is not None
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for tensors on `device` (default: the CPU, and CUDA when a GPU is visible)."""
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    return [name for name in BACKENDS if any(_usable(name, t) for t in types)]


# Preference when nothing is forced: compiled kernels first; interpreted Triton is never a default.
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def select_backend(device: torch.device) -> str:
    """The backend an op on `device` runs with now."""
    if _forced_backend is not None:
        if not _usable(_forced_backend, device.type):
            raise RuntimeError(
                f"backend {_forced_backend!r} is forced but not usable for {device.type} tensors; "
                f"usable: {available_backends(device)}"
            )
        return _forced_backend
    for name in _PREFERENCE.get(device.type, ("reference",)):
        if _usable(name, device.type):
            return name
    return "reference"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside the block (None restores automatic choice); errors if `name` is unknown."""
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    previous = _forced_backend
    _forced_backend = name
    try:
        yield
    finally:
        _forced_backend = previous


def _scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _split_eps(eps):
    """The schema's (eps_map, eps) pair: a tensor budget, or a scalar one."""
    if isinstance(eps, torch.Tensor):
        return eps, 0.0
    return None, _scalar("eps", eps)


def pgd_step_(x_adv, grad, x_nat, eps, step_size, lo=0.0, hi=1.0):
    """In place: x_adv <- clip(clamp(x_adv + step_size*sign(grad), x_nat - eps, x_nat + eps), lo, hi).

    eps: a float or a tensor broadcastable to x_adv (e.g. (B,1,H,W), (B,C,H,W), (1,C,1,1)).
    sign(NaN) = 0; half types are computed in float32. Returns x_adv."""
    backend = select_backend(_checks.device_of(x_adv, "x_adv"))
    if backend in ("cpu", "cuda"):
        eps_map, eps_value = _split_eps(eps)
        torch.ops.part_fast.pgd_step_(
            x_adv, grad, x_nat, eps_map, eps_value, _scalar("step_size", step_size), _scalar("lo", lo), _scalar("hi", hi)
        )
    elif backend == "triton":
        _checks.check_attack_tensors(x_adv, grad, x_nat, allow_float64=x_adv.device.type == "cpu")
        _checks.check_eps(eps, x_adv)
        _checks.check_scalars(step_size, lo, hi)
        _triton_kernels().pgd_step.pgd_step_(x_adv, grad, x_nat, eps, float(step_size), float(lo), float(hi))
    else:
        reference.pgd_step_(x_adv, grad, x_nat, eps, step_size, lo, hi)
    return x_adv


def project_(x_adv, x_nat, eps, lo=0.0, hi=1.0):
    """In place: x_adv <- clip(clamp(x_adv, x_nat - eps, x_nat + eps), lo, hi). Returns x_adv."""
    backend = select_backend(_checks.device_of(x_adv, "x_adv"))
    if backend in ("cpu", "cuda"):
        eps_map, eps_value = _split_eps(eps)
        torch.ops.part_fast.project_(x_adv, x_nat, eps_map, eps_value, _scalar("lo", lo), _scalar("hi", hi))
    elif backend == "triton":
        _checks.check_attack_tensors(x_adv, None, x_nat, allow_float64=x_adv.device.type == "cpu")
        _checks.check_eps(eps, x_adv)
        _checks.check_scalars(0.0, lo, hi)
        _triton_kernels().pgd_step.pgd_step_(x_adv, None, x_nat, eps, 0.0, float(lo), float(hi))
    else:
        reference.project_(x_adv, x_nat, eps, lo, hi)
    return x_adv


def cam_eps_map(cam, size, eps, eps_low, mode="jet"):
    """Raw CAM (B, h, w) -> per-pixel budget: (B, 3, H, W) float32 for mode "jet" (the released mask),
    (B, 1, H, W) for mode "cam" (channel-shared). `size` is (H, W) or an int."""
    backend = select_backend(_checks.device_of(cam, "cam"))
    if backend in ("cpu", "cuda"):
        if not isinstance(mode, str):
            raise TypeError(f"mode must be a str ('jet' or 'cam'), got {type(mode).__name__}")
        out_size = list(_checks.normalize_size(size))
        return torch.ops.part_fast.cam_eps_map(cam, out_size, _scalar("eps", eps), _scalar("eps_low", eps_low), mode)
    if backend == "triton":
        out_size = _checks.check_cam_args(cam, size, eps, eps_low, mode, allow_float64=cam.device.type == "cpu")
        return _triton_kernels().cam_eps_map.cam_eps_map(cam, out_size, float(eps), float(eps_low), mode)
    return reference.cam_eps_map(cam, size, eps, eps_low, mode)


# ------------------------------------------------------------------------------ fake kernels
# Shape-only implementations so the ops trace under torch.compile(fullgraph=True) and FakeTensor.
if EXTENSION_ERROR is None:

    # The checks matter beyond tracing: a call mixing a real tensor with a meta one dispatches here.
    def _check_fake_operands(x_adv, others, eps_map):
        for name, t in others + [("eps", eps_map)]:
            if t is None:
                continue
            if t.device != x_adv.device:
                raise ValueError(f"{name} must be on x_adv's device {x_adv.device}, got {t.device}")
            if name != "eps" and t.shape != x_adv.shape:
                raise ValueError(f"{name} must have the same shape as x_adv {tuple(x_adv.shape)}, got {tuple(t.shape)}")

    @torch.library.register_fake("part_fast::pgd_step_")
    def _pgd_step_fake(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi):
        _check_fake_operands(x_adv, [("grad", grad), ("x_nat", x_nat)], eps_map)
        return None

    @torch.library.register_fake("part_fast::project_")
    def _project_fake(x_adv, x_nat, eps_map, eps, lo, hi):
        _check_fake_operands(x_adv, [("x_nat", x_nat)], eps_map)
        return None

    @torch.library.register_fake("part_fast::cam_eps_map")
    def _cam_eps_map_fake(cam, size, eps, eps_low, mode):
        torch._check(cam.dim() == 3, lambda: f"cam must be 3-D (B, h, w), got shape {tuple(cam.shape)}")
        torch._check(mode in ("jet", "cam"), lambda: f"mode must be 'jet' or 'cam', got {mode!r}")
        channels = 3 if mode == "jet" else 1
        return cam.new_empty((cam.shape[0], channels, size[0], size[1]), dtype=torch.float32)
