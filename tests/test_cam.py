"""compute_cam / find_layer: batched head-only GradCAM, XGradCAM and LayerCAM at feature resolution.

Oracles: an independent autograd computation of docs/method.md §6's formulas (forward hook +
retain_grad + a full backward through the whole model, in float64), and pytorch-grad-cam (PyPI
`grad-cam`, test-only) compared at feature resolution: its own hooks collect A and dlogit/dA during its
full backward, and its `get_cam_image` (the method-specific weighting, before its ReLU, min-max scaling and
resize) turns them into the map. Within 1e-5 of the map's scale; XGradCAM on activations of both signs
(PreAct-ResNet) also gets the float32 rounding bound of its ill-conditioned weight (see
xgradcam_rounding_bound)."""
import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from part_fast.cam import CAM_METHODS, cam_from_gradients, compute_cam, feature_map_layers, find_layer
from part_fast.errors import ConfigError
from part_fast.models import preact_resnet18, resnet18, with_normalization, wrn34_10

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- models
class SpatialHeadNet(nn.Module):
    """A small CNN whose head (after `layer4`) is not global pooling, so dlogit/dA varies over space and
    GradCAM, XGradCAM and LayerCAM all differ."""

    def __init__(self, num_classes=5, inplace_head=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.ReLU(inplace=inplace_head), nn.Conv2d(16, 8, 1), nn.Tanh(), nn.Flatten(),
                                  nn.LazyLinear(num_classes))

    def forward(self, x):
        return self.head(self.layer4(self.stem(x)))


def calibrated(model, shape=(8, 3, 32, 32), seed=0):
    """Give the BatchNorm layers non-default running statistics (a train-mode forward without
    gradients): a 'trained-ish' model whose eval-mode activations are not vanishingly small, so that its
    GradCAM is not all zero; then eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.rand(shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return calibrated(SpatialHeadNet(), (16, 3, 16, 16))


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(2)
    return calibrated(resnet18())


@pytest.fixture(scope="module")
def preact():
    torch.manual_seed(3)
    return calibrated(preact_resnet18())


MODEL_INPUTS = {"tiny": (4, 16), "r18": (2, 32), "preact": (2, 32)}
# Classes whose maps are not all zero on every model here (the randomly initialised PreAct-ResNet's own
# prediction often has an all-zero GradCAM, which would make a comparison vacuous).
CLASSES = torch.tensor([0, 4, 3, 2])


def inputs_for(which, seed=12):
    batch, size = MODEL_INPUTS[which]
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- oracles
def oracle_activations_and_gradients(model, x, layer_name, classes=None):
    """A and dlogit_c/dA from a forward hook + retain_grad + a full backward through a copy of the model."""
    m = copy.deepcopy(model).eval()
    store = {}

    def hook(_module, _inputs, out):
        out.retain_grad()
        store["A"] = out

    handle = dict(m.named_modules())[layer_name].register_forward_hook(hook)
    logits = m(x)
    handle.remove()
    if classes is None:
        classes = logits.argmax(1)
    logits.gather(1, classes[:, None]).sum().backward()
    return store["A"].detach().double(), store["A"].grad.double(), classes


def oracle_cam(model, x, method, layer_name, classes=None, ag=None):
    """§6's formulas, in float64, from oracle_activations_and_gradients (or the given (A, G, classes))."""
    a, g, classes = ag if ag is not None else oracle_activations_and_gradients(model, x, layer_name, classes)
    if method == "gradcam":
        cam = (g.mean((2, 3), keepdim=True) * a).sum(1)
    elif method == "xgradcam":
        cam = ((g * a).sum((2, 3), keepdim=True) / (a.sum((2, 3), keepdim=True) + 1e-7) * a).sum(1)
    else:
        cam = (torch.relu(g) * a).sum(1)
    return torch.relu(cam), classes


