"""PixelBudget: the per-pixel eps map of the exact batch being attacked."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from part_fast import ops
from part_fast.budget import MASKS, PixelBudget
from part_fast.cam import CAM_METHODS, compute_cam
from part_fast.errors import ConfigError

EPS, EPS_LOW = 8 / 255, 7 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


class FlipEquivariantNet(nn.Module):
    """A CNN that commutes with horizontal flips exactly, in floating point: 1x1 convolutions (per pixel),
    ReLU and a 4x4 max-pool (order-free, and 4 divides 32 so the pooling windows map onto each other).
    The head is global average pooling + linear, so the CAM of a flipped image is the flipped CAM and
    its class the same. The CAM (8x8 at 32x32) is not degenerate: random images give varied maps."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.MaxPool2d(4))
        self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.linear(self.layer4(self.stem(x)).mean((2, 3)))


class TinyBNNet(nn.Module):
    """A generic small CNN (3x3 convolutions, BatchNorm): not flip-equivariant."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.linear(self.layer4(self.stem(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def flipnet():
    torch.manual_seed(0)
    return FlipEquivariantNet().eval()


@pytest.fixture(scope="module")
def bnnet():
    torch.manual_seed(1)
    model = TinyBNNet()
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 32, 32))  # non-default running statistics
    return model.eval()


def images(n=4, seed=0, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_two_valued(eps_map):
    values = set(eps_map.unique().tolist())
    assert values <= {torch.tensor(EPS).item(), torch.tensor(EPS_LOW).item()}, values
    return values


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("method", CAM_METHODS)
def test_shape_values_and_equivalence(flipnet, mask, method):
    x = images()
    budget = PixelBudget(EPS, EPS_LOW, method=method, mask=mask)
    eps_map = budget(flipnet, x)
    assert eps_map.shape == ((4, 3, 32, 32) if mask == "jet" else (4, 1, 32, 32))
    assert eps_map.dtype == torch.float32
    # Both values occur (the model is not degenerate), and only those.
    assert assert_two_valued(eps_map) == {torch.tensor(EPS).item(), torch.tensor(EPS_LOW).item()}
    expected = ops.cam_eps_map(compute_cam(flipnet, x, method), (32, 32), EPS, EPS_LOW, mask)
    assert torch.equal(eps_map, expected)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("method", CAM_METHODS)
def test_mask_of_a_flipped_batch_is_the_flipped_mask(flipnet, mask, method):
    # The release looked masks up by batch index in a reshuffled, re-augmented pass; here the map is
    # computed from the very images it is applied to, so flipping the images flips the map.
    x = images(seed=1)
    budget = PixelBudget(EPS, EPS_LOW, method=method, mask=mask)
    eps_map = budget(flipnet, x)
    flipped_map = budget(flipnet, x.flip(-1))
    assert torch.equal(flipped_map, eps_map.flip(-1))
    # Not vacuous: the maps are not themselves flip-symmetric.
    assert not torch.equal(eps_map, eps_map.flip(-1))


@pytest.mark.parametrize("mask", MASKS)
def test_mask_follows_its_image_through_a_shuffle(bnnet, mask):
    # With a generic model: a permuted batch gets the same masks, permuted.
    x = images(6, seed=2)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    budget = PixelBudget(mask=mask, method="layercam")
    eps_map = budget(bnnet, x)
    assert torch.equal(budget(bnnet, x[perm]), eps_map[perm])
    # ... and the masks do differ between images (so a misalignment would be caught).
    assert not torch.equal(eps_map[0], eps_map[1])
    # A sub-batch, and a single image, get their own rows.
    assert torch.equal(budget(bnnet, x[2:5]), eps_map[2:5])
    assert torch.equal(budget(bnnet, x[4:5]), eps_map[4:5])


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("method", CAM_METHODS)
def test_degenerate_cam_gives_eps_low(mask, method):
    # All head weights negative: every CAM is all zero, a degenerate map: eps_low everywhere, no NaN.
    torch.manual_seed(2)
    model = FlipEquivariantNet()
    with torch.no_grad():
        model.linear.weight.copy_(-model.linear.weight.abs() - 0.01)
    x = images(3, seed=3)
    assert torch.equal(compute_cam(model, x, method), torch.zeros(3, 8, 8))
    eps_map = PixelBudget(EPS, EPS_LOW, method, mask)(model, x)
    assert torch.equal(eps_map, torch.full_like(eps_map, EPS_LOW))


@pytest.mark.parametrize("mask", MASKS)
def test_one_pixel_cam_gives_eps_low(mask):
    # A 1x1 CAM is constant: min-max normalisation is 0/0, the release's NaN -> eps_low everywhere.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    x = images(2, seed=4, size=16)
    cam = compute_cam(model, x, "layercam", layer="2")
    assert cam.shape == (2, 1, 1) and (cam > 0).all()
    eps_map = PixelBudget(mask=mask, method="layercam", layer="2")(model, x)
    assert eps_map.shape == (2, 3 if mask == "jet" else 1, 16, 16)
    assert torch.equal(eps_map, torch.full_like(eps_map, EPS_LOW))


def test_with_logits_reuses_the_clean_forward(bnnet):
    x = images(3, seed=5)
    budget = PixelBudget(method="xgradcam")
    eps_map, logits = budget.with_logits(bnnet, x)
    with torch.no_grad():
        expected = bnnet(x)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(eps_map, budget(bnnet, x))


def test_layer_and_eps_arguments(bnnet):
    x = images(2, seed=6)
    by_name = PixelBudget(0.1, 0.05, "layercam", "cam", layer="stem")(bnnet, x)
    expected = ops.cam_eps_map(compute_cam(bnnet, x, "layercam", layer="stem"), (32, 32), 0.1, 0.05, "cam")
    assert torch.equal(by_name, expected)
    assert set(by_name.unique().tolist()) == {torch.tensor(0.1).item(), torch.tensor(0.05).item()}
    by_module = PixelBudget(0.1, 0.05, "layercam", "cam", layer=bnnet.stem)(bnnet, x)
    assert torch.equal(by_module, by_name)
    # eps_low == eps: a uniform budget.
    flat = PixelBudget(EPS, EPS, "gradcam", "jet")(bnnet, x)
    assert torch.equal(flat, torch.full_like(flat, EPS))


def test_model_left_as_it_was(bnnet):
    model = copy.deepcopy(bnnet).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    PixelBudget()(model, images(2, seed=7))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=7 / 255, eps_low=8 / 255), "eps_low"),
        (dict(eps_low=-0.01), "eps_low"),
        (dict(method="gradcam++"), "method"),
        (dict(method="GradCAM"), "method"),
        (dict(mask="channel"), "mask"),
        (dict(mask=None), "mask"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PixelBudget(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eps=4 / 255, eps_low=8 / 255),
         "need 0 <= eps_low <= eps <= 1, got eps_low=8/255 (0.0314) > eps=4/255 (0.0157)"),
        (dict(eps_low=-1 / 255), "eps_low must be in [0, 1], got eps_low=-1/255 (-0.0039)"),
        (dict(eps=8, eps_low=7),
         "eps must be in [0, 1], got eps=2040/255 (8.0000); inputs are in [0, 1], so a budget above 1 "
         "is never meant: did you mean 8/255 (0.0314)?"),
        (dict(eps=8 / 255, eps_low=7),
         "eps_low must be in [0, 1], got eps_low=1785/255 (7.0000); inputs are in [0, 1], "
         "so a budget above 1 is never meant: did you mean 7/255 (0.0275)?"),
        (dict(eps="8/255"), "eps must be a number such as 8/255, got str '8/255'"),
        (dict(eps_low=True), "eps_low must be a number such as 8/255, got bool True"),
        (dict(eps=float("nan")), "eps must be a finite number such as 8/255, got eps=nan"),
        (dict(eps=float("inf")), "eps must be a finite number such as 8/255, got eps=inf"),
        (dict(layer=4), "layer must be None, a module name or an nn.Module, got int 4"),
    ],
)
def test_bad_budget_messages(kwargs, message):
    with pytest.raises(ConfigError) as info:
        PixelBudget(**kwargs)
    assert str(info.value) == message


def test_budget_edges_are_accepted():
    # The bounds themselves, ints and numpy scalars are budgets; the map holds them as floats.
    assert (PixelBudget(1, 0).eps, PixelBudget(1, 0).eps_low) == (1.0, 0.0)
    budget = PixelBudget(np.float32(0.5), np.float64(0.25))
    assert (budget.eps, budget.eps_low) == (0.5, 0.25) and type(budget.eps) is float


def test_model_without_a_known_layer_lists_its_layers():
    # Bring your own model: no layer4 / block3 / features. The error lists real layers; one of them works.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=4, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    x = images(3, seed=8)
    with pytest.raises(ConfigError) as info:
        PixelBudget(EPS, EPS_LOW)(model, x)
    assert str(info.value) == ("could not find the CAM layer of Sequential: pass layer= (a module or its name); "
                               "modules with a 4-D output, deepest first: 3 (16x8x8), 1 (8x32x32)")
    eps_map = PixelBudget(EPS, EPS_LOW, layer="3")(model, x)
    assert eps_map.shape == (3, 3, 32, 32)
    assert assert_two_valued(eps_map) == {torch.tensor(EPS).item(), torch.tensor(EPS_LOW).item()}
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_call_arguments(bnnet):
    with pytest.raises(ValueError, match="layer"):
        PixelBudget(layer="layer9")(bnnet, images(1))
    with pytest.raises(ValueError, match="4-D"):
        PixelBudget()(bnnet, images(1)[0])


def test_repr():
    text = repr(PixelBudget(method="layercam", mask="cam", layer="layer4"))
    assert "layercam" in text and "'cam'" in text and "layer4" in text and "0.0313725" in text
