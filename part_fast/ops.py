"""The fused ops of part_fast and the choice of backend that runs them.

Ops (all tensors in, tensors out; nothing here knows of models):
  pgd_step_(x_adv, grad, x_nat, eps, step_size, lo=0.0, hi=1.0) -> x_adv   (in place)
  project_(x_adv, x_nat, eps, lo=0.0, hi=1.0) -> x_adv                      (in place)
  cam_eps_map(cam, size, eps, eps_low, mode="jet") -> Tensor

Backends: "reference" (pure PyTorch, part_fast.reference), "cpu" and "cuda" (the compiled kernels:
part_fast._C holds the op schemas and the CPU kernels, part_fast._C_cuda the CUDA kernels, registered as
torch.ops.part_fast.*), "triton" (part_fast.kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
By default the fastest usable backend for the tensors' device runs; PART_FAST_BACKEND=<name> (read at
import) forces one by default; `use_backend(name)` forces one inside a block, for the calling thread or
asyncio task only (a contextvars.ContextVar). The backend choice is the only state.

The compiled kernels use the LibTorch stable ABI, so one build loads on every torch from TORCH_FLOOR on.
torch's version is checked before any compiled library is loaded; a library that cannot load is reported
once, in one line (a RuntimeWarning naming the cause, what runs instead and how to fix it), and never takes
the rest down: without _C_cuda the CPU kernels still run, without either the package still imports.

EXTENSION_ERROR: why part_fast._C (schemas + CPU kernels) could not be loaded, or None.
CUDA_EXTENSION_ERROR: why part_fast._C_cuda could not be loaded, or None (also set, quietly, when torch
    has no CUDA or the build has no CUDA kernels).
TRITON_ERROR: why part_fast.kernels could not be imported, or None.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings

import torch

from . import _validate, reference

BACKENDS = ("reference", "cpu", "cuda", "triton")

# The LibTorch stable ABI version the kernels are built for (setup.py's TORCH_FLOOR): the oldest torch
# that can load them.
TORCH_FLOOR = (2, 10)
_INSTEAD = "CUDA tensors run on Triton where it is installed, the rest on the pure-PyTorch reference (slower)"


def _torch_version(text: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.13.0+cpu' or '2.15.0.dev20260101'."""
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _warn(message: str) -> None:
    # stacklevel 3: the line of the user's code whose import loaded part_fast.ops, not this file
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_compiled() -> tuple[BaseException | None, BaseException | None]:
    """Loads part_fast._C, then part_fast._C_cuda; returns (EXTENSION_ERROR, CUDA_EXTENSION_ERROR)."""
    floor = ".".join(map(str, TORCH_FLOOR))
    if _torch_version(torch.__version__) < TORCH_FLOOR:
        # Checked before loading anything: an older torch lacks the stable ABI's entry points.
        error = ImportError(f"torch {torch.__version__} is older than {floor}, the oldest the compiled kernels load on")
        _warn(f"part_fast: the compiled kernels need torch>={floor} (the LibTorch stable ABI), this is torch "
              f"{torch.__version__}: {_INSTEAD}; upgrade torch to use them")
        return error, error
    try:
        # Loading it registers torch.ops.part_fast.*. import_module rather than `from . import _C`: an
        # extension that was never built (PART_FAST_NO_EXTENSION=1) then reads "No module named
        # 'part_fast._C'" (ModuleNotFoundError, .name "part_fast._C"), not "cannot import name '_C'".
        importlib.import_module(f"{__package__}._C")
    except Exception as exc:  # noqa: BLE001  ImportError, or an OSError from a library it links against
        _warn(f"part_fast: the compiled kernels (part_fast._C) could not be loaded ({_one_line(exc)}): {_INSTEAD}; reinstall "
              "part_fast (the wheel, or `pip install --no-build-isolation .` from a checkout) to use them")
        return exc, exc
    if torch.version.cuda is None:  # a CPU-only torch: CUDA kernels could serve nothing
        return None, ImportError(f"torch {torch.__version__} has no CUDA")
    try:
        importlib.import_module(f"{__package__}._C_cuda")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}._C_cuda":
            raise
        return None, exc  # a build without CUDA kernels (no toolkit at build time): nothing to report
    except Exception as exc:  # noqa: BLE001  e.g. the CUDA runtime library of another CUDA major
        _warn(f"part_fast: the CUDA kernels (part_fast._C_cuda) could not be loaded ({_one_line(exc)}): CUDA tensors run on Triton "
              f"where it is installed, else on the reference; the CPU kernels are unaffected; install a part_fast "
              f"built for CUDA {torch.version.cuda} (the wheel's CUDA major must match torch's) to use them")
        return None, exc
    return None, None


EXTENSION_ERROR, CUDA_EXTENSION_ERROR = _load_compiled()


def _read_env_backend() -> str | None:
    name = os.environ.get("PART_FAST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"PART_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


# The backend forced for the current thread / asyncio task (None: automatic choice). A new thread starts
# from the default, PART_FAST_BACKEND. torch.compile traces ContextVar.get and guards on its value, so a
# compiled function recompiles when run under another forced backend, as for any other Python constant.
_ENV_BACKEND: str | None = _read_env_backend()
_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "part_fast_forced_backend", default=_ENV_BACKEND
)


def _forced_now() -> str | None:
    return _forced_backend.get()


if _torch_version(torch.__version__) < (2, 14):
    # Dynamo before torch 2.14 cannot trace ContextVar.get (a graph break, so fullgraph=True fails): there
    # the forced backend is read once per compile as a constant, and a function compiled under one forced
    # backend keeps it until torch.compiler.reset().
    _forced_now = torch.compiler.assume_constant_result(_forced_now)


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
_triton_error: Exception | None = None


def _triton_missing(exc: Exception) -> bool:
    """True when `exc` only says that Triton itself is not installed: an ordinary setup, not a bug."""
    return isinstance(exc, ModuleNotFoundError) and exc.name == "triton"


def _triton_kernels():
    """part_fast.kernels, or None when Triton cannot run here (imported on first use, then remembered).

    Triton not installed: the backend is quietly not offered (the reason is kept in TRITON_ERROR). Triton
    installed but the kernels failing to import is a bug: also kept, and reported as a RuntimeWarning."""
    global _triton_module, _triton_error
    if _triton_module is _TRITON_UNSET:
        try:
            from . import kernels
        except Exception as exc:  # noqa: BLE001  any failure, e.g. a RuntimeError from Triton finding no backend
            kernels = None
            _triton_error = exc
            if not _triton_missing(exc):
                warnings.warn(
                    f"part_fast: Triton is installed but part_fast.kernels could not be imported ({exc!r}); "
                    "the backend 'triton' is not offered",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _triton_module = kernels
    return _triton_module


def __getattr__(name: str):
    # TRITON_ERROR is only known once the import has been tried: reading it tries it.
    if name == "TRITON_ERROR":
        _triton_kernels()
        return _triton_error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """The backend an op on `device` runs with now (in this thread / task)."""
    forced = _forced_now()
    if forced is not None:
        if not _usable(forced, device.type):
            raise RuntimeError(
                f"backend {forced!r} is forced but not usable for {device.type} tensors; "
                f"usable: {available_backends(device)}"
            )
        return forced
    for name in _PREFERENCE.get(device.type, ("reference",)):
        if _usable(name, device.type):
            return name
    return "reference"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside the block (None restores automatic choice) for the calling thread or asyncio
    task; other threads keep theirs. Errors if `name` is unknown."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


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
        eps: the budget of the pixels the mask selects; eps_low: of the others.
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
    kernels = _triton_kernels()
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
