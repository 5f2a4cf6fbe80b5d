"""Which backend runs part_fast's ops: loading the compiled kernels, importing the Triton ones, and the
choice among what loaded.

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
    # stacklevel 3: the warning names the line that loads the kernels (`EXTENSION_ERROR, ... = _load_compiled()`
    # below), past this helper and _load_compiled
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

