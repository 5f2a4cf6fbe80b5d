"""Batched class activation maps (GradCAM, XGradCAM, LayerCAM) at feature resolution.

One forward of the whole batch with a hook on the target layer; the trunk below the layer runs without
autograd, and the hook hands the head a detached copy of the activations A that requires grad, so
`torch.autograd.grad(selected_logits.sum(), A)` differentiates the head only: no backward through the
trunk, no `.grad` on any parameter. The model runs in eval mode (BatchNorm statistics untouched) and
gets its mode back, and the hook is removed, whatever happens.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

from .modes import check_grad_possible, eval_mode

CAM_METHODS = ("gradcam", "xgradcam", "layercam")

# Where the CAM layer is on architectures we know: the last block before global pooling.
# layer4: ResNets (bundled and torchvision); block3: WideResNet; features: cnn-small and torchvision's
# VGG / DenseNet / MobileNet / EfficientNet, whose `features` end where global pooling begins.
_KNOWN_LAYERS = ("layer4", "block3", "features")
# XGradCAM's denominator guard (pytorch-grad-cam uses 1e-7 as well): an all-zero activation map gives a
# zero weight instead of NaN.
_XGRADCAM_TINY = 1e-7


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel / torch.compile wrappers keep the real model inside.
    for attr in ("module", "_orig_mod"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return _unwrap(getattr(model, attr))
    return model


def find_layer(model: nn.Module, layer: str | nn.Module | None = None) -> nn.Module:
    """The module whose output the CAM reads: `layer` itself, the submodule of that name, or (None) the
    last block before global pooling of a known architecture (`layer4`, `block3`)."""
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(_unwrap(model).named_modules())
    if isinstance(layer, str) and layer not in modules:
        # The wrapper's own names also work ("module.layer4" for a DataParallel model).
        modules.update((n, m) for n, m in model.named_modules() if n)
    if layer is None:
        for name in _KNOWN_LAYERS:
            if name in modules:
                return modules[name]
        # A model wrapped with a normalisation layer in front (nn.Sequential(Normalize, net)).
        for name in _KNOWN_LAYERS:
            hits = [m for n, m in modules.items() if n.endswith("." + name)]
            if len(hits) == 1:
                return hits[0]
        raise ConfigError(
            "could not find the CAM layer: pass layer= (a module or its name); candidates: "
            + ", ".join(n for n, m in modules.items() if n and len(list(m.children())) > 0)
        )
    if not isinstance(layer, str):
        raise TypeError(f"layer must be None, a module name or an nn.Module, got {type(layer).__name__}")
    if layer not in modules:
        top = [n for n in modules if n and "." not in n]
        raise ConfigError(f"model has no layer named {layer!r}; top-level layers: {', '.join(top)}")
    return modules[layer]


def _select_classes(logits: torch.Tensor, target, y) -> torch.Tensor:
    batch = logits.shape[0]
    if isinstance(target, torch.Tensor):
        classes = target
    elif target == "pred":
        return logits.argmax(1)
    elif target == "label":
        if y is None:
            raise ValueError("target='label' needs the labels: pass y=")
        classes = y
    else:
        raise ValueError(f"target must be 'pred', 'label' or a tensor of class indices, got {target!r}")
    if classes.shape != (batch,) or classes.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"class indices must be an integer tensor of shape ({batch},), got {classes.dtype} {tuple(classes.shape)}")
    classes = classes.to(logits.device, torch.int64)
    # An out-of-range index would be an opaque gather error on the CPU and a device-side assert on a GPU.
    if batch and not bool(((classes >= 0) & (classes < logits.shape[1])).all()):
        raise ValueError(f"class indices must be in [0, {logits.shape[1]}), got {classes.tolist()}")
    return classes


def cam_from_gradients(activations: torch.Tensor, gradients: torch.Tensor, method: str) -> torch.Tensor:
    """A (B, K, h, w), G = dlogit_c/dA (B, K, h, w) -> CAM (B, h, w), ReLU applied (docs/method.md §6)."""
    if method == "gradcam":
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = (weights * activations).sum(1)
    elif method == "xgradcam":
        weights = (gradients * activations).sum(dim=(2, 3), keepdim=True) / (
            activations.sum(dim=(2, 3), keepdim=True) + _XGRADCAM_TINY
        )
        cam = (weights * activations).sum(1)
    elif method == "layercam":
        cam = (torch.relu(gradients) * activations).sum(1)
    else:
        raise ConfigError(f"method must be one of {CAM_METHODS}, got {method!r}")
    return torch.relu(cam)


def compute_cam(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "gradcam",
    layer: str | nn.Module | None = None,
    target="pred",
    y: torch.Tensor | None = None,
    return_logits: bool = False,
):
    """CAMs (B, h, w) float32 of `x` (B, C, H, W) for the class `target` selects: "pred" (the model's own
    argmax, as the release), "label" (with y=) or a tensor of class indices. With return_logits=True also
    returns the (detached) logits of the eval-mode forward."""
    if method not in CAM_METHODS:
        raise ConfigError(f"method must be one of {CAM_METHODS}, got {method!r}")
    check_grad_possible("CAMs need gradients of the head")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    target_layer = find_layer(model, layer)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if captured:
            raise RuntimeError("the CAM layer ran twice in one forward; pass a layer that runs once")
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ValueError(f"the CAM layer must output (B, K, h, w), got {getattr(output, 'shape', type(output))}")
        # Autograd starts here: the head is differentiated, the trunk below never recorded.
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        # The head gets a non-leaf copy: it may modify the layer's output in place (e.g. a ReLU(inplace=True)
        # right after it), which autograd forbids on a leaf and which would also alter A itself.
        return leaf.clone()

    grad_mode = torch.is_grad_enabled()
    handle = target_layer.register_forward_hook(hook)
    try:
        with eval_mode(model):
            torch.set_grad_enabled(False)
            logits = model(x)
        if not captured:
            raise RuntimeError("the CAM layer did not run during the forward pass")
        activations = captured[0]
        classes = _select_classes(logits, target, y)
        selected = logits.gather(1, classes[:, None]).sum()
        (gradients,) = torch.autograd.grad(selected, activations)
        cam = cam_from_gradients(activations.detach().float(), gradients.float(), method)
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_mode)
    if return_logits:
        return cam, logits.detach()
    return cam
