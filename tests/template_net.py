"""A classifier whose robustness is known exactly, for tests of AutoAttack and the evaluation protocols.

A one-layer CNN whose filters are +-1 templates T_c covering the whole image (logit_c = <T_c, x - 0.5>), and
each example is x = 0.5 + a T_y. Its clean margin against class c is a ||T_y - T_c||_1 and an L-inf
perturbation of size eps moves that margin by at most eps ||T_y - T_c||_1: an example is robust exactly when
a > eps, correct exactly when a > 0. Any sound attack finds the (easy) worst case of the others."""
from __future__ import annotations

import torch
from torch import nn


class TemplateNet(nn.Module):
    def __init__(self, templates, scale: float = 1.0, record: bool = False):
        """scale multiplies every logit (no prediction or robustness changes): large images need it below 1,
        or the cross-entropy saturates and its input gradient is exactly zero on the robust examples.
        record: keep the input of every no-grad forward in .scored (AutoAttack's Square makes thousands)."""
        super().__init__()
        self.conv = nn.Conv2d(3, templates.shape[0], templates.shape[-1])
        with torch.no_grad():
            self.conv.weight.copy_(scale * templates)
            self.conv.bias.copy_(-0.5 * scale * templates.sum((1, 2, 3)))  # logit_c = scale <T_c, x - 0.5>
        self.calls = 0
        self.record = record
        self.scored = []  # with record: the inputs of no-grad forwards (evaluate's accuracy counts)

    def forward(self, x):
        self.calls += 1
        if self.record and not torch.is_grad_enabled():
            self.scored.append(x.detach().clone())
        return self.conv(x).flatten(1)


def templates(num_classes=10, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (num_classes, 3, size, size), generator=gen) * 2 - 1).float()


def examples(t, y, a):
    """x = 0.5 + a T_y for labels y (N,) and amplitudes a (N,)."""
    return 0.5 + a.view(-1, 1, 1, 1) * t[y]
