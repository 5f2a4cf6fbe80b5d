"""Section 1: what the machine is and which backends loaded (and why one did not)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess

import torch

from .. import ops
from .runner import Context


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - a broken Triton raises anything: then there is no version to show
        return None


def driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi (torch does not expose it), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def backend_status(device: torch.device) -> dict:
    """Each backend: usable on `device` or the reason it is not."""
    usable = ops.available_backends(device)
    triton_error = ops.TRITON_ERROR
    why = {}
    for name in ops.BACKENDS:
        if name in usable:
            why[name] = "usable"
        elif name in ("cpu", "cuda") and ops.EXTENSION_ERROR is not None:
            why[name] = f"extension not loaded: {ops.EXTENSION_ERROR!r}"
        elif name == "cuda" and isinstance(ops.CUDA_EXTENSION_ERROR, ModuleNotFoundError):
            why[name] = "part_fast was built without CUDA kernels (no CUDA toolkit at build time, or no FORCE_CUDA=1)"
        elif name == "cuda" and ops.CUDA_EXTENSION_ERROR is not None:
            why[name] = f"CUDA kernels not loaded: {ops.CUDA_EXTENSION_ERROR!r}"
        elif name == "triton" and triton_error is not None:
            why[name] = f"part_fast.kernels not importable: {triton_error!r}"
        elif name == "triton" and device.type == "cpu":
            why[name] = "Triton runs on the CPU only under TRITON_INTERPRET=1 (a correctness tool)"
        else:
            why[name] = f"does not run {device.type} tensors"
    return why


def run(ctx: Context, check) -> None:
    device = ctx.device

    def versions():
        data = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version(),
                "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if ctx.cuda else None,
                "driver": driver_version() if ctx.cuda else None, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads()}
        figure = (f"torch {data['torch']}, triton {data['triton'] or 'not installed'}, CUDA runtime "
                  f"{data['cuda_runtime'] or 'none'}, driver {data['driver'] or 'n/a'}, Python {data['python']}")
        return None, figure, data

    def gpu():
        if not ctx.cuda:
            return None, f"no GPU used: {cpu_model()}, {torch.get_num_threads()} threads", {}
        p = torch.cuda.get_device_properties(device)
        data = {"name": p.name, "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "arch_list": torch.cuda.get_arch_list()}
        return None, (f"{p.name}, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}, "
                      f"{data['memory_gib']} GiB"), data

    def backends():
        why = backend_status(device)
        usable = [n for n, w in why.items() if w == "usable"]
        # On a GPU every fast backend must be there: a missing one is what this command exists to catch.
        wanted = ["cuda", "triton"] if ctx.cuda else ["cpu"]
        missing = [n for n in wanted if n not in usable]
        figure = f"usable on {device.type}: {', '.join(usable)}" + "".join(
            f"; {n}: {w}" for n, w in why.items() if w != "usable")
        return not missing, figure, {"status": why, "missing": missing}

    check("versions", versions)
    check("GPU", gpu)
    check("backends loaded", backends)
