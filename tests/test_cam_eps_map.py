"""cam_eps_map: every backend against the reference (exactly: the output is a choice between two values),
degenerate CAMs, hand-made value checks of both modes, property tests and bad inputs. The comparison and value
tests run each backend on every device the machine has (helpers.DEVICE_BACKENDS: CUDA tensors too where
there is a GPU); the bad-input tests run on CPU tensors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    ALL_BACKENDS,
    DEVICE_ALL_BACKENDS,
    DEVICE_BACKENDS,
    DTYPES,
    Target,
    pairwise,
    rand,
    randn,
    skip_unsupported,
    target_id,
)
from part_fast import backends, ops, reference

EPS, EPS_LOW = 8 / 255, 7 / 255
MODES = ["jet", "cam"]

# (B, h, w) -> (H, W): the release's 4x4 (ResNet-18 layer4) and 8x8 (WRN block3) maps, odd ones, a 1x1 map,
# a 1x1 output, downsampling, non-square outputs, and a full CIFAR batch.
CASES = [
    ((1, 1, 1), (1, 1)),
    ((1, 1, 1), (32, 32)),
    ((3, 4, 4), (32, 32)),
    ((5, 8, 8), (32, 32)),
    ((2, 7, 5), (32, 32)),
    ((2, 7, 5), (13, 29)),
    ((2, 3, 9), (1, 1)),
    ((2, 40, 40), (32, 32)),
    ((1, 4, 4), (64, 48)),
    ((128, 4, 4), (32, 32)),
]


def case_id(c):
    (b, h, w), (H, W) = c
    return f"{b}x{h}x{w}-to-{H}x{W}"


def run(backend, cam, size, eps=EPS, eps_low=EPS_LOW, mode="jet"):
    """The op on `backend`; a GPU target (helpers.Target) runs on a copy of the CAM on its device, with the
    same strides, and returns the map on the CPU."""
    target = backend if isinstance(backend, Target) else Target(backend)
    with ops.use_backend(backend):
        out = ops.cam_eps_map(target.to_device(cam), size, eps, eps_low, mode)
    assert out.device.type == target.device.type, "the map is made on the CAM's device"
    return out.cpu()


def check_values(out, cam_shape, size, eps, eps_low, mode):
    """Shape, dtype, and every value exactly eps or eps_low (float32): no NaN, nothing left unwritten."""
    b = cam_shape[0]
    assert out.shape == (b, 3 if mode == "jet" else 1, *size)
    assert out.dtype == torch.float32
    hi = torch.tensor(eps, dtype=torch.float32)
    lo = torch.tensor(eps_low, dtype=torch.float32)
    assert ((out == hi) | (out == lo)).all(), "a value is neither eps nor eps_low"


def random_cam(shape, gen, dtype, kind):
    if kind == "randn":  # raw CAM before ReLU: negative values too
        c = randn(shape, gen)
    elif kind == "peaked":  # a realistic post-ReLU CAM: mostly small, a few large
        c = rand(shape, gen) ** 4 * 3.0
    else:
        raise AssertionError(kind)
    return c.to(dtype)


# ------------------------------------------------------------------------------------ vs reference
def _comparison_cases() -> list[tuple]:
    """(mode, dtype, kind, case) for the comparison with the reference, where the full product has 160: every
    shape case in both modes on float32 raw CAMs (the walk of the resize depends on the shapes and the mode),
    plus every pair of values of any two of the four parameters (helpers.pairwise)."""
    core = [(mode, torch.float32, "randn", case) for mode in MODES for case in CASES]
    pairs = [(c["mode"], c["dtype"], c["kind"], c["case"])
             for c in pairwise(mode=MODES, dtype=DTYPES, kind=["randn", "peaked"], case=CASES)]
    return list(dict.fromkeys(core + pairs))


def comparison_id(c) -> str:
    mode, dtype, kind, case = c
    return f"{mode}-{str(dtype).replace('torch.', '')}-{kind}-{case_id(case)}"


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("comparison", _comparison_cases(), ids=comparison_id)
def test_matches_reference(backend, comparison, gen):
    """Exactly the reference's map, every value eps or eps_low, the CAM untouched."""
    mode, dtype, kind, case = comparison
    cam_shape, size = case
    skip_unsupported(backend, dtype, cam_shape[0] * 3 * size[0] * size[1])
    cam = random_cam(cam_shape, gen, dtype, kind)
    cam_before = cam.clone()
    expected = reference.cam_eps_map(cam, size, EPS, EPS_LOW, mode)
    out = run(backend, cam, size, mode=mode)
    check_values(out, cam_shape, size, EPS, EPS_LOW, mode)
    assert torch.equal(out, expected)
    assert torch.equal(cam, cam_before), "cam is read-only"


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("budget", [(EPS, EPS_LOW), (1, 0), (0.03, 0.03), (0.0, 0.0), (16 / 255, 0.0)])
def test_matches_reference_budget_forms(backend, mode, budget, gen):
    eps, eps_low = budget
    cam = random_cam((3, 4, 4), gen, torch.float32, "randn")
    expected = reference.cam_eps_map(cam, (32, 32), eps, eps_low, mode)
    out = run(backend, cam, (32, 32), eps, eps_low, mode)
    check_values(out, cam.shape, (32, 32), eps, eps_low, mode)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_cam(backend, mode, gen):
    cam = random_cam((3, 5, 7), gen, torch.float32, "randn").transpose(1, 2)
    assert not cam.is_contiguous()
    expected = reference.cam_eps_map(cam.contiguous(), (32, 32), EPS, EPS_LOW, mode)
    assert torch.equal(run(backend, cam, (32, 32), mode=mode), expected)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("size", [32, (32, 32), [32, 32], torch.Size([32, 32])], ids=["int", "tuple", "list", "Size"])
