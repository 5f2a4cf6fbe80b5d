"""Which device a command runs on: `auto` (the default everywhere a device is taken) is the GPU when there
is one, else the CPU, as the release, timm and pytorch/examples do."""
from __future__ import annotations

import torch

from .errors import ConfigError

AUTO = "auto"


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' and 'meta' as torch reads them,
    checked: a CUDA device on a machine without one is a ConfigError naming it."""
    if isinstance(name, torch.device):
        device = name
    elif not isinstance(name, str):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    elif name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def describe_device(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H200)' / 'cpu (2 threads)': what a command prints when it starts."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
