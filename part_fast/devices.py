"""Which device a command runs on: `auto` (the default everywhere a device is taken) is the GPU when there
is one, else the CPU, as the release, timm and pytorch/examples do."""
from __future__ import annotations

import torch

from .errors import ConfigError

AUTO = "auto"


DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def parse_device(name: str | torch.device) -> torch.device | None:
    """The device a setting names, checked for its form only (None for 'auto', which is resolved where the
    work starts): 'cpu', 'cuda', 'cuda:N'. Any other name or device type is a ConfigError naming the forms."""
    if isinstance(name, torch.device):
        device = name
    elif name == AUTO:
        return None
    elif not isinstance(name, str):
        raise ConfigError(f"device must be {DEVICE_FORMS}, got {name!r}")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device must be {DEVICE_FORMS}, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be {DEVICE_FORMS}, got {str(name)!r} (part_fast runs on CPUs and CUDA GPUs)")
    return device


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' checked against this machine: a CUDA
    device on a machine without one is a ConfigError naming it."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(name)!r} requested but CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def describe_device(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H200)' / 'cpu (2 threads)': what a command prints when it starts."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