def test_size_forms(backend, size, gen):
    cam = random_cam((2, 4, 4), gen, torch.float32, "randn")
    expected = reference.cam_eps_map(cam, (32, 32), EPS, EPS_LOW)
    assert torch.equal(run(backend, cam, size), expected)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(backend, mode):
    out = run(backend, torch.empty((0, 4, 4)), (32, 32), mode=mode)
    assert out.shape == (0, 3 if mode == "jet" else 1, 32, 32) and out.dtype == torch.float32


# ------------------------------------------------------------------------------ degenerate CAMs
def _degenerate(name, h=4, w=4):
    c = torch.zeros((h, w))
    if name == "all_zero":
        return c
    if name == "all_equal":
        return c + 0.7
    if name == "all_negative":  # ReLU makes it all zero
        return c - torch.arange(h * w, dtype=torch.float32).reshape(h, w) - 1
    if name == "one_by_one":
        return torch.tensor([[3.0]])
    if name == "nan":
        c = torch.rand((h, w), generator=torch.Generator().manual_seed(1))
        c[1, 2] = float("nan")
        return c
    if name == "posinf":
        c = torch.rand((h, w), generator=torch.Generator().manual_seed(2))
        c[0, 3] = float("inf")
        return c
    if name == "all_nan":
        return c + float("nan")
    raise AssertionError(name)


DEGENERATE = ["all_zero", "all_equal", "all_negative", "one_by_one", "nan", "posinf", "all_nan"]


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("name, dtype, mode", [
    pytest.param(c["name"], c["dtype"], c["mode"], id=f"{c['name']}-{str(c['dtype']).replace('torch.', '')}-{c['mode']}")
    for c in pairwise(name=DEGENERATE, dtype=DTYPES, mode=MODES)])
def test_degenerate_cam_gives_eps_low_everywhere(backend, mode, dtype, name, gen):
    """A degenerate CAM (all equal after ReLU, or not finite) gives eps_low everywhere for its image, and
    does not disturb the other images of the batch. Every kind of degenerate CAM in every dtype and both
    modes, every dtype in both modes (pairwise: 28 cases per backend, not 56)."""
    skip_unsupported(backend, dtype)
    bad = _degenerate(name)
    h, w = bad.shape
    good = rand((2, h, w), gen) ** 2
    cam = torch.stack([good[0], bad, good[1]]).to(dtype)
    out = run(backend, cam, (32, 32), mode=mode)
    check_values(out, cam.shape, (32, 32), EPS, EPS_LOW, mode)
    assert (out[1] == torch.tensor(EPS_LOW, dtype=torch.float32)).all()
    alone = run(backend, cam[[0, 2]], (32, 32), mode=mode)
    assert torch.equal(out[[0, 2]], alone)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("mode", MODES)
