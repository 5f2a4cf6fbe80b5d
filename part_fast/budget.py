"""The PART per-pixel budget: CAM of the exact batch being attacked -> eps where it matters, eps_low elsewhere."""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .cam import CAM_METHODS, compute_cam
from .eps_text import validate_budgets
from .errors import ConfigError

MASKS = ("jet", "cam")


class PixelBudget:
    """`PixelBudget(eps, eps_low, method, mask, layer)(model, x)` -> per-pixel eps map for the batch `x`.

    mask="jet" is the released mask, a per-colour-channel (B, 3, H, W) map (docs/method.md §3), exact given
    the same CAM (a batched forward can move a CAM by ~1e-6 from a per-image one, enough to flip a rare
    pixel at a colour-bin edge); mask="cam" is the channel-shared (B, 1, H, W) variant that follows the paper's
    prose. The map is computed from `x` itself, so it always belongs to the images it will attack
    (after augmentation): the release's mask/image misalignment cannot happen.

    Args:
        eps: the budget of the pixels the mask selects (inputs in [0, 1]: 8/255 is 8 / 255).
        eps_low: the budget of the others, 0 <= eps_low <= eps.
        method: the CAM ("gradcam", as released; see cam.CAM_METHODS).
        mask: "jet" or "cam", as above.
        layer: the module (or its name) whose (B, K, h, w) output the CAM reads; None finds it on known
            architectures (`layer4`, `block3`, `features`), and on any other model the error lists the
            modules with a 4-D output, deepest first.

    Shape:
        `__call__(model, x)`: x (B, C, H, W) -> eps map (B, 3, H, W) for mask "jet", (B, 1, H, W) for
        mask "cam", float32, every value eps or eps_low.
    """

    def __init__(self, eps: float = 8 / 255, eps_low: float = 7 / 255, method: str = "gradcam", mask: str = "jet",
                 layer: str | nn.Module | None = None):
        validate_budgets(eps, eps_low)
        if method not in CAM_METHODS:
            raise ConfigError(f"method must be one of {CAM_METHODS}, got {method!r}")
        if mask not in MASKS:
            raise ConfigError(f"mask must be one of {MASKS}, got {mask!r}")
        if layer is not None and not isinstance(layer, (str, nn.Module)):
            raise ConfigError(f"layer must be None, a module name or an nn.Module, "
                              f"got {type(layer).__name__} {layer!r}")
        self.eps, self.eps_low, self.method, self.mask, self.layer = float(eps), float(eps_low), method, mask, layer

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The eps map for the batch `x` (see the class's Shape): one CAM forward of `model` in eval mode."""
        return self.with_logits(model, x)[0]

    def with_logits(self, model: nn.Module, x: torch.Tensor):
        """(eps_map, eval-mode logits of x): the logits let a caller (TRADES) reuse this clean forward."""
        cam, logits = compute_cam(model, x, self.method, self.layer, target="pred", return_logits=True)
        return ops.cam_eps_map(cam, tuple(x.shape[-2:]), self.eps, self.eps_low, self.mask), logits

    def __repr__(self):
        return (f"PixelBudget(eps={self.eps:.6g}, eps_low={self.eps_low:.6g}, method={self.method!r}, "
                f"mask={self.mask!r}, layer={self.layer!r})")
