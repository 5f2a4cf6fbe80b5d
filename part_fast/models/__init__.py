"""Bundled models (standard CIFAR definitions, inputs in [0, 1]) and any torchvision classifier by name.

A normalisation layer, when wanted, belongs inside the model (`with_normalization`), never in the data."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..extras import require
from .cnn_small import cnn_small
from .resnet import preact_resnet18, resnet18, resnet_small
from .wide_resnet import wrn34_10

BUNDLED = {"resnet18": resnet18, "preact-resnet18": preact_resnet18, "wrn34-10": wrn34_10, "cnn-small": cnn_small,
           "resnet-small": resnet_small}

# The layer whose activations the CAM reads, per bundled architecture (the release's choice).
CAM_LAYERS = {"resnet18": "layer4", "preact-resnet18": "layer4", "wrn34-10": "block3", "cnn-small": "features",
              "resnet-small": "layer4"}


class Normalize(nn.Module):
    """(x - mean) / std per channel, as the first layer of a model that expects normalised inputs."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def with_normalization(model: nn.Module, mean, std) -> nn.Sequential:
    return nn.Sequential(Normalize(mean, std), model)


def validate_arch(name) -> None:
    """`name` is an architecture get_model builds (checked without building it); else a ConfigError listing
    the bundled names."""
    if isinstance(name, str) and name in BUNDLED:
        return
    if isinstance(name, str):
        torchvision = _torchvision(name)
        if name in torchvision.models.list_models(module=torchvision.models):
            return
    raise ConfigError(f"unknown architecture {name!r}; bundled: {', '.join(sorted(BUNDLED))}; any torchvision "
                      "classification model name works too (e.g. resnet50)")


def get_model(name: str, num_classes: int = 10) -> nn.Module:
    """A bundled architecture, or a torchvision classification model (untrained) by its builder name.

    Args:
        name: a key of BUNDLED, or a torchvision classification builder's name (e.g. resnet50: needs
            torchvision, the `train` extra).
        num_classes: the classifier's outputs.

    Returns:
        A new model with freshly initialised weights, in training mode.
    """
    validate_arch(name)
    if name in BUNDLED:
        return BUNDLED[name](num_classes=num_classes)
    return _torchvision(name).models.get_model(name, weights=None, num_classes=num_classes)


def _torchvision(name: str):
    """torchvision, which a name that is not bundled needs (a MissingExtraError naming the extra when absent)."""
    return require("torchvision", f"architecture {name!r} (not bundled: {', '.join(sorted(BUNDLED))}; any other "
                                  "name is torchvision's)")


__all__ = ["BUNDLED", "CAM_LAYERS", "Normalize", "validate_arch", "cnn_small", "get_model", "preact_resnet18", "resnet18", "resnet_small",
           "with_normalization", "wrn34_10"]
