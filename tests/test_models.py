"""Bundled architectures (ResNet-18, PreAct-ResNet-18, WRN-34-10) and torchvision models by name."""
import pytest
import torch
import torchvision

from part_fast import models
from part_fast.cam import find_layer
from part_fast.models import BUNDLED, CAM_LAYERS, Normalize, get_model, with_normalization

# Exact parameter counts with 10 classes (standard CIFAR definitions; PreAct-ResNet-18 with the final
# BN of Rice et al. 2020): 11.17M, 11.17M, 46.16M.
PARAMS = {"resnet18": 11_173_962, "preact-resnet18": 11_172_170, "wrn34-10": 46_160_474}


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return get_model("wrn34-10").eval()


def _forward_with_layer(model, x, layer_name):
    """Logits and the output shape of the named layer, from one no-grad forward."""
    shapes = []
    handle = dict(model.named_modules())[layer_name].register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    assert len(shapes) == 1
    return out, shapes[0]


@pytest.mark.parametrize("name", ["resnet18", "preact-resnet18"])
@pytest.mark.parametrize("size", [32, 64])
def test_resnet_output_and_cam_layer_shapes(name, size):
    torch.manual_seed(0)
    model = get_model(name, num_classes=7).eval()
    out, feat = _forward_with_layer(model, torch.rand(2, 3, size, size), CAM_LAYERS[name])
    assert out.shape == (2, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert tuple(feat) == (2, 512, size // 8, size // 8)


def test_wrn_output_and_cam_layer_shapes(wrn):
    out, feat = _forward_with_layer(wrn, torch.rand(2, 3, 32, 32), "block3")
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert tuple(feat) == (2, 640, 8, 8)
    out, feat = _forward_with_layer(wrn, torch.rand(1, 3, 64, 64), "block3")
    assert out.shape == (1, 10)
    assert tuple(feat) == (1, 640, 16, 16)


@pytest.mark.parametrize("name", ["resnet18", "preact-resnet18"])
def test_parameter_counts_resnets(name):
    model = get_model(name)
    assert n_params(model) == PARAMS[name]
    assert round(n_params(model) / 1e6, 2) == 11.17


def test_parameter_count_wrn(wrn):
    assert n_params(wrn) == PARAMS["wrn34-10"]
    assert round(n_params(wrn) / 1e6, 2) == 46.16


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_num_classes_changes_only_the_classifier(name):
    if name == "wrn34-10":
        model = get_model(name, num_classes=100)
        assert model.fc.out_features == 100
        assert n_params(model) - PARAMS[name] == 90 * (640 + 1)
    else:
        base, model = get_model(name), get_model(name, num_classes=100)
        assert model.linear.out_features == 100
        features = {"cnn-small": 128, "resnet-small": 128}.get(name, 512)
        assert model.linear.in_features == features
        assert n_params(model) - n_params(base) == 90 * (features + 1)
        if name in PARAMS:
            assert n_params(base) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_cam_layer_names(name):
    model = get_model(name)
    assert CAM_LAYERS[name] in dict(model.named_modules())
    # compute_cam's default finds that layer on the bare model and behind a normalisation layer.
    assert find_layer(model) is getattr(model, CAM_LAYERS[name])
    wrapped = with_normalization(model, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert find_layer(wrapped) is getattr(model, CAM_LAYERS[name])


def test_torchvision_model_by_name():
    model = get_model("shufflenet_v2_x0_5", num_classes=7)
    assert isinstance(model, torchvision.models.ShuffleNetV2)
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 7)
    resnet = get_model("resnet34", num_classes=5)
    assert isinstance(resnet, torchvision.models.ResNet) and resnet.fc.out_features == 5
    assert find_layer(resnet) is resnet.layer4
    # Untrained: torchvision's own default init, no downloaded weights.
    assert n_params(resnet) == n_params(torchvision.models.resnet34(num_classes=5))


def test_bundled_name_wins_over_torchvision():
    # "resnet18" is also a torchvision builder; the bundled CIFAR form (3x3 stem, no max-pool) is meant.
    model = get_model("resnet18")
    assert not isinstance(model, torchvision.models.ResNet)
    assert model.conv1.kernel_size == (3, 3)


@pytest.mark.parametrize("name", ["resnet-18", "wrn28-10", "", "ResNet18"])
def test_unknown_architecture_error(name):
    with pytest.raises(ValueError, match="unknown architecture") as info:
        get_model(name)
    assert repr(name) in str(info.value)
    for bundled in BUNDLED:
        assert bundled in str(info.value)


def test_normalize_layer():
    norm = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)
    # Buffers, not parameters: they follow .to() and the state dict but are never trained.
    assert [n for n, _ in norm.named_buffers()] == ["mean", "std"] and not list(norm.parameters())


def test_every_bundled_builder_is_exported():
    """`from part_fast.models import *` gives every bundled architecture's builder, under its own name."""
    assert set(BUNDLED) == set(CAM_LAYERS)
    for name, builder in BUNDLED.items():
        assert builder.__name__ in models.__all__, f"{name}: {builder.__name__} missing from models.__all__"
        assert getattr(models, builder.__name__) is builder
    assert all(hasattr(models, exported) for exported in models.__all__)