def test_float64_cam_overflowing_float32_is_degenerate(backend, mode):
    """The CAM is rounded to float32 as the release's PIL "F" image was: 1e300 becomes inf."""
    skip_unsupported(backend, torch.float64)
    cam = torch.rand((2, 4, 4), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cam[0, 2, 2] = 1e300
    out = run(backend, cam, (32, 32), mode=mode)
    assert (out[0] == torch.tensor(EPS_LOW, dtype=torch.float32)).all()
    assert torch.equal(out, reference.cam_eps_map(cam, (32, 32), EPS, EPS_LOW, mode))


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("mode", MODES)
def test_negative_infinity_matches_reference(backend, mode):
    """-inf in a raw CAM: the reference applies ReLU first (-inf -> 0, an ordinary map); every backend must
    agree with it, whichever rule is chosen."""
    cam = torch.rand((2, 4, 4), generator=torch.Generator().manual_seed(4))
    cam[0, 1, 1] = -float("inf")
    expected = reference.cam_eps_map(cam, (32, 32), EPS, EPS_LOW, mode)
    assert torch.equal(run(backend, cam, (32, 32), mode=mode), expected)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("mode", MODES)
def test_negative_infinity_is_relu_zero(backend, mode):
    """ReLU(-inf) = 0: -inf is not degenerate; a CAM with -inf where it had a negative value gives the
    same budget."""
    cam = torch.rand((2, 4, 4), generator=torch.Generator().manual_seed(5))
    cam[0, 1, 1] = -0.5
    with_inf = cam.clone()
    with_inf[0, 1, 1] = -float("inf")
    out = run(backend, with_inf, (32, 32), mode=mode)
    assert torch.equal(out, run(backend, cam, (32, 32), mode=mode))
    assert (out[0] == torch.tensor(EPS, dtype=torch.float32)).any()


# ------------------------------------------------------------------------------ value semantics
@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
def test_cam_mode_known_region_identity_resize(backend):
    """mode "cam", output size = map size (PIL's bicubic resize is then the identity): a 3x3 block at
    CAM 1 over a floor of 0.1 normalises to {1, 0}; its z-score is (1 - 9/64) / sqrt(9/64 * 55/64) = 2.47 > 1
    and the floor's is < 1: eps exactly on the block."""
    cam = torch.full((1, 8, 8), 0.1)
    cam[0, 2:5, 3:6] = 1.0
    out = run(backend, cam, (8, 8), 0.5, 0.25, "cam")
    expected = torch.full((1, 1, 8, 8), 0.25)
    expected[0, 0, 2:5, 3:6] = 0.5
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
def test_cam_mode_known_region_upsampled(backend):
    """mode "cam", 4x4 -> 32x32: a high central 2x2 block of the map gives eps in the centre of the image
    and eps_low along every border."""
    cam = torch.zeros((1, 4, 4))
    cam[0, 1:3, 1:3] = 1.0
    out = run(backend, cam, (32, 32), 0.5, 0.25, "cam")[0, 0]
    assert (out[12:20, 12:20] == 0.5).all()
    for border in (out[:8], out[24:], out[:, :8], out[:, 24:]):
        assert (border == 0.25).all()
    assert 0.15 < float((out == 0.5).float().mean()) < 0.35


def _hand_jet(x):
    """matplotlib's jet at x in [0, 1] from its breakpoints, written out piece by piece."""
    if x <= 0.35:
        r = 0.0
    elif x <= 0.66:
        r = (x - 0.35) / 0.31
    elif x <= 0.89:
        r = 1.0
    else:
        r = 1.0 - 0.5 * (x - 0.89) / 0.11
    if x <= 0.125:
        g = 0.0
    elif x <= 0.375:
        g = (x - 0.125) / 0.25
    elif x <= 0.64:
        g = 1.0
    elif x <= 0.91:
        g = (0.91 - x) / 0.27
    else:
        g = 0.0
    if x <= 0.11:
        b = 0.5 + 0.5 * x / 0.11
    elif x <= 0.34:
        b = 1.0
    elif x <= 0.65:
        b = (0.65 - x) / 0.31
    else:
        b = 0.0
    return r, g, b


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
def test_jet_mode_per_channel_budget_hand_made(backend):
    """mode "jet", identity resize, a hand-made CAM: left half 0.9 (squared 0.81 -> jet entry 207, red 1,
    green 0.36, blue 0), right half 0.45 (squared 0.2025 -> entry 51, red 0, green 0.3, blue 1), one pixel
    at 1 (entry 255, (0.5, 0, 0)) and one at 0 (entry 0, (0, 0, 0.5)) fixing the min-max. The z-score over
    all 3*64 values keeps only the 1s: red gets eps where the CAM is high, blue where it is low, green
    never."""
    cam = torch.full((1, 8, 8), 0.45)
    cam[0, :, :4] = 0.9
    cam[0, 0, 0] = 1.0
    cam[0, 7, 7] = 0.0
    out = run(backend, cam, (8, 8), 0.5, 0.25, "jet")[0]

    # The expected map from the breakpoints by hand, the LUT index rule floor(v^2 * 256), and the z-score.
    v = cam[0].numpy().astype(np.float32)
    v2 = v * v
    idx = np.minimum(np.floor(v2.astype(np.float64) * 256), 255)
    rgb = np.array([[_hand_jet(i / 255) for i in row] for row in idx]).transpose(2, 0, 1)
    z = (rgb - rgb.mean()) / rgb.std()
    expected = np.where(z > 1, 0.5, 0.25).astype(np.float32)
    assert np.array_equal(out.numpy(), expected)

    red, green, blue = out
    left, right = torch.zeros((8, 8), dtype=torch.bool), torch.zeros((8, 8), dtype=torch.bool)
    left[:, :4] = True
    right[:, 4:] = True
    left[0, 0] = right[7, 7] = False
    assert (red[left] == 0.5).all() and (red[~left] == 0.25).all()
    assert (blue[right] == 0.5).all() and (blue[~right] == 0.25).all()
    assert (green == 0.25).all()


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
def test_jet_mode_upsampled_channels_differ(backend, gen):
    """The jet budget is per colour channel: on a real-looking CAM the three channels differ, and the red
    channel's eps region lies where the upsampled CAM is high, the blue channel's where it is low."""
    cam = torch.zeros((1, 4, 4))
    cam[0, 0, 0] = 1.0  # a peak in the top-left corner, decaying away
    cam[0, 0, 1] = cam[0, 1, 0] = 0.6
    cam[0, 1, 1] = 0.4
    out = run(backend, cam, (32, 32), 0.5, 0.25, "jet")[0]
    up = reference.pil_bicubic_resize(reference.minmax_normalize(cam)[0], (32, 32))[0]
    red, blue = out[0] == 0.5, out[2] == 0.5
    assert red.any() and blue.any()
    assert not torch.equal(out[0], out[2])
    assert float(up[red].min()) > float(up[blue].max()), "red keeps eps on higher CAM values than blue"


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("mode", MODES)
def test_batch_independent(backend, mode, gen):
    """Results do not change with the batch an image is in (docs/method.md §7)."""
    cam = random_cam((6, 4, 4), gen, torch.float32, "randn")
    full = run(backend, cam, (32, 32), mode=mode)
    for i in range(6):
        assert torch.equal(full[i : i + 1], run(backend, cam[i : i + 1], (32, 32), mode=mode))
    assert torch.equal(full.flip(0), run(backend, cam.flip(0), (32, 32), mode=mode))


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("mode", MODES)
def test_invariant_to_power_of_two_scale_and_negative_part(backend, mode, gen):
    """Min-max normalisation after ReLU: scaling by 2**k is exact, and negative values are all ReLU'd away."""
    cam = random_cam((4, 4, 4), gen, torch.float32, "randn")
    base = run(backend, cam, (32, 32), mode=mode)
    assert torch.equal(base, run(backend, cam * 8.0, (32, 32), mode=mode))
    assert torch.equal(base, run(backend, cam * 2.0**-20, (32, 32), mode=mode))
    other_negatives = torch.where(cam < 0, cam * 3.0 - 1.0, cam)
    assert torch.equal(base, run(backend, other_negatives, (32, 32), mode=mode))


# ----------------------------------------------------------------------------- property tests
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cam_case(draw):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 6))
    w = draw(st.integers(1, 6))
    values = st.one_of(
        st.floats(-10.0, 10.0, width=32),
        st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 3e38, 1e-40]),
    )
    data = draw(st.lists(values, min_size=b * h * w, max_size=b * h * w))
    cam = torch.tensor(data, dtype=torch.float32).reshape(b, h, w)
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    eps_low = draw(st.floats(0.0, 1.0))
    eps = draw(st.floats(eps_low, 2.0))
    mode = draw(st.sampled_from(MODES))
    return cam, size, eps, eps_low, mode


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
def test_property_values_are_eps_or_eps_low(backend):
    @PROPERTY
    @given(cam_case())
    def check(case):
        cam, size, eps, eps_low, mode = case
        out = run(backend, cam, size, eps, eps_low, mode)
        check_values(out, cam.shape, size, eps, eps_low, mode)
        nonfinite = ~torch.isfinite(cam.flatten(1)).all(1)
        assert (out[nonfinite & ~torch.isneginf(cam.flatten(1)).any(1)] == torch.tensor(eps_low)).all()

    check()


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
def test_property_matches_reference(backend):
    @PROPERTY
    @given(cam_case())
    def check(case):
        cam, size, eps, eps_low, mode = case
        assert torch.equal(run(backend, cam, size, eps, eps_low, mode),
                           reference.cam_eps_map(cam, size, eps, eps_low, mode))

    check()


