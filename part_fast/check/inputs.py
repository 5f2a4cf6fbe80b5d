"""Fresh inputs for the op checks, made on the CPU from a seeded generator (so the reference sees the same
values) and moved to the device with their exact strides (tests/conftest.py uses the same helper)."""
from __future__ import annotations

import torch

EPS, EPS_LOW, STEP = 8 / 255, 2 / 255, 2 / 255
LAYOUTS = ("contiguous", "channels_last")
EPS_FORMS = ("scalar", "zero", "b1hw", "bchw", "1c11", "strided", "expanded")


def same_strides_on(t, device: torch.device):
    """`t` on `device` with the same sizes, strides and storage offset (Tensor.to makes a non-dense tensor
    contiguous, which would hide exactly the strided budgets a kernel must walk). Non-tensors pass through."""
    if not isinstance(t, torch.Tensor) or t.device == torch.device(device):
        return t
    broadcast = [d for d in range(t.dim()) if t.stride(d) == 0 and t.size(d) > 1]
    base = t
    for d in broadcast:
        base = base.narrow(d, 0, 1)
    span = 1 + sum((s - 1) * st for s, st in zip(base.shape, base.stride()) if s > 0) if base.numel() else 0
    storage = torch.empty(base.storage_offset() + span, dtype=t.dtype, device=device)
    moved = storage.as_strided(base.shape, base.stride(), base.storage_offset())
    moved.copy_(base)
    return moved.expand(t.shape) if broadcast else moved


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def attack_inputs(shape, dtype, layout, gen: torch.Generator, nan_grad: bool = True):
    """x_adv, grad, x_nat on the CPU: x_nat in [0, 1]; x_adv around it, partly outside the ball and the box;
    a gradient with zeros, -0.0, +-inf and (nan_grad) NaN, whose sign the op takes as 0."""
    x_nat = torch.rand(shape, generator=gen)
    x_adv = x_nat + (4 * torch.rand(shape, generator=gen) - 2) * EPS
    grad = torch.randn(shape, generator=gen)
    flat = grad.view(-1)
    n = flat.numel()
    picks = torch.randint(0, n, (max(1, n // 50),), generator=gen)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf")] + ([float("nan")] if nan_grad else []))
    flat[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    return tuple(to_layout(t.to(dtype), layout) for t in (x_adv, grad, x_nat))


def make_eps(form: str, shape, layout: str, gen: torch.Generator):
    """A budget in one of the forms the ops accept (a float, or a tensor broadcastable to x)."""
    b, c, h, w = shape

    def mixed(size):
        return torch.where(torch.rand(size, generator=gen) < 0.5, EPS, EPS_LOW).to(torch.float32)

    if form == "scalar":
        return EPS
    if form == "zero":
        return 0.0
    if form == "b1hw":
        return mixed((b, 1, h, w))
    if form == "bchw":
        return to_layout(mixed(shape), layout)
    if form == "1c11":
        return mixed((1, c, 1, 1))
    if form == "strided":
        return mixed((b, c, h, 2 * w))[..., ::2]
    if form == "expanded":
        return mixed((b, 1, 1, 1)).expand(b, c, h, w)
    raise ValueError(f"unknown eps form {form!r}")


def update_inputs(shape: tuple, eps_channels: int, device, seed: int = 0, dtype=torch.float32):
    """[x_adv, grad, x_nat, eps] for timing an update (the benchmark harness's and the check's): x_adv inside
    the eps ball around x_nat in [0, 1], a mixed EPS / EPS_LOW float32 budget (B, eps_channels, H, W), a dense
    random gradient, so every clamp of the step does real work."""
    gen = torch.Generator().manual_seed(seed)
    batch, _, height, width = shape
    x_nat = torch.rand(shape, generator=gen)
    eps = torch.where(torch.rand((batch, eps_channels, height, width), generator=gen) < 0.5, EPS, EPS_LOW)
    x_adv = (x_nat + (2 * torch.rand(shape, generator=gen) - 1) * eps).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    return [t.to(device, dtype) for t in (x_adv, grad, x_nat)] + [eps.to(device)]


def cam_inputs(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Raw CAMs (B, h, w) with the degenerate images every batch can hold: a constant map and one with a
    NaN (both give eps_low everywhere), next to ordinary ones."""
    cam = torch.randn(shape, generator=gen)
    if shape[0] >= 3:
        cam[1] = 0.25
        cam[2].view(-1)[0] = float("nan")
    return cam.to(dtype)