def xgradcam_rounding_bound(a, g):
    """Forward-error bound of a float32 XGradCAM. Its weight divides by the sum of a channel's activations;
    where those have both signs (PreAct-ResNet's layer4 is before its final BN + ReLU) that sum cancels,
    and float32 rounding of the sums is amplified by sum|A| / |sum A| (thousands on some channels). Any
    float32 implementation (this one, pytorch-grad-cam's numpy one) carries that error; it is zero where
    the activations are >= 0. Per element: sum_k |dw_k| |A_k|, with unit roundoff 2^-24 per summed term."""
    gamma = a.shape[2] * a.shape[3] * 2.0**-24
    den = a.sum((2, 3), keepdim=True) + 1e-7
    w = (g * a).sum((2, 3), keepdim=True) / den
    dw = gamma * ((g * a).abs().sum((2, 3), keepdim=True) + w.abs() * a.abs().sum((2, 3), keepdim=True)) / den.abs()
    return (dw * a.abs()).sum(1) + a.shape[1] * 2.0**-24 * (w * a).abs().sum(1)


def grad_cam_library(model, x, layer_name, classes):
    """pytorch-grad-cam's maps at feature resolution for all three methods ({method: its ReLU'd
    get_cam_image, before its min-max scaling and resize}) and the (A, G) it collected, in float64.
    A GradCAM, an XGradCAM and a LayerCAM object each hook the layer of one model copy, so a single
    forward + full backward (run by the first) fills them all with A and dlogit/dA."""
    from pytorch_grad_cam import GradCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    m = copy.deepcopy(model)
    layer = dict(m.named_modules())[layer_name]
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    cams = {name: cls(model=m, target_layers=[layer])
            for name, cls in (("gradcam", GradCAM), ("xgradcam", XGradCAM), ("layercam", LayerCAM))}
    out = {}
    try:
        full_res = cams["gradcam"](input_tensor=x, targets=targets)  # forward + full backward; scaled, resized
        assert full_res.shape == (x.shape[0], x.shape[2], x.shape[3])
        for name, cam in cams.items():
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            raw = cam.get_cam_image(x, layer, targets, acts, grads, eigen_smooth=False)
            out[name] = torch.from_numpy(np.maximum(raw, 0)).double()
        ag = tuple(torch.from_numpy(t[0].numpy()).double() for t in
                   (cams["gradcam"].activations_and_grads.activations, cams["gradcam"].activations_and_grads.gradients))
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()
    return out, ag


def assert_close_rel(actual, expected, rtol=RTOL, bound=None, what=""):
    """Within rtol relative to the map's scale (a CAM is a sum of many terms: entries near zero carry the
    absolute rounding of the large ones), plus an element-wise rounding bound where one is given."""
    assert actual.shape == expected.shape
    scale = float(expected.detach().abs().max())
    diff = (actual.double() - expected.double()).abs()
    allowed = rtol * scale + (0 if bound is None else bound)
    bad = diff > allowed
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max |diff| {float(diff.max()):.3g}, "
        f"scale {scale:.3g}, max allowed there {float(allowed.max() if bound is not None else allowed):.3g}"
    )


def hooks_of(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                len(getattr(m, "_forward_hooks_with_kwargs", {})))
            for n, m in model.named_modules()}


def no_hooks(model):
    return all(v == (0, 0, 0, 0) for v in hooks_of(model).values())


