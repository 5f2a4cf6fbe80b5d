"""Adversarial weight perturbation (AWP, Wu et al. 2020, csdongxian/AWP): the update's gradient is taken at
weights pushed uphill on the batch's adversarial loss.

Each step, after the attack:

1. A proxy copy of the model (train mode; its BatchNorm statistics are thrown away) computes the method's
   outer loss on the batch's adversarial examples (built with the PART budget in PART epochs) and its
   gradient g_l for every weight tensor of two or more dimensions (convolutions, linear layers; biases and
   BatchNorm are not perturbed, as released). Under DDP the gradient is averaged over the ranks, so the
   perturbation is that of the global batch and the same on every rank.
2. v_l = gamma * ||w_l|| * g_l / ||g_l||: each layer moves by gamma of its own norm (the release's one
   proxy SGD step, normalised per layer, is exactly this direction).
3. The update's forward / backward runs at w + v; then the weights are restored from a copy (bit-exact,
   where subtracting v again would round) and the optimiser steps from w with that gradient. (The release
   steps at w + v and subtracts v afterwards; stepping from w keeps the perturbation out of the weight decay
   and the momentum buffer's weights, and the restore exact.)
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
from torch import nn

from .distributed import Distributed


def perturbed_names(model: nn.Module) -> list[str]:
    """The parameters AWP perturbs: every weight tensor of 2+ dimensions."""
    return [name for name, p in model.named_parameters() if p.dim() > 1 and name.endswith("weight")]


class WeightPerturbation:
    """AWP for one model.

    Args:
        model: the trained model (the proxy is a copy of it, refreshed every step).
        gamma: the perturbation's size relative to each layer's weight norm (5e-3 in Wu et al.).
        ranks: the run's processes (the gradient is averaged over them).
    """

    def __init__(self, model: nn.Module, gamma: float, ranks: Distributed | None = None):
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma, self.ranks = gamma, ranks or Distributed()
        self.proxy = copy.deepcopy(model).train()
        self.names = perturbed_names(model)

    def perturbation(self, model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> list[torch.Tensor]:
        """v for each of `names`, from the gradient of `loss_of(proxy)` at `model`'s current weights.

        Args:
            model: the trained model, whose weights and buffers the proxy takes first.
            loss_of: proxy -> the batch's loss (the method's outer loss on the adversarial examples).

        Returns:
            One tensor per perturbed parameter (perturbed_names order), shaped like it."""
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train()
        params = dict(self.proxy.named_parameters())
        chosen = [params[n] for n in self.names]
        grads = torch.autograd.grad(loss_of(self.proxy), chosen, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(chosen, grads)]
        self.ranks.average_(grads)
        weights = dict(model.named_parameters())
        out = []
        for name, g in zip(self.names, grads):
            w = weights[name].detach()
            # (a layer with a zero gradient is not moved: the release's 1e-20 guard)
            out.append(g * (self.gamma * w.norm() / (g.norm() + 1e-20)))
        return out

    @contextlib.contextmanager
    def applied(self, model: nn.Module, perturbation: list[torch.Tensor]):
        """`model`'s weights at w + v inside the block; exactly w again after it (copied back, not subtracted)."""
        params = dict(model.named_parameters())
        chosen = [params[n] for n in self.names]
        saved = [p.detach().clone() for p in chosen]
        with torch.no_grad():
            torch._foreach_add_(chosen, perturbation)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(chosen, saved):
                    p.copy_(w)
