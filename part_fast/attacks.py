"""L-inf attacks with a per-pixel budget: tensors in, tensors out (no datasets, no trainer).

Every attack runs the model in eval mode (BatchNorm statistics untouched) and restores its mode, takes
gradients with respect to the input only (parameters never get a .grad), keeps x_adv and the budget in
float32 (a surrounding torch.autocast only changes the model's arithmetic), and updates x_adv with the
fused ops `pgd_step_` / `project_`. Losses are summed over the batch, so each example's gradient, and
so its adversarial example, does not depend on the batch it came in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .eps_text import validate_budget
from .errors import ConfigError
from .modes import validate_grad_possible, eval_mode

PGD_STARTS = ("uniform", "release", "normal", None)
LOSSES = ("ce", "kl", "cw")


def _validate_inputs(x: torch.Tensor, y: torch.Tensor | None):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating 4-D tensor (B, C, H, W) in [0, 1], got {getattr(x, 'shape', type(x))}")
    if y is not None and (y.dim() != 1 or y.shape[0] != x.shape[0]):
        raise ValueError(f"y must be a 1-D tensor of {x.shape[0]} labels, got shape {tuple(y.shape)}")


def same_layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Autograd may return a gradient in another memory layout than the input; the fused ops require one."""
    fmt = torch.channels_last if not like.is_contiguous() else torch.contiguous_format
    return grad if grad.is_contiguous(memory_format=fmt) else grad.contiguous(memory_format=fmt)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: the largest wrong logit minus the true one (> 0 means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return wrong - true


class PGD:
    """Projected gradient ascent in the per-pixel box [x - eps_map, x + eps_map] ∩ [lo, hi].

    start: "uniform" (x + U(-eps_map, eps_map), projected before the first gradient), "release" (the
    released code's start: x + U(-eps, eps) with the global eps, not clipped), "normal" (x + 0.001 N(0, 1),
    the TRADES/MART start, projected), or None (start at x).
    loss: "ce" (cross-entropy on the labels), "kl" (TRADES inner maximisation: KL from the model's clean
    prediction), "cw" (margin: largest wrong logit minus the true logit).

    Args:
        model: the classifier attacked, in eval mode during the attack (its mode restored).
        eps: the scalar budget (a call's eps_map overrides it).
        alpha: the step size.
        steps: how many steps.
        start, loss: as above.
        lo, hi: the valid input range ([0, 1]: then eps and alpha above 1 are refused as typos for k/255).

    Shape:
        `__call__(x, y)`: x (B, C, H, W), y (B,) int64 -> x_adv (B, C, H, W) float32, in x's memory layout.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 start: str | None = "uniform", loss: str = "ce", lo: float = 0.0, hi: float = 1.0):
        if start not in PGD_STARTS:
            raise ConfigError(f"start must be one of {PGD_STARTS}, got {start!r}")
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
        if (lo, hi) == (0.0, 1.0):  # inputs in [0, 1]: a budget or step above 1 is a typo for k/255
            validate_budget("eps", eps)
            validate_budget("alpha", alpha)
        elif not eps >= 0 or not alpha >= 0:
            raise ConfigError(f"eps and alpha must be >= 0, got eps={eps}, alpha={alpha}")
        if not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"steps must be an int >= 0, got {steps!r}")
        self.model, self.eps, self.alpha, self.steps = model, float(eps), float(alpha), steps
        self.start, self.loss, self.lo, self.hi = start, loss, float(lo), float(hi)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, eps_map=None,
                 generator: torch.Generator | None = None, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples for (x, y).

        Args:
            x: the clean batch; y: its labels (not needed for loss "kl").
            eps_map: the per-pixel budget, any form pgd_step_ accepts (e.g. PixelBudget's map); overrides eps.
            generator: the random start's generator (None: torch's global one).
            clean_logits: for loss "kl", the eval-mode logits of x if the caller already has them (the PART
                budget's CAM forward), which saves the attack its own clean forward.

        Returns:
            x_adv, float32, within the budget of x and within [lo, hi].
        """
        _validate_inputs(x, y)
        if y is None and self.loss != "kl":
            raise ValueError(f"loss {self.loss!r} needs the labels y")
        x_nat = x.detach().float()
        budget = self.eps if eps_map is None else eps_map
        with eval_mode(self.model):
            p_nat = None
            if self.loss == "kl":
                if clean_logits is None:
                    with torch.no_grad():
                        clean_logits = self.model(x_nat)
                elif clean_logits.shape[0] != x.shape[0] or clean_logits.dim() != 2:
                    raise ValueError(f"clean_logits must be (B, classes) with B={x.shape[0]}, got {tuple(clean_logits.shape)}")
                p_nat = F.softmax(clean_logits.detach().float(), dim=1)
            x_adv = self._start(x_nat, budget, generator)
            for _ in range(self.steps):
                grad = self._input_gradient(x_adv, y, p_nat)
                ops.pgd_step_(x_adv, grad, x_nat, budget, self.alpha, self.lo, self.hi)
        return x_adv

    def _start(self, x_nat, budget, generator):
        # x_adv is a copy of x_nat (same memory layout) moved in place, so the fused ops see one layout.
        x_adv = x_nat.clone()
        if self.start is None:
            return x_adv
        if self.start == "normal":
            x_adv.add_(torch.randn(x_nat.shape, device=x_nat.device, generator=generator), alpha=0.001)
            return ops.project_(x_adv, x_nat, budget, self.lo, self.hi)
        unit = 2 * torch.rand(x_nat.shape, device=x_nat.device, generator=generator) - 1
        if self.start == "release":
            return x_adv.add_(unit, alpha=self.eps)  # the release: global eps, no clip before the first gradient
        return ops.project_(x_adv.add_(unit * budget), x_nat, budget, self.lo, self.hi)

    def _input_gradient(self, x_adv, y, p_nat):
        validate_grad_possible("attacks need input gradients")
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():  # an attack called inside torch.no_grad() still needs its input gradient
            logits = self.model(x_adv).float()
            if self.loss == "ce":
                loss = F.cross_entropy(logits, y, reduction="sum")
            elif self.loss == "kl":
                loss = F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")
            else:
                loss = margin(logits, y).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        return same_layout(grad, x_adv)


class MMA:
    """Minimum-margin attack (Gao et al., ICML 2022): a targeted margin PGD toward each of the k most
    likely wrong classes, keeping per example the adversarial example with the largest wrong-minus-true
    margin.

    Args:
        model: the classifier attacked.
        eps, alpha, steps, start, lo, hi: as PGD's.
        k: how many of the most likely wrong classes are targeted.
        confidence: the lead over the true logit the targeted loss asks for; it stops pushing beyond it.

    Shape:
        `__call__(x, y, eps_map=None, generator=None)`: x (B, C, H, W), y (B,) -> x_adv (B, C, H, W) float32.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 20, k: int = 3,
                 confidence: float = 50.0, start: str | None = "uniform", lo: float = 0.0, hi: float = 1.0):
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be an int >= 1, got {k!r}")
        self.pgd = PGD(model, eps, alpha, steps, start, "ce", lo, hi)
        self.model, self.k, self.confidence = model, k, float(confidence)

    def __call__(self, x, y, eps_map=None, generator=None):
        _validate_inputs(x, y)
        if y is None:
            raise ValueError("MMA needs the labels y")
        x_nat = x.detach().float()
        budget = self.pgd.eps if eps_map is None else eps_map
        with eval_mode(self.model):
            with torch.no_grad():
                clean = self.model(x_nat).float()
            k = min(self.k, clean.shape[1] - 1)
            targets = clean.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices
            best = x_nat.clone()
            best_margin = torch.full((x.shape[0],), float("-inf"), device=x.device)
            for j in range(k):
                x_adv = self._targeted(x_nat, y, targets[:, j], budget, generator)
                with torch.no_grad():
                    m = margin(self.model(x_adv).float(), y)
                better = m > best_margin
                best[better] = x_adv[better]
                best_margin = torch.where(better, m, best_margin)
        return best

    def _targeted(self, x_nat, y, target, budget, generator):
        pgd = self.pgd
        x_adv = pgd._start(x_nat, budget, generator)
        for _ in range(pgd.steps):
            validate_grad_possible("attacks need input gradients")
            x_var = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(x_var).float()
                true = logits.gather(1, y[:, None]).squeeze(1)
                other = logits.gather(1, target[:, None]).squeeze(1)
                # CW-style targeted loss: push the target logit above the true one by `confidence`, then stop.
                loss = -torch.clamp(true - other + self.confidence, min=0).sum()
            (grad,) = torch.autograd.grad(loss, x_var)
            grad = same_layout(grad, x_adv)
            ops.pgd_step_(x_adv, grad, x_nat, budget, pgd.alpha, pgd.lo, pgd.hi)
        return x_adv
