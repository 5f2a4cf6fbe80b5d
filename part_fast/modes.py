"""Model-mode and grad-mode handling shared by the CAM and the attacks."""
from __future__ import annotations

import contextlib

import torch
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


def validate_grad_possible(what: str) -> None:
    """A clear error where autograd's would be opaque: no gradient can be taken under inference_mode."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what}: call them outside torch.inference_mode()")
