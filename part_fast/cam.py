"""Batched class activation maps (GradCAM, XGradCAM, LayerCAM) at feature resolution.

The CAM reads one layer's output, a (B, K, h, w) feature map: found by name on the architectures we know,
passed as layer= (a module or its name) on any other; when none is found the error lists the modules whose
output is one (`feature_map_layers`).

One forward of the whole batch with a hook on the target layer; the trunk below the layer runs without
autograd, and the hook hands the head a detached copy of the activations A that requires grad, so
`torch.autograd.grad(selected_logits.sum(), A)` differentiates the head only: no backward through the
trunk, no `.grad` on any parameter. The model runs in eval mode (BatchNorm statistics untouched) and
gets its mode back, and the hook is removed, whatever happens.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .errors import ConfigError
from .modes import validate_grad_possible, eval_mode

CAM_METHODS = ("gradcam", "xgradcam", "layercam")

# Where the CAM layer is on architectures we know: the last block before global pooling.
# layer4: ResNets (bundled and torchvision); block3: WideResNet; features: cnn-small and torchvision's
# VGG / DenseNet / MobileNet / EfficientNet, whose `features` end where global pooling begins.
_KNOWN_LAYERS = ("layer4", "block3", "features")
# XGradCAM's denominator guard (pytorch-grad-cam uses 1e-7 as well): an all-zero activation map gives a
# zero weight instead of NaN.
_XGRADCAM_TINY = 1e-7
# How many candidate layers an error lists (then "and N more").
_LISTED_LAYERS = 8


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel / torch.compile wrappers keep the real model inside.
    for attr in ("module", "_orig_mod"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return _unwrap(getattr(model, attr))
    return model


def find_layer(model: nn.Module, layer: str | nn.Module | None = None, x: torch.Tensor | None = None) -> nn.Module:
    """The module whose output the CAM reads: `layer` itself, the submodule of that name, or (None) the
    last block before global pooling of a known architecture (`layer4`, `block3`, `features`).

    x (optional, a batch the model takes) only improves the error when no layer is found: one forward of
    its first example lists the modules whose output is a feature map."""
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
        model_name = type(_unwrap(model)).__name__
        raise ConfigError(f"could not find the CAM layer of {model_name}: " + _layer_advice(model, x))
    if not isinstance(layer, str):
        raise TypeError(f"layer must be None, a module name or an nn.Module, got {type(layer).__name__}")
    if layer not in modules:
        top = [n for n in modules if n and "." not in n]
        raise ConfigError(f"model has no layer named {layer!r}; top-level layers: {', '.join(top)}")
    return modules[layer]


def feature_map_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, int, int]]]:
    """[(name, (C, h, w))] of the modules whose output is a (B, C, h, w) feature map in one no-grad,
    eval-mode forward of x's first example, deepest first: the usual CAM layers of a model `find_layer`
    does not know. Of consecutive modules with the same output shape (a block, its last layer, the
    activation after it) only the one that finishes last is kept, the block; a module that runs more than
    once is left out (a CAM layer must run once); 1x1 outputs (e.g. global pooling, whose CAM is constant,
    so the budget is eps_low everywhere) only when nothing larger exists. The model's modes come back and
    the hooks go, whatever happens."""
    target = _unwrap(model)
    sample = x[:1]
    outputs: list[tuple[str, object]] = []
    handles = []
    try:
        for name, module in target.named_modules():
            if name:
                handles.append(module.register_forward_hook(
                    lambda _m, _i, output, name=name: outputs.append((name, output))))
        with eval_mode(target), torch.no_grad():
            target(sample)
    finally:
        for handle in handles:
            handle.remove()
    runs = Counter(name for name, _ in outputs)
    maps = [(name, tuple(output.shape[1:])) for name, output in reversed(outputs)
            if runs[name] == 1 and isinstance(output, torch.Tensor) and output.dim() == 4
            and output.shape[0] == sample.shape[0] and output.shape[2] >= 1 and output.shape[3] >= 1]
    # Hooks fire as modules finish, so in reverse a block comes before the layers inside it.
    deepest = [(name, shape) for i, (name, shape) in enumerate(maps) if i == 0 or maps[i - 1][1] != shape]
    larger = [(name, shape) for name, shape in deepest if shape[1] * shape[2] > 1]
    return larger or deepest


def _layer_advice(model: nn.Module, x: torch.Tensor | None) -> str:
    """What to pass as layer=: the modules with a 4-D output when x is at hand (one forward), else the
    convolutions and blocks (modules with children), last first; never an empty list."""
    if x is not None:
        try:
            maps = feature_map_layers(model, x)
        except Exception:  # noqa: BLE001 - only the advice is lost: fall back to the list without a forward
            maps = None
        if maps is not None:
            if not maps:
                return "no module outputs a 4-D feature map: a CAM needs one"
            return ("pass layer= (a module or its name); modules with a 4-D output, deepest first: "
                    + _capped([f"{name} ({'x'.join(map(str, shape))})" for name, shape in maps]))
    blocks = [name for name, m in _last_first(_unwrap(model))
              if isinstance(m, nn.Conv2d) or next(m.children(), None) is not None]
    if not blocks:
        return "it has no convolution and no block: a CAM needs a module with a 4-D (B, K, h, w) output"
    return "pass layer= (a module or its name); its convolutions and blocks, last first: " + _capped(blocks)


def _last_first(module: nn.Module, prefix: str = ""):
    """(name, submodule) with later siblings first and a block before its own layers (the order in which
    a forward finishes them, reversed)."""
    for name, child in reversed(list(module.named_children())):
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        yield from _last_first(child, full)


def _capped(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED_LAYERS])
    more = len(items) - _LISTED_LAYERS
    return shown + (f", and {more} more" if more > 0 else "")


def _layer_name(model: nn.Module, layer: str | nn.Module | None, target_layer: nn.Module) -> str:
    if isinstance(layer, str):
        return repr(layer)
    for candidate in (_unwrap(model), model):
        for name, module in candidate.named_modules():
            if module is target_layer and name:
                return repr(name)
    return type(target_layer).__name__


def _output_text(output) -> str:
    if isinstance(output, torch.Tensor):
        return f"a {output.dim()}-D tensor {tuple(output.shape)}"
    return f"a {type(output).__name__}"


class _NotAFeatureMap(Exception):
    """Raised by the CAM hook to stop the forward at a layer whose output is no (B, K, h, w) map."""


def _select_classes(logits: torch.Tensor, target, y) -> torch.Tensor:
    batch = logits.shape[0]
    if isinstance(target, torch.Tensor):
        classes = target
    elif target == "pred":
        return logits.argmax(1)
    elif target == "label":
        if y is None:
            raise ConfigError("target='label' needs the labels: pass y=")
        classes = y
    else:
        raise ConfigError(f"target must be 'pred', 'label' or a tensor of class indices, got {target!r}")
    if classes.shape != (batch,) or classes.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"class indices must be an integer tensor of shape ({batch},), "
                          f"got {classes.dtype} {tuple(classes.shape)}")
    classes = classes.to(logits.device, torch.int64)
    # An out-of-range index would be an opaque gather error on the CPU and a device-side assert on a GPU.
    if batch and not bool(((classes >= 0) & (classes < logits.shape[1])).all()):
        raise ConfigError(f"class indices must be in [0, {logits.shape[1]}), got {classes.tolist()}")
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
    """Class activation maps of `x` in one batched forward (eval mode) and a backward through the head only.

    Args:
        model: any classifier; its mode is restored afterwards.
        x: the batch, inputs as the model takes them.
        method: "gradcam" (the release's), "xgradcam" or "layercam" (CAM_METHODS).
        layer: the module (or its name) whose 4-D output the CAM reads; None finds it on known architectures
            (see find_layer).
        target: the class each map explains: "pred" (the model's own argmax, as the release), "label" (with
            y=) or a tensor of class indices.
        y: the labels, for target="label".
        return_logits: also return the (detached) logits of the eval-mode forward.

    Returns:
        The CAMs, float32, before ReLU and normalisation (cam_eps_map does those); with return_logits=True
        the pair (cams, logits).

    Shape:
        x: (B, C, H, W) -> cams (B, h, w), (h, w) the layer's spatial size; logits (B, classes).
    """
    if method not in CAM_METHODS:
        raise ConfigError(f"method must be one of {CAM_METHODS}, got {method!r}")
    validate_grad_possible("CAMs need gradients of the head")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ConfigError(f"x must be a 4-D tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    target_layer = find_layer(model, layer, x)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if captured:
            raise RuntimeError("the CAM layer ran twice in one forward; pass a layer that runs once")
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise _NotAFeatureMap(_output_text(output))
        # Autograd starts here: the head is differentiated, the trunk below never recorded.
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        # The head gets a non-leaf copy: it may modify the layer's output in place (e.g. a ReLU(inplace=True)
        # right after it), which autograd forbids on a leaf and which would also alter A itself.
        return leaf.clone()

    not_a_feature_map = None
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
    except _NotAFeatureMap as error:
        not_a_feature_map = str(error)  # reported below, once the hook is gone (the advice runs the model)
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_mode)
    if not_a_feature_map is not None:
        raise ConfigError(
            f"the CAM layer {_layer_name(model, layer, target_layer)} ({type(target_layer).__name__}) outputs "
            f"{not_a_feature_map}, not a (B, K, h, w) feature map; " + _layer_advice(model, x)
        )
    if return_logits:
        return cam, logits.detach()
    return cam