def no_param_grads(model):
    return all(p.grad is None for p in model.parameters())


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# -------------------------------------------------------------------------------------- numerics
# The ResNets' full backward is the slow part of these tests: one target kind each (ResNet-18 with its
# own prediction, PreAct-ResNet-18 with given classes), both on the small CNN.
@pytest.mark.parametrize(
    "which, target", [("tiny", "pred"), ("tiny", "classes"), ("r18", "pred"), ("preact", "classes")]
)
def test_matches_autograd_oracle(request, which, target):
    model, x = request.getfixturevalue(which), inputs_for(which)
    classes = CLASSES[: x.shape[0]] if target == "classes" else None
    ag = oracle_activations_and_gradients(model, x, "layer4", classes)
    h = x.shape[-1] // (2 if isinstance(model, SpatialHeadNet) else 8)
    for method in CAM_METHODS:
        cam = compute_cam(model, x, method, target=target if classes is None else classes)
        expected, _ = oracle_cam(model, x, method, "layer4", ag=ag)
        assert cam.shape == (x.shape[0], h, h) and cam.dtype == torch.float32
        assert (expected > 0).any(), f"{method}: degenerate oracle, the test would compare zeros"
        bound = xgradcam_rounding_bound(*ag[:2]) if method == "xgradcam" else None
        assert_close_rel(cam, expected, bound=bound, what=method)


@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize("target", ["label", "tensor"])
def test_matches_autograd_oracle_for_given_classes(tiny, method, target):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    classes = torch.tensor([0, 4, 2, 2])
    if target == "label":
        cam = compute_cam(tiny, x, method, target="label", y=classes)
    else:
        cam = compute_cam(tiny, x, method, target=classes.int())
    expected, _ = oracle_cam(tiny, x, method, "layer4", classes)
    assert (expected > 0).any()
    assert_close_rel(cam, expected)


@pytest.mark.parametrize("which, target", [("tiny", "pred"), ("tiny", "classes"), ("preact", "classes")])
def test_matches_pytorch_grad_cam(request, which, target):
    model, x = request.getfixturevalue(which), inputs_for(which)
    if target == "pred":
        classes = compute_cam(model, x, return_logits=True)[1].argmax(1)
    else:
        classes = CLASSES[: x.shape[0]]
    library, (acts, grads) = grad_cam_library(model, x, "layer4", classes)
    for method in CAM_METHODS:
        cam = compute_cam(model, x, method, target=target if target == "pred" else classes)
        assert (library[method] > 0).any(), method
        # Both sides round in float32: twice the bound.
        bound = 2 * xgradcam_rounding_bound(acts, grads) if method == "xgradcam" else None
        assert_close_rel(cam, library[method], bound=bound, what=method)


def test_methods_differ_on_a_spatial_head(tiny):
    # Guard against the oracle comparison passing because all three formulas happen to coincide.
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    cams = {m: compute_cam(tiny, x, m) for m in CAM_METHODS}
    for a, b in [("gradcam", "xgradcam"), ("gradcam", "layercam"), ("xgradcam", "layercam")]:
        assert not torch.allclose(cams[a], cams[b], rtol=1e-3, atol=1e-6), (a, b)


def test_gradcam_of_a_gap_linear_head_is_the_original_cam(r18):
    # §6: with global-average-pool + linear, w_k = W[c, k] / (h w): GradCAM = ReLU(sum_k W[c,k] A_k) / (h w).
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    cam, logits = compute_cam(r18, x, "gradcam", return_logits=True)
    acts = []
    handle = r18.layer4.register_forward_hook(lambda m, i, o: acts.append(o.double()))
    with torch.no_grad():
        r18(x)
    handle.remove()
    w = r18.linear.weight.double()[logits.argmax(1)]  # (B, K)
    expected = torch.relu(torch.einsum("bk,bkhw->bhw", w, acts[0])) / 16
    assert (expected > 0).any()
    assert_close_rel(cam, expected)


