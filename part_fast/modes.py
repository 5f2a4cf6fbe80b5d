"""Model-mode handling shared by the CAM and the attacks."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside the block; afterwards every submodule gets its own mode back (a model in train
    mode with a frozen, eval-mode BatchNorm keeps it frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