# ---------------------------------------------------------------------------------- bad inputs
def _cam():
    return torch.rand((2, 4, 4), generator=torch.Generator().manual_seed(0))


BAD_CASES = {
    "cam_2d": (ValueError, lambda: dict(cam=_cam()[0])),
    "cam_4d": (ValueError, lambda: dict(cam=_cam()[:, None])),
    "cam_empty_map": (ValueError, lambda: dict(cam=torch.zeros((2, 0, 4)))),
    "cam_int": (TypeError, lambda: dict(cam=(_cam() * 10).to(torch.int32))),
    "cam_uint8": (TypeError, lambda: dict(cam=(_cam() * 10).to(torch.uint8))),
    "cam_bool": (TypeError, lambda: dict(cam=_cam() > 0.5)),
    "cam_complex": (TypeError, lambda: dict(cam=_cam().to(torch.complex64))),
    "cam_not_tensor": (TypeError, lambda: dict(cam=_cam().tolist())),
    "size_zero": (ValueError, lambda: dict(size=(0, 32))),
    "size_negative": (ValueError, lambda: dict(size=-32)),
    "size_three": (TypeError, lambda: dict(size=(32, 32, 3))),
    "size_float": (TypeError, lambda: dict(size=(32.0, 32.0))),
    "size_bool": (TypeError, lambda: dict(size=True)),
    "size_none": (TypeError, lambda: dict(size=None)),
    "eps_negative": (ValueError, lambda: dict(eps=-0.1, eps_low=-0.2)),
    "eps_low_negative": (ValueError, lambda: dict(eps_low=-1e-3)),
    "eps_low_gt_eps": (ValueError, lambda: dict(eps=7 / 255, eps_low=8 / 255)),
    "eps_nan": (ValueError, lambda: dict(eps=float("nan"))),
    "eps_inf": (ValueError, lambda: dict(eps=float("inf"))),
    "eps_low_nan": (ValueError, lambda: dict(eps_low=float("nan"))),
    "eps_str": (TypeError, lambda: dict(eps="0.03")),
    "eps_tensor": (TypeError, lambda: dict(eps=torch.tensor(0.03))),
    "eps_low_bool": (TypeError, lambda: dict(eps_low=False)),
    "mode_unknown": (ValueError, lambda: dict(mode="viridis")),
    "mode_case": (ValueError, lambda: dict(mode="JET")),
    "mode_none": (TypeError, lambda: dict(mode=None)),
    "mode_int": (TypeError, lambda: dict(mode=1)),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises(backend, case):
    """Every backend raises the same exception type for a bad argument."""
    exc, make = BAD_CASES[case]
    args = dict(cam=_cam(), size=(32, 32), eps=EPS, eps_low=EPS_LOW, mode="jet")
    args.update(make())
    with ops.use_backend(backend), pytest.raises(exc):
        ops.cam_eps_map(args["cam"], args["size"], args["eps"], args["eps_low"], args["mode"])


# README "Fused ops": float64 on the CPU only. On CUDA tensors the compiled kernels (cuda) and Triton reject
# it with a TypeError naming the argument; the reference runs float64 anywhere.
FLOAT64_REJECTED_ON = {"reference": (), "cpu": (), "cuda": ("cuda",), "triton": ("cuda",)}


def _float64_calls(device):
    """Each op called with float64 tensors on `device`: (op name, argument named in the error, call)."""
    gen = torch.Generator().manual_seed(6)
    x_nat = rand((2, 3, 8, 8), gen, torch.float64).to(device)
    grad = randn((2, 3, 8, 8), gen, torch.float64).to(device)
    cam = randn((2, 4, 4), gen, torch.float64).to(device)
    return [
        ("pgd_step_", "x_adv", lambda: ops.pgd_step_(x_nat.clone(), grad, x_nat, EPS, 2 / 255)),
        ("project_", "x_adv", lambda: ops.project_(x_nat.clone(), x_nat, EPS)),
        ("cam_eps_map", "cam", lambda: ops.cam_eps_map(cam, (8, 8), EPS, EPS_LOW)),
    ]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float64_accepted_on_cpu_by_every_backend(backend):
    """float64 CPU tensors run on every backend: the attack ops in float64, the CAM rounded to float32 first."""
    assert "cpu" not in FLOAT64_REJECTED_ON[backend]
    gen = torch.Generator().manual_seed(7)
    x_adv, grad, x_nat = (t.double() for t in (rand((2, 3, 8, 8), gen), randn((2, 3, 8, 8), gen), rand((2, 3, 8, 8), gen)))
    with ops.use_backend(backend):
        stepped = ops.pgd_step_(x_adv.clone(), grad, x_nat, EPS, 2 / 255)
        projected = ops.project_(x_adv.clone(), x_nat, EPS)
    assert stepped.dtype == projected.dtype == torch.float64
    # float64 math, not float32 rounded back: the reference computed the same way in float64
    assert torch.equal(stepped, reference.pgd_step_(x_adv.clone(), grad, x_nat, EPS, 2 / 255))
    assert torch.equal(projected, reference.project_(x_adv.clone(), x_nat, EPS))
    assert not torch.equal(stepped, reference.pgd_step_(x_adv.float(), grad.float(), x_nat.float(), EPS, 2 / 255).double())
    cam = _cam().double()
    assert torch.equal(run(backend, cam, (32, 32)), reference.cam_eps_map(cam.float(), (32, 32), EPS, EPS_LOW))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_float64_rejected_on_cuda(backend):
    """float64 CUDA tensors: the cuda and triton backends raise a TypeError naming the argument."""
    assert FLOAT64_REJECTED_ON[backend] == ("cuda",)
    if not torch.cuda.is_available() or backend not in ops.available_backends("cuda"):
        pytest.skip(f"no GPU, or backend {backend!r} not built / installed for CUDA here; "
                    "test_float64_rejected_only_where_documented covers Triton's check without a GPU")
    with ops.use_backend(backend):
        for op, argument, call in _float64_calls("cuda"):
            with pytest.raises(TypeError, match=f"{argument} must be .*float64 is CPU-only"):
                call()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float64_rejected_only_where_documented(backend, monkeypatch):
    """Off the CPU (meta tensors stand in for CUDA ones on a machine without a GPU), each backend rejects
    float64 exactly where documented, before any kernel runs: triton with a TypeError naming the argument,
    the reference never. The cuda backend's own check (C++) needs a GPU: test_float64_rejected_on_cuda."""
    if backend == "cpu":
        pytest.skip("the cpu backend runs CPU tensors only, where float64 is accepted "
                    "(test_float64_accepted_on_cpu_by_every_backend)")
    real_usable = backends._usable
    # let the backend take meta tensors as if they were on a GPU, so that its argument checks run
    monkeypatch.setattr(backends, "_usable", lambda name, device_type: name == backend or real_usable(name, device_type))
    for op, argument, call in _float64_calls("meta"):
        with ops.use_backend(backend):
            if "cuda" in FLOAT64_REJECTED_ON[backend]:
                with pytest.raises(TypeError, match=f"{argument} must be .*float64 is CPU-only"):
                    call()
            elif op != "cam_eps_map":  # the reference's CAM resize runs numpy: no meta tensors
                out = call()
                assert out.device.type == "meta" and out.dtype == torch.float64, op


def test_cases_cover_odd_shapes():
    """Guard against the parametrisation silently losing its odd shapes."""
    assert any(math.prod(c[0][1:]) == 1 for c in CASES)
    assert any(c[0][1] != c[0][2] for c in CASES)
    assert any(c[1][0] != c[1][1] for c in CASES)