def test_cam_from_gradients_formulas():
    gen = torch.Generator().manual_seed(15)
    a = torch.rand(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    b, i, j = 1, 0, 1
    # Element (b, i, j) written out as loops over channels.
    grad_w = [float(g[b, c].mean()) for c in range(3)]
    x_w = [float((g[b, c] * a[b, c]).sum() / (a[b, c].sum() + 1e-7)) for c in range(3)]
    expected = {
        "gradcam": max(0.0, sum(grad_w[c] * float(a[b, c, i, j]) for c in range(3))),
        "xgradcam": max(0.0, sum(x_w[c] * float(a[b, c, i, j]) for c in range(3))),
        "layercam": max(0.0, sum(max(0.0, float(g[b, c, i, j])) * float(a[b, c, i, j]) for c in range(3))),
    }
    for method, value in expected.items():
        assert cam_from_gradients(a, g, method)[b, i, j].item() == pytest.approx(value, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="method"):
        cam_from_gradients(a, g, "gradcam++")


# ---------------------------------------------------------------------------------- corner cases
class ZeroCamNet(nn.Module):
    """layer4 = ReLU of a conv; GAP + linear head. With all head weights negative, every GradCAM /
    XGradCAM weight is negative and activations are >= 0: the CAM is exactly zero. With a strongly
    negative conv bias the activations themselves are all zero (XGradCAM's 0/0 guard)."""

    def __init__(self, dead=False):
        super().__init__()
        self.layer4 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(-torch.rand(3, 4) - 0.1)
            if dead:
                self.layer4[0].bias.fill_(-100.0)

    def forward(self, x):
        return self.fc(self.layer4(x).mean((2, 3)))


@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize("dead", [False, True])
def test_all_zero_cam_is_zero_not_nan(method, dead):
    torch.manual_seed(4)
    model = ZeroCamNet(dead).eval()
    cam = compute_cam(model, torch.rand(3, 3, 8, 8), method)
    assert cam.shape == (3, 8, 8)
    assert torch.equal(cam, torch.zeros_like(cam))


def test_one_pixel_map():
    # ResNet-18 at 8x8: layer4 is 1x1.
    torch.manual_seed(5)
    model = calibrated(resnet18(), (8, 3, 8, 8))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(16))
    ag = oracle_activations_and_gradients(model, x, "layer4")
    for method in CAM_METHODS:
        cam = compute_cam(model, x, method)
        assert cam.shape == (3, 1, 1)
        expected, _ = oracle_cam(model, x, method, "layer4", ag=ag)
        assert (expected > 0).any(), method
        assert_close_rel(cam, expected, what=method)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_batch_size_one_matches_the_batch(tiny, method):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(17))
    whole = compute_cam(tiny, x, method)
    for i in range(4):
        one = compute_cam(tiny, x[i : i + 1], method)
        assert one.shape == (1, 8, 8)
        assert_close_rel(one[0], whole[i], what=f"example {i}")
        expected, _ = oracle_cam(tiny, x[i : i + 1], method, "layer4")
        assert (expected > 0).any()
        assert_close_rel(one, expected, what=f"example {i}")


def test_return_logits_are_the_eval_forward(tiny):
    x = torch.rand(3, 3, 16, 16)
    cam, logits = compute_cam(tiny, x, return_logits=True)
    with torch.no_grad():
        expected = tiny(x)
    assert not logits.requires_grad
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


def test_inplace_op_after_the_layer():
    # A head that starts with ReLU(inplace=True) on the layer's output: works, and reads A before it.
    torch.manual_seed(6)
    inplace = calibrated(SpatialHeadNet(inplace_head=True), (8, 3, 16, 16))
    plain = SpatialHeadNet(inplace_head=False)
    plain(torch.rand(1, 3, 16, 16))  # materialise the lazy layer
    plain.load_state_dict(inplace.state_dict())
    plain.eval()
    x = torch.rand(3, 3, 16, 16)
    for method in CAM_METHODS:
        expected, _ = oracle_cam(plain, x, method, "layer4")
        assert_close_rel(compute_cam(inplace, x, method), expected)


# ----------------------------------------------------------------------- side effects and cleanup
def test_no_hooks_no_grads_left(tiny, r18):
    for model, x in [(tiny, torch.rand(2, 3, 16, 16)), (r18, torch.rand(2, 3, 32, 32))]:
        before = hooks_of(model)
        assert no_hooks(model) and no_param_grads(model)
        for method in CAM_METHODS:
            compute_cam(model, x, method)
        assert hooks_of(model) == before and no_hooks(model)
        assert no_param_grads(model)


