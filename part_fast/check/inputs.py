"""Fresh inputs for the op checks, made on the CPU from a seeded generator (so the reference sees the same
values) and moved to the device with their exact strides (tests/conftest.py uses the same helper)."""
from __future__ import annotations

import torch

EPS, EPS_LOW, STEP = 8 / 255, 2 / 255, 2 / 255
LAYOUTS = ("contiguous", "channels_last")

# Every form a budget can take (the one vocabulary of the check, the tests and the benchmarks): Python
# numbers, and float tensors broadcastable to x_adv with every shape, layout and stride the ops accept.
EPS_FORMS = (
    "scalar",  # a Python float
    "int",  # a Python int
    "zero",  # 0.0: the update collapses to clip(x_nat)
    "bchw",  # the jet mask's shape, float32, in x_adv's layout
    "bchw_xdtype",  # ... in x_adv's dtype instead of float32
    "b1hw",  # the channel-shared "cam" mask
    "1c11",
    "c11",  # fewer dims than x_adv
    "hw",
    "b111",
    "0d",
    "bchw_channels_last",  # channels_last whatever x_adv's layout
    "bchw_contiguous",  # contiguous whatever x_adv's layout
    "expanded",  # stride-0 dims
    "strided",  # a non-contiguous slice
    "transposed",
    "with_zeros",  # a tensor budget that is exactly 0 at some pixels
)
# The forms `part-fast check` runs on a device: one of each kind of walk a kernel does.
CHECK_EPS_FORMS = ("scalar", "zero", "b1hw", "bchw", "1c11", "strided", "expanded")


def distinct_eps_forms(layout: str) -> tuple[str, ...]:
    """EPS_FORMS less the one that is "bchw" itself in `layout` (the same tensor, the same case)."""
    same = "bchw_channels_last" if layout == "channels_last" else "bchw_contiguous"
    return tuple(f for f in EPS_FORMS if f != same)


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
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def attack_inputs(shape, dtype, layout, gen: torch.Generator, nan_grad: bool = True):
    """x_adv, grad, x_nat on the CPU: x_nat in [0, 1]; x_adv = x_nat + noise of up to 2 EPS (partly outside the
    ball and the box); a standard normal gradient with 5 % exact zeros, 1 % -0.0, 2 % +inf, 2 % -inf and
    (nan_grad) 3 % NaN, whose sign the op takes as 0."""
    x_nat = torch.rand(shape, generator=gen, dtype=torch.float64)
    x_adv = x_nat + (4 * torch.rand(shape, generator=gen, dtype=torch.float64) - 2) * EPS
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    for low, high, value in ((0.0, 0.05, 0.0), (0.05, 0.06, -0.0), (0.06, 0.08, float("inf")),
                             (0.08, 0.10, -float("inf")), (0.10, 0.13 if nan_grad else 0.10, float("nan"))):
        grad = torch.where((u >= low) & (u < high), torch.full_like(grad, value), grad)
    return tuple(to_layout(t.to(dtype), layout) for t in (x_adv, grad, x_nat))


def make_eps(form: str, shape, layout: str, gen: torch.Generator, dtype: torch.dtype = torch.float32):
    """A budget in `form` (one of EPS_FORMS) for an x_adv of `shape` in `layout`: tensor budgets are drawn
    uniformly in [0, 2 EPS), float32 except "bchw_xdtype" (`dtype`, x_adv's)."""
    b, c, h, w = shape

    def budget(size, dt=torch.float32):
        return (torch.rand(size, generator=gen, dtype=torch.float64) * 2 * EPS).to(dt)

    forms = {
        "scalar": lambda: EPS,
        "int": lambda: 1,
        "zero": lambda: 0.0,
        "bchw": lambda: to_layout(budget(shape), layout),
        "bchw_xdtype": lambda: to_layout(budget(shape, dtype), layout),
        "b1hw": lambda: budget((b, 1, h, w)),
        "1c11": lambda: budget((1, c, 1, 1)),
        "c11": lambda: budget((c, 1, 1)),
        "hw": lambda: budget((h, w)),
        "b111": lambda: budget((b, 1, 1, 1)),
        "0d": lambda: budget(()),
        "bchw_channels_last": lambda: budget(shape).contiguous(memory_format=torch.channels_last),
        "bchw_contiguous": lambda: budget(shape).contiguous(),
        "expanded": lambda: budget((b, 1, 1, 1)).expand(b, c, h, w),
        "strided": lambda: budget((b, c, h, 2 * w))[..., ::2],
        "transposed": lambda: budget((b, c, w, h)).transpose(2, 3),
        "with_zeros": lambda: torch.where(torch.rand(shape, generator=gen) < 0.3, 0.0, budget(shape)),
    }
    if form not in forms:
        raise ValueError(f"unknown eps form {form!r}; one of {EPS_FORMS}")
    return forms[form]()


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
