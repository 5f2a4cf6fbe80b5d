"""The fused ops of part_fast: validated wrappers that run each op on the backend part_fast.backends
chooses, the fake kernels that let torch.compile trace them, and the Triton kernels registered as ops.

Ops (all tensors in, tensors out; nothing here knows of models):
  pgd_step_(x_adv, grad, x_nat, eps, step_size, lo=0.0, hi=1.0) -> x_adv   (in place)
  project_(x_adv, x_nat, eps, lo=0.0, hi=1.0) -> x_adv                      (in place)
  cam_eps_map(cam, size, eps, eps_low, mode="jet") -> Tensor

The backend names, PART_FAST_BACKEND, use_backend and the load errors (EXTENSION_ERROR,
CUDA_EXTENSION_ERROR, TRITON_ERROR) live in part_fast.backends and are re-exported here.
"""
from __future__ import annotations

import torch

from . import _validate, backends, reference
from .backends import (BACKENDS, CUDA_EXTENSION_ERROR, EXTENSION_ERROR, TORCH_FLOOR,  # noqa: F401  re-exported
                       available_backends, select_backend, use_backend)


def __getattr__(name: str):
    # TRITON_ERROR is only known once the import of part_fast.kernels has been tried: reading it tries it.
    if name == "TRITON_ERROR":
        return backends.TRITON_ERROR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



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

    One PGD step with a per-pixel budget, in one pass over memory. sign(NaN) = 0; half types are computed in
    float32 and rounded once.

    Args:
        x_adv: the adversarial batch, updated in place; float32 / float16 / bfloat16 (float64 on the CPU).
        grad: the loss gradient with respect to x_adv; same shape, dtype and memory layout.
        x_nat: the clean batch; same shape, dtype and layout.
        eps: a float, or a tensor broadcastable to x_adv (e.g. (B,1,H,W), (B,C,H,W), (1,C,1,1)), any strides.
        step_size: the step along sign(grad).
        lo, hi: the valid input range.

    Returns:
        x_adv (the same tensor).

    Shape:
        x_adv, grad, x_nat: (B, C, H, W), contiguous or channels_last, all three alike.
    """
    backend = select_backend(_validate.device_of(x_adv, "x_adv"))
    if backend in ("cpu", "cuda"):
        eps_map, eps_value = _split_eps(eps)
        _validate.validate_kernel_dtypes(x_adv, (("grad", grad), ("x_nat", x_nat)), eps_map)
        torch.ops.part_fast.pgd_step_(
            x_adv, grad, x_nat, eps_map, eps_value, _scalar("step_size", step_size), _scalar("lo", lo), _scalar("hi", hi)
        )
    elif backend == "triton":
        eps_map, eps_value = _split_eps(eps)
        torch.ops.part_fast.triton_pgd_step_(
            x_adv, grad, x_nat, eps_map, eps_value, _scalar("step_size", step_size), _scalar("lo", lo), _scalar("hi", hi)
        )
    else:
        reference.pgd_step_(x_adv, grad, x_nat, eps, step_size, lo, hi)
    return x_adv


def project_(x_adv, x_nat, eps, lo=0.0, hi=1.0):
    """In place: x_adv <- clip(clamp(x_adv, x_nat - eps, x_nat + eps), lo, hi): pgd_step_ without the step.

    Args:
        x_adv: the batch to project, updated in place; float32 / float16 / bfloat16 (float64 on the CPU).
        x_nat: the clean batch; same shape, dtype and memory layout.
        eps: a float, or a tensor broadcastable to x_adv, any strides.
        lo, hi: the valid input range.

    Returns:
        x_adv (the same tensor).

    Shape:
        x_adv, x_nat: (B, C, H, W), contiguous or channels_last, both alike.
    """
    backend = select_backend(_validate.device_of(x_adv, "x_adv"))
    if backend in ("cpu", "cuda"):
        eps_map, eps_value = _split_eps(eps)
        _validate.validate_kernel_dtypes(x_adv, (("x_nat", x_nat),), eps_map)
        torch.ops.part_fast.project_(x_adv, x_nat, eps_map, eps_value, _scalar("lo", lo), _scalar("hi", hi))
    elif backend == "triton":
        eps_map, eps_value = _split_eps(eps)
        torch.ops.part_fast.triton_project_(x_adv, x_nat, eps_map, eps_value, _scalar("lo", lo), _scalar("hi", hi))
    else:
        reference.project_(x_adv, x_nat, eps, lo, hi)
    return x_adv


def cam_eps_map(cam, size, eps, eps_low, mode="jet"):
    """Raw CAM -> per-pixel budget in one pass: upsampling, normalisation and the eps / eps_low choice.

    Args:
        cam: raw class activation maps (ReLU and min-max are applied here); float32 / float16 / bfloat16
            (float64 on the CPU).
        size: the image size (H, W), or an int for a square image.
        eps: the budget of the pixels the mask selects.
        eps_low: the budget of the others, 0 <= eps_low <= eps.
        mode: "jet" (the released mask: bicubic upsampling, matplotlib's jet colours, standardised per
            channel, docs/method.md §3) or "cam" (the map itself, channel-shared, as the paper's prose).

    Returns:
        A new float32 tensor of eps and eps_low values.

    Shape:
        cam: (B, h, w) -> (B, 3, H, W) for mode "jet", (B, 1, H, W) for mode "cam".
    """
    backend = select_backend(_validate.device_of(cam, "cam"))
    if backend == "reference":
        return reference.cam_eps_map(cam, size, eps, eps_low, mode)
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str ('jet' or 'cam'), got {type(mode).__name__}")
    if backend == "triton":
        op = torch.ops.part_fast.triton_cam_eps_map
    else:
        _validate.validate_kernel_dtypes(cam, ())
        op = torch.ops.part_fast.cam_eps_map
    return op(cam, list(_validate.normalize_size(size)), _scalar("eps", eps), _scalar("eps_low", eps_low), mode)


# ------------------------------------------------------------------------------ fake kernels
# Shape-only implementations so the ops trace under torch.compile(fullgraph=True) and FakeTensor.
if EXTENSION_ERROR is None:

    # The checks matter beyond tracing: a call mixing a real tensor with a meta one dispatches here.
    def _validate_fake_operands(x_adv, others, eps_map):
        for name, t in others + [("eps", eps_map)]:
            if t is None:
                continue
            if t.device != x_adv.device:
                raise ValueError(f"{name} must be on x_adv's device {x_adv.device}, got {t.device}")
            if name != "eps" and t.shape != x_adv.shape:
                raise ValueError(f"{name} must have the same shape as x_adv {tuple(x_adv.shape)}, got {tuple(t.shape)}")

    @torch.library.register_fake("part_fast::pgd_step_")
    def _pgd_step_fake(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi):
        _validate_fake_operands(x_adv, [("grad", grad), ("x_nat", x_nat)], eps_map)

    @torch.library.register_fake("part_fast::project_")
    def _project_fake(x_adv, x_nat, eps_map, eps, lo, hi):
        _validate_fake_operands(x_adv, [("x_nat", x_nat)], eps_map)

    @torch.library.register_fake("part_fast::cam_eps_map")
    def _cam_eps_map_fake(cam, size, eps, eps_low, mode):
        torch._check(cam.dim() == 3, lambda: f"cam must be 3-D (B, h, w), got shape {tuple(cam.shape)}")
        torch._check(mode in ("jet", "cam"), lambda: f"mode must be 'jet' or 'cam', got {mode!r}")
        channels = 3 if mode == "jet" else 1
        return cam.new_empty((cam.shape[0], channels, size[0], size[1]), dtype=torch.float32)


# ------------------------------------------------------------------------------------ Triton ops
# The Triton launchers registered as custom ops, part_fast::triton_<op> with the schema of the C++ op:
# torch.compile then sees one opaque op per call, as for the compiled backends, instead of tracing into
# the launcher (which it cannot do under TRITON_INTERPRET=1: the interpreter's launcher calls
# UntypedStorage.data_ptr, which Dynamo does not trace), and torch.library.opcheck can check them. The
# argument checks run in the op and in its fake kernel, so a bad call fails before any launch, while
# tracing under torch.compile too. float64 is CPU-only, as for the C++ ops.


def _loaded_triton_kernels():
    kernels = backends._triton_kernels()
    if kernels is None:
        raise RuntimeError(f"the Triton backend is not available: part_fast.kernels failed to import ({_triton_error!r})")
    return kernels


def _validate_triton_attack_args(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi):
    _validate.validate_attack_tensors(x_adv, grad, x_nat, allow_float64=x_adv.device.type == "cpu")
    _validate.validate_eps(eps if eps_map is None else eps_map, x_adv)
    _validate.validate_scalars(step_size, lo, hi)


@torch.library.custom_op("part_fast::triton_pgd_step_", mutates_args=("x_adv",))
def _triton_pgd_step(
    x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps_map: torch.Tensor | None, eps: float,
    step_size: float, lo: float, hi: float,
) -> None:
    _validate_triton_attack_args(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi)
    budget = eps if eps_map is None else eps_map
    _loaded_triton_kernels().pgd_step.pgd_step_(x_adv, grad, x_nat, budget, step_size, lo, hi)


@_triton_pgd_step.register_fake
def _triton_pgd_step_fake(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi):
    _validate_triton_attack_args(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi)


@torch.library.custom_op("part_fast::triton_project_", mutates_args=("x_adv",))
def _triton_project(
    x_adv: torch.Tensor, x_nat: torch.Tensor, eps_map: torch.Tensor | None, eps: float, lo: float, hi: float
) -> None:
    _validate_triton_attack_args(x_adv, None, x_nat, eps_map, eps, 0.0, lo, hi)
    budget = eps if eps_map is None else eps_map
    _loaded_triton_kernels().pgd_step.project_(x_adv, x_nat, budget, lo, hi)


@_triton_project.register_fake
def _triton_project_fake(x_adv, x_nat, eps_map, eps, lo, hi):
    _validate_triton_attack_args(x_adv, None, x_nat, eps_map, eps, 0.0, lo, hi)


@torch.library.custom_op(
    "part_fast::triton_cam_eps_map", mutates_args=(),
    schema="(Tensor cam, SymInt[2] size, float eps, float eps_low, str mode) -> Tensor",
)
def _triton_cam_eps_map(cam: torch.Tensor, size: list[int], eps: float, eps_low: float, mode: str) -> torch.Tensor:
    out_size = _validate.validate_cam_args(cam, size, eps, eps_low, mode, allow_float64=cam.device.type == "cpu")
    return _loaded_triton_kernels().cam_eps_map.cam_eps_map(cam, out_size, eps, eps_low, mode)


@_triton_cam_eps_map.register_fake
def _triton_cam_eps_map_fake(cam, size, eps, eps_low, mode):
    height, width = _validate.validate_cam_args(cam, size, eps, eps_low, mode, allow_float64=cam.device.type == "cpu")
    channels = 3 if mode == "jet" else 1
    return cam.new_empty((cam.shape[0], channels, height, width), dtype=torch.float32)