def test_trunk_is_not_differentiated(r18):
    # Only the head between layer4 and the logits is recorded by autograd: no backward through the trunk.
    seen = {}

    def record(name):
        return lambda m, i, o: seen.__setitem__(name, o.requires_grad)

    handles = [getattr(r18, n).register_forward_hook(record(n)) for n in ("conv1", "layer1", "layer3")]
    handles.append(r18.layer4[1].conv2.register_forward_hook(record("layer4.1.conv2")))
    handles.append(r18.linear.register_forward_hook(record("linear")))
    try:
        compute_cam(r18, torch.rand(2, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    assert seen == {"conv1": False, "layer1": False, "layer3": False, "layer4.1.conv2": False, "linear": True}


class Boom(Exception):
    pass


class RaisingNet(nn.Module):
    """Raises either before the CAM layer runs (in the trunk) or after it (in the head)."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.layer4 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if self.where == "trunk":
            raise Boom("trunk")
        a = self.layer4(self.stem(x))
        if self.where == "head":
            raise Boom("head")
        return self.fc(a.mean((2, 3)))


@pytest.mark.parametrize("where", ["trunk", "head"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grad_enabled", [False, True])
def test_cleanup_when_the_model_raises(where, train, grad_enabled):
    model = RaisingNet(where).train(train)
    state = bn_state(model)
    with torch.set_grad_enabled(grad_enabled):
        with pytest.raises(Boom):
            compute_cam(model, torch.rand(2, 3, 8, 8))
        assert torch.is_grad_enabled() == grad_enabled
    assert no_hooks(model) and no_param_grads(model)
    assert all(m.training == train for m in model.modules())
    assert all(torch.equal(v, bn_state(model)[k]) for k, v in state.items())


def test_layer_that_does_not_run():
    model = RaisingNet("none")
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(RuntimeError, match="did not run"):
        compute_cam(model, torch.rand(1, 3, 8, 8), layer="unused")
    assert no_hooks(model)


def test_layer_that_runs_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.block(self.block(x)).mean((2, 3)))

    model = Twice()
    with pytest.raises(RuntimeError, match="twice"):
        compute_cam(model, torch.rand(1, 3, 8, 8), layer="block")
    assert no_hooks(model) and no_param_grads(model)


@pytest.mark.parametrize("grad_enabled", [False, True])
def test_grad_mode_restored(tiny, grad_enabled):
    x = torch.rand(2, 3, 16, 16)
    with torch.set_grad_enabled(grad_enabled):
        cam = compute_cam(tiny, x)
        assert torch.is_grad_enabled() == grad_enabled
    assert not cam.requires_grad
    expected, _ = oracle_cam(tiny, x, "gradcam", "layer4")
    assert_close_rel(cam, expected)


def test_mode_preserved_and_cam_computed_in_eval_mode(tiny):
    x = torch.rand(3, 3, 16, 16)
    model = copy.deepcopy(tiny)
    eval_cam = compute_cam(model.eval(), x, "layercam")
    assert all(not m.training for m in model.modules())
    train_cam = compute_cam(model.train(), x, "layercam")
    assert all(m.training for m in model.modules())
    # The train-mode model was evaluated in eval mode (running statistics, not the batch's).
    torch.testing.assert_close(train_cam, eval_cam, rtol=0, atol=0)
    # A train-mode model with a frozen (eval-mode) BatchNorm keeps that mixture.
    model.train()
    model.stem[1].eval()
    compute_cam(model, x)
    assert not model.stem[1].training
    assert all(m.training for n, m in model.named_modules() if n != "stem.1")


@pytest.mark.parametrize("which", ["tiny", "r18"])
def test_bn_running_statistics_unchanged(request, which):
    model = copy.deepcopy(request.getfixturevalue(which)).train()
    batch, size = MODEL_INPUTS[which]
    before = bn_state(model)
    assert len(before) == 3 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for method in CAM_METHODS:
        compute_cam(model, torch.rand(batch, 3, size, size), method)
    after = bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    # The check can fail: a train-mode forward does move them.
    with torch.no_grad():
        model(torch.rand(batch, 3, size, size))
    assert not all(torch.equal(before[k], bn_state(model)[k]) for k in before)


# ------------------------------------------------------------------------------- layer selection
def test_default_layer_bundled_resnets(r18, preact):
    assert find_layer(r18) is r18.layer4
    assert find_layer(preact) is preact.layer4


def test_default_layer_wrn():
    # WRN-34-10 is heavy: one CAM at batch 2 (one forward) is this test's whole budget.
    torch.manual_seed(7)
    model = wrn34_10().eval()
    assert find_layer(model) is model.block3
    cam = compute_cam(model, torch.rand(2, 3, 32, 32), "layercam")
    assert cam.shape == (2, 8, 8) and torch.isfinite(cam).all() and (cam > 0).any()
    assert no_hooks(model) and no_param_grads(model)


def test_default_layer_torchvision_resnet():
    torch.manual_seed(8)
    model = torchvision.models.resnet18(num_classes=4).eval()
    assert find_layer(model) is model.layer4
    x = torch.rand(2, 3, 64, 64)
    cam = compute_cam(model, x, "layercam")
    assert cam.shape == (2, 2, 2)
    expected, _ = oracle_cam(model, x, "layercam", "layer4")
    assert (expected > 0).any()
    assert_close_rel(cam, expected)


def test_layer_by_name_or_module(r18):
    x = torch.rand(2, 3, 32, 32)
    by_default = compute_cam(r18, x, "layercam")
    by_name = compute_cam(r18, x, "layercam", layer="layer4")
    by_module = compute_cam(r18, x, "layercam", layer=r18.layer4)
    assert torch.equal(by_default, by_name) and torch.equal(by_default, by_module)
    assert compute_cam(r18, x, "layercam", layer="layer3").shape == (2, 8, 8)
    assert compute_cam(r18, x, "layercam", layer=r18.layer4[0]).shape == (2, 4, 4)


def test_other_layer_matches_oracle(tiny):
    x = inputs_for("tiny")
    for layer in ("stem", "stem.1"):
        cam = compute_cam(tiny, x, "layercam", layer=layer)
        assert cam.shape == (4, 16, 16)
        expected, _ = oracle_cam(tiny, x, "layercam", layer)
        assert (expected > 0).any()
        assert_close_rel(cam, expected, what=layer)


class ModuleWrapper(nn.Module):
    """DataParallel / DistributedDataParallel style: the real model is `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("wrap", ["custom", "DataParallel"])
def test_module_wrapper(tiny, wrap):
    wrapped = ModuleWrapper(tiny) if wrap == "custom" else nn.DataParallel(tiny)
    assert find_layer(wrapped) is tiny.layer4
    x = torch.rand(2, 3, 16, 16)
    expected = compute_cam(tiny, x, "xgradcam")
    assert torch.equal(compute_cam(wrapped, x, "xgradcam"), expected)
    # The wrapper's own names work too.
    assert torch.equal(compute_cam(wrapped, x, "xgradcam", layer="module.layer4"), expected)
    assert torch.equal(compute_cam(wrapped, x, "xgradcam", layer="layer4"), expected)
    assert no_hooks(wrapped) and no_param_grads(wrapped)


def test_normalization_in_front(r18, tiny):
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    assert find_layer(with_normalization(r18, mean, std)) is r18.layer4
    wrapped = with_normalization(tiny, mean, std)
    assert find_layer(wrapped) is tiny.layer4
    x = inputs_for("tiny")
    cam = compute_cam(wrapped, x, "gradcam")
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected, _ = oracle_cam(tiny, normalised, "gradcam", "layer4")
    assert (expected > 0).any()
    assert_close_rel(cam, expected)
    assert not torch.allclose(cam, compute_cam(tiny, x, "gradcam"))  # normalisation applied exactly once


def test_unknown_layer_name_lists_candidates(r18):
    with pytest.raises(ValueError, match="layer5") as info:
        compute_cam(r18, torch.rand(1, 3, 32, 32), layer="layer5")
    for name in ("layer1", "layer4", "linear"):
        assert name in str(info.value)
    assert no_hooks(r18)


def test_no_known_layer_lists_candidates():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError) as info:
        compute_cam(model, torch.rand(1, 3, 8, 8))
    # The block "1" and its layers share one shape (one entry); the 1x1 global pool is left out.
    assert str(info.value) == ("could not find the CAM layer of Sequential: pass layer= (a module or its name); "
                               "modules with a 4-D output, deepest first: 1 (4x4x4), 0 (4x6x6)")
    # Naming it works.
    assert compute_cam(model, torch.rand(1, 3, 8, 8), layer="1").shape == (1, 4, 4)


class BringYourOwnNet(nn.Module):
    """A model find_layer does not know: no layer4 / block3 / features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()),
                                  nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True)))
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


BYO_LAYERS = "body (64x8x8), body.0 (32x16x16), stem (16x32x32)"


@pytest.mark.parametrize("train", [False, True])
def test_unknown_architecture_lists_its_feature_map_layers(train):
    torch.manual_seed(9)
    model = calibrated(BringYourOwnNet(), (4, 3, 32, 32)).train(train)
    state = bn_state(model)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfigError) as info:
        compute_cam(model, x)
    assert str(info.value) == ("could not find the CAM layer of BringYourOwnNet: pass layer= (a module or its name); "
                               f"modules with a 4-D output, deepest first: {BYO_LAYERS}")
    # The listing's forward left nothing behind: no hooks, no grads, modes and BatchNorm statistics kept.
    assert no_hooks(model) and no_param_grads(model)
    assert all(m.training == train for m in model.modules())
    assert all(torch.equal(v, bn_state(model)[k]) for k, v in state.items())
    assert feature_map_layers(model, x) == [("body", (64, 8, 8)), ("body.0", (32, 16, 16)), ("stem", (16, 32, 32))]
    # Each layer listed works as layer=, by name and as a module.
    for name, shape in feature_map_layers(model, x):
        cam = compute_cam(model, x, "layercam", layer=name)
        assert cam.shape == (2, *shape[1:])
        assert torch.equal(cam, compute_cam(model, x, "layercam", layer=dict(model.named_modules())[name]))


def test_unknown_architecture_behind_a_wrapper_lists_its_own_names():
    model = nn.DataParallel(BringYourOwnNet())
    with pytest.raises(ConfigError, match="BringYourOwnNet") as info:
        compute_cam(model, torch.rand(2, 3, 32, 32))
    assert str(info.value).endswith(f"deepest first: {BYO_LAYERS}")
    assert no_hooks(model)


def test_layer_list_is_capped():
    convs = [nn.Conv2d(3 + i, 4 + i, 1) for i in range(12)]  # 12 feature maps of different shapes
    model = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(15, 2))
    with pytest.raises(ConfigError) as info:
        compute_cam(model, torch.rand(1, 3, 4, 4))
    assert str(info.value).endswith("deepest first: 11 (15x4x4), 10 (14x4x4), 9 (13x4x4), 8 (12x4x4), 7 (11x4x4), "
                                    "6 (10x4x4), 5 (9x4x4), 4 (8x4x4), and 4 more")


def test_layer_that_runs_twice_is_not_listed():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.shared(self.shared(self.stem(x))).mean((2, 3)))

    with pytest.raises(ConfigError) as info:
        compute_cam(Shared(), torch.rand(1, 3, 8, 8))
    assert str(info.value).endswith("deepest first: stem (4x8x8)")


def test_no_feature_map_at_all():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3 * 8 * 8, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    with pytest.raises(ConfigError) as info:
        compute_cam(MLP(), torch.rand(2, 3, 8, 8))
    assert str(info.value) == ("could not find the CAM layer of MLP: no module outputs a 4-D feature map: "
                               "a CAM needs one")
    with pytest.raises(ConfigError) as info:
        find_layer(MLP())
    assert str(info.value) == ("could not find the CAM layer of MLP: it has no convolution and no block: a CAM needs "
                               "a module with a 4-D (B, K, h, w) output")


def test_find_layer_without_an_input_lists_convolutions_and_blocks():
    with pytest.raises(ConfigError) as info:
        find_layer(BringYourOwnNet())
    assert str(info.value) == (
        "could not find the CAM layer of BringYourOwnNet: pass layer= (a module or its name); its convolutions and "
        "blocks, last first: body, body.1, body.1.0, body.0, body.0.0, stem, stem.0")


def test_listing_falls_back_when_the_model_fails_on_the_input():
    class Picky(BringYourOwnNet):
        def forward(self, x):
            if x.shape[0] < 2:
                raise RuntimeError("needs two examples")
            return super().forward(x)

    # The listing's forward (one example) fails: the error still lists layers, from the module tree.
    with pytest.raises(ConfigError, match="could not find the CAM layer of Picky: pass layer=.*last first: body, "):
        compute_cam(Picky(), torch.rand(2, 3, 32, 32))


def test_bad_arguments(tiny):
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="method"):
        compute_cam(tiny, x, "scorecam")
    with pytest.raises(ValueError, match="4-D"):
        compute_cam(tiny, x[0])
    with pytest.raises(ValueError, match="y="):
        compute_cam(tiny, x, target="label")
    with pytest.raises(ValueError, match="target"):
        compute_cam(tiny, x, target="argmax")
    with pytest.raises(ValueError, match="shape"):
        compute_cam(tiny, x, target=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        compute_cam(tiny, x, target=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        compute_cam(tiny, x, target=torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        compute_cam(tiny, x, target="label", y=torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="layer"):
        compute_cam(tiny, x, layer=4)
    with pytest.raises(ValueError, match=r"\(B, K, h, w\)"):
        compute_cam(tiny, x, layer="head.4")  # the Linear: a 2-D output
    assert no_hooks(tiny) and no_param_grads(tiny)


@pytest.mark.parametrize("by", ["name", "module"])
def test_layer_without_a_feature_map_output_is_named(by):
    torch.manual_seed(10)
    model = BringYourOwnNet().train()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfigError) as info:
        compute_cam(model, x, layer="fc" if by == "name" else model.fc)
    assert str(info.value) == (
        "the CAM layer 'fc' (Linear) outputs a 2-D tensor (2, 3), not a (B, K, h, w) feature map; "
        f"pass layer= (a module or its name); modules with a 4-D output, deepest first: {BYO_LAYERS}")
    assert no_hooks(model) and no_param_grads(model) and all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


def test_layer_with_a_tuple_output_is_named():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pair, self.fc = nn.Conv2d(3, 4, 1), Pair(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.pair(self.conv(x))[0].mean((2, 3)))

    with pytest.raises(ConfigError) as info:
        compute_cam(Net(), torch.rand(1, 3, 4, 4), layer="pair")
    assert str(info.value) == ("the CAM layer 'pair' (Pair) outputs a tuple, not a (B, K, h, w) "
                               "feature map; pass layer= (a module or its name); modules with a 4-D output, "
                               "deepest first: conv (4x4x4)")


def test_compute_cam_refuses_inference_mode_clearly():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        compute_cam(model, torch.rand(2, 3, 8, 8), layer="0")
