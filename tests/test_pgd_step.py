"""pgd_step_ and project_: every backend against the reference, invariants, and every bad input. The
comparison and invariant tests run each backend on every device the machine has (helpers.DEVICE_BACKENDS:
CUDA tensors too where there is a GPU); the bad-input tests run on CPU tensors."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    ALL_BACKENDS,
    BACKENDS,
    DEVICE_ALL_BACKENDS,
    DEVICE_BACKENDS,
    DTYPES,
    EPS,
    EPS_FORMS,
    LAYOUTS,
    STEP,
    Target,
    assert_same_attack_result,
    attack_inputs,
    distinct_eps_forms,
    make_eps,
    pairwise,
    rand,
    randn,
    same_bits,
    seed_of,
    skip_unsupported,
    target_id,
    to_layout,
)
from part_fast import ops, reference

SHAPES = [(1, 1, 1, 1), (3, 3, 7, 5), (2, 3, 32, 32), (4, 1, 9, 1), (128, 3, 32, 32)]
ODD = (3, 3, 7, 5)
OPS = ["pgd_step_", "project_"]


def _comparison_cases() -> list[tuple]:
    """(eps_form, layout, dtype, shape) for the comparison with the reference: a small exhaustive core plus
    pairwise coverage of the rest, where the full product has 680 cases (of which some are the same case
    twice: the form that is plain "bchw" in a layout).
    - every eps form in each layout, on the odd shape, float32 (each form is another walk of the budget);
    - every dtype x layout x shape with the jet mask's dense budget (the vector paths and the tails
      depend on these three);
    - every pair of values of any two of the four parameters (helpers.pairwise)."""
    core = [(form, layout, torch.float32, ODD) for layout in LAYOUTS for form in distinct_eps_forms(layout)]
    dense = [("bchw", layout, dtype, shape) for dtype in DTYPES for layout in LAYOUTS for shape in SHAPES]
    pairs = [(c["eps_form"], c["layout"], c["dtype"], c["shape"])
             for c in pairwise(eps_form=EPS_FORMS, layout=LAYOUTS, dtype=DTYPES, shape=SHAPES)]
    cases = []
    for form, layout, dtype, shape in core + dense + pairs:
        form = form if form in distinct_eps_forms(layout) else "bchw"
        if (form, layout, dtype, shape) not in cases:
            cases.append((form, layout, dtype, shape))
    return cases


COMPARISON_CASES = _comparison_cases()


def case_id(case) -> str:
    form, layout, dtype, shape = case
    return f"{form}-{layout}-{str(dtype).replace('torch.', '')}-{'x'.join(map(str, shape))}"


def run(op, backend, x_adv, grad, x_nat, eps, step=STEP, lo=0.0, hi=1.0):
    """The op on `backend`, in place on x_adv. A GPU target (helpers.Target) runs on copies of the inputs on
    its device, with the same strides, and writes the result back into x_adv."""
    target = backend if isinstance(backend, Target) else Target(backend)
    d_adv, d_grad, d_nat, d_eps = (target.to_device(t) for t in (x_adv, grad, x_nat, eps))
    with ops.use_backend(backend):
        if op == "pgd_step_":
            out = ops.pgd_step_(d_adv, d_grad, d_nat, d_eps, step, lo, hi)
        else:
            out = ops.project_(d_adv, d_nat, d_eps, lo, hi)
    assert out is d_adv, "the in-place ops return x_adv itself"
    if target.on_gpu:
        assert out.device == target.device and out.stride() == x_adv.stride(), "x_adv keeps its device and layout"
        for name, moved, given in (("grad", d_grad, grad), ("x_nat", d_nat, x_nat), ("eps", d_eps, eps)):
            if isinstance(given, torch.Tensor):
                assert torch.equal(moved.cpu().nan_to_num(7.0), given.nan_to_num(7.0)), f"{name} is read-only"
        x_adv.copy_(out.cpu())
    return x_adv


def run_reference(op, x_adv, grad, x_nat, eps, step=STEP, lo=0.0, hi=1.0):
    if op == "pgd_step_":
        return reference.pgd_step_(x_adv, grad, x_nat, eps, step, lo, hi)
    return reference.project_(x_adv, x_nat, eps, lo, hi)


def eps_dense(eps, like):
    """The budget as a float64 tensor of x_adv's shape, as the op sees it (rounded to the compute dtype)."""
    if isinstance(eps, torch.Tensor):
        ct = torch.float64 if like.dtype == torch.float64 else torch.float32
        return eps.to(ct).to(torch.float64).expand(like.shape)
    return torch.full(like.shape, float(eps), dtype=torch.float64)


def assert_in_ball_and_box(out, x_nat, eps, lo, hi):
    """lo <= x_adv <= hi exactly (lo, hi representable) and |x_adv - x_nat| <= eps up to the rounding of
    x_nat +- eps in the compute and storage dtypes (one ulp of the storage dtype)."""
    o, xn, e = out.to(torch.float64), x_nat.to(torch.float64), eps_dense(eps, out)
    assert not out.isnan().any()
    assert (o >= lo).all() and (o <= hi).all(), "x_adv left the box [lo, hi]"
    fi = torch.finfo(out.dtype)
    tol = fi.eps * (xn.abs() + e) + fi.tiny
    excess = (o - xn).abs() - e
    assert (excess <= tol).all(), f"x_adv left the eps ball by {float(excess.max())}"


# ------------------------------------------------------------------------------------ vs reference
_SHARED: dict = {}


def comparison_inputs(op, case):
    """(x_adv, grad, x_nat, eps, the reference's result) of a comparison case, made once and shared by the
    backends, which run one after another: the inputs are seeded by the op and the case (not the backend), so
    every backend is compared on the same inputs, and the reference (most of a case's time at CIFAR-batch
    size) runs once. The test never writes them: x_adv is cloned, and the others are checked unchanged."""
    if _SHARED.get("key") != (op, case):
        _SHARED.clear()
        eps_form, layout, dtype, shape = case
        gen = torch.Generator().manual_seed(seed_of(f"{op}-{case_id(case)}"))
        x_adv, grad, x_nat = attack_inputs(shape, dtype, layout, gen)
        eps = make_eps(eps_form, shape, layout, gen, dtype)
        expected = run_reference(op, x_adv.clone(), grad, x_nat, eps)
        _SHARED.update(key=(op, case), inputs=(x_adv, grad, x_nat, eps, expected))
    return _SHARED["inputs"]


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", COMPARISON_CASES, ids=case_id)
def test_matches_reference(backend, op, case):
    """Element for element the reference's result (NaN where it has NaN), x_adv in its layout, the other
    inputs untouched, the result inside the ball and the box."""
    eps_form, layout, dtype, shape = case
    skip_unsupported(backend, dtype, math.prod(shape))
    x_adv, grad, x_nat, eps, expected = comparison_inputs(op, case)
    x_adv = x_adv.clone()  # preserves the layout
    before = [(t, t.clone()) for t in (grad, x_nat, eps) if isinstance(t, torch.Tensor)]

    out = run(op, backend, x_adv, grad, x_nat, eps)

    # Inputs other than x_adv are read-only (bit for bit).
    if not all(same_bits(t, copy) for t, copy in before):
        _SHARED.clear()  # the next backend must not compare on inputs this one changed
        raise AssertionError(f"backend {backend!r} wrote into grad, x_nat or eps")
    assert_same_attack_result(out, expected, backend)
    assert out.stride() == to_layout(torch.empty(shape), layout).stride(), "x_adv keeps its layout"
    assert_in_ball_and_box(out, x_nat, eps, 0.0, 1.0)


BOXES = [(0.25, 0.75), (0.5, 0.5), (-1.0, 2.0), (-math.inf, math.inf), (0.0, 0.0)]


def params(names: str, cases: list[dict]) -> list:
    """pytest.param tuples of `names` (comma-separated) from helpers.pairwise cases, with readable ids."""
    keys = [n.strip() for n in names.split(",")]

    def text(v):
        return str(v).replace("torch.", "").replace(" ", "")

    return [pytest.param(*(c[k] for k in keys), id="-".join(text(c[k]) for k in keys)) for c in cases]


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("op, box, dtype", params("op, box, dtype", pairwise(box=BOXES, dtype=DTYPES, op=OPS)))
def test_matches_reference_other_boxes(backend, op, box, dtype, gen):
    """Every box with every dtype, each op with every box and every dtype (pairwise: 20 cases, not 40)."""
    skip_unsupported(backend, dtype)
    shape = (3, 3, 7, 5)
    lo, hi = box
    x_adv, grad, x_nat = attack_inputs(shape, dtype, "contiguous", gen)
    eps = rand((3, 1, 7, 5), gen, high=0.1)
    expected = run_reference(op, x_adv.clone(), grad, x_nat, eps, 0.03, lo, hi)
    out = run(op, backend, x_adv, grad, x_nat, eps, 0.03, lo, hi)
    assert_same_attack_result(out, expected, backend)
    assert (out.to(torch.float64) >= lo).all() and (out.to(torch.float64) <= hi).all()


def _task_split_cases() -> list:
    """(backend, threads, eps_form, layout): the cpu backend on 1, 3 and 4 threads (its task split); the
    other backends do not split work by torch's threads, so each of their cases runs once, on 1."""
    return [pytest.param(backend, threads, form, layout, id=f"{backend}-{threads}-{form}-{layout}")
            for backend in BACKENDS for threads in ((1, 3, 4) if backend == "cpu" else (1,))
            for form in ("b1hw", "strided", "1c11", "bchw") for layout in LAYOUTS]


@pytest.mark.parametrize("backend, threads, eps_form, layout", _task_split_cases())
def test_matches_reference_across_task_splits(backend, threads, eps_form, layout, gen):
    """An odd shape larger than the CPU kernel's grain (32768), so parallel tasks start mid-row of a
    broadcast budget."""
    shape = (5, 3, 61, 67)
    skip_unsupported(backend, torch.float32, math.prod(shape))
    x_adv, grad, x_nat = attack_inputs(shape, torch.float32, layout, gen)
    eps = make_eps(eps_form, shape, layout, gen)
    expected = reference.pgd_step_(x_adv.clone(), grad, x_nat, eps, STEP)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = run("pgd_step_", backend, x_adv, grad, x_nat, eps)
    finally:
        torch.set_num_threads(previous)
    assert_same_attack_result(out, expected, backend)


def test_assert_same_attack_result_checks_the_backend():
    """The comparison helper names the backend that differs, refuses to compare the reference with
    itself, takes NaN for NaN, and leaves the sign of a zero alone (torch's own clamps do not fix it)."""
    expected = torch.tensor([0.5, float("nan"), 0.0, -1.0])
    assert_same_attack_result(torch.tensor([0.5, float("nan"), -0.0, -1.0]), expected, "triton")
    with pytest.raises(AssertionError, match=r"backend 'cpu' differs .* at 1 of 4 elements; first at \(3,\)"):
        assert_same_attack_result(torch.tensor([0.5, float("nan"), 0.0, -0.999]), expected, "cpu")
    with pytest.raises(AssertionError, match="backend 'triton' differs"):
        assert_same_attack_result(torch.tensor([0.5, 0.0, 0.0, -1.0]), expected, "triton")
    with pytest.raises(AssertionError, match="against itself"):
        assert_same_attack_result(expected.clone(), expected, "reference")
    with pytest.raises(AssertionError, match="'cuda'"):
        assert_same_attack_result(expected.double(), expected, "cuda")


# ------------------------------------------------------------------------------ value semantics
@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_is_step_size_times_sign(backend, dtype, gen):
    """Inside a box and ball too large to bind, the update is exactly x + step * sign(grad) (computed in
    float32 for half types), with sign(0) = sign(NaN) = 0."""
    skip_unsupported(backend, dtype)
    shape = (2, 3, 5, 4)
    x_adv, grad, x_nat = attack_inputs(shape, dtype, "contiguous", gen)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    g = grad.to(ct)
    sign = torch.where(g > 0, 1.0, torch.where(g < 0, -1.0, 0.0)).to(ct)
    expected = (x_adv.to(ct) + 0.125 * sign).to(dtype)
    out = run("pgd_step_", backend, x_adv, grad, x_nat, 10.0, 0.125, -10.0, 10.0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
def test_matches_release_update(backend, gen):
    """float32 with finite gradients: the released eager update (delta clamped, then added to x_nat) gives
    the same values up to the rounding of x_nat + (x_adv - x_nat)."""
    shape = (4, 3, 8, 8)
    x_nat = rand(shape, gen)
    x_adv = (x_nat + rand(shape, gen, low=-EPS, high=EPS)).clamp(0, 1)
    grad = randn(shape, gen)
    eps = torch.where(rand((4, 3, 8, 8), gen) < 0.5, 8 / 255, 7 / 255).to(torch.float32)
    for _ in range(10):
        expected = reference.pgd_step_release(x_adv, grad, x_nat, eps, STEP)
        out = run("pgd_step_", backend, x_adv.clone(), grad, x_nat, eps)
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-7)
        x_adv = out
        grad = randn(shape, gen)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("op, fill, layout, dtype", params("op, fill, layout, dtype", pairwise(
    dtype=DTYPES, fill=[7.0, -7.0, 0.5], layout=LAYOUTS, op=OPS)))
def test_every_element_written(backend, op, fill, layout, dtype, gen):
    """x_adv poisoned with a value outside the box (or far from x_nat) must come back inside box and ball
    everywhere, including the tail of an odd-sized tensor. Every pair of op, fill, layout and dtype."""
    shape = (3, 3, 7, 5)
    skip_unsupported(backend, dtype)
    _, grad, x_nat = attack_inputs(shape, dtype, layout, gen)
    x_nat = to_layout(x_nat.clamp(0.1, 0.9), layout)
    x_adv = to_layout(torch.full(shape, fill, dtype=dtype), layout)
    eps = rand((3, 3, 7, 5), gen, low=0.0, high=0.05)
    out = run(op, backend, x_adv, grad, x_nat, eps)
    assert_in_ball_and_box(out, x_nat, eps, 0.0, 1.0)
    if fill != 0.5:
        # a poison far above (below) x_nat lands on the upper (lower) edge of the ball
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        edge = x_nat.to(ct) + (eps.to(ct) if fill > 0 else -eps.to(ct))
        assert torch.equal(out, edge.to(dtype))


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("op, eps, box, dtype", params("op, eps, box, dtype", pairwise(
    eps=[0.0, 0, "tensor", "tensor_xdtype"], dtype=DTYPES, box=[(0.0, 1.0), (0.25, 0.75)], op=OPS)))
def test_eps_zero_returns_clipped_input(backend, op, eps, box, dtype, gen):
    """eps = 0 returns clip(x_nat, lo, hi) exactly, wherever x_adv was and whatever the gradient. Every pair
    of op, budget form, box and dtype."""
    skip_unsupported(backend, dtype)
    shape = (3, 3, 7, 5)
    x_adv, grad, x_nat = attack_inputs(shape, dtype, "contiguous", gen)
    x_adv = x_adv * 3 - 1  # far outside the box too
    if eps == "tensor":
        eps = torch.zeros((3, 1, 7, 5))
    elif eps == "tensor_xdtype":
        eps = torch.zeros(shape, dtype=dtype)
    lo, hi = box
    out = run(op, backend, x_adv, grad, x_nat, eps, STEP, lo, hi)
    assert torch.equal(out, x_nat.clamp(lo, hi))


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_gradient_takes_no_step(backend, dtype, gen):
    """sign(NaN) = 0: a NaN gradient element leaves x_adv where projection puts it, and x_adv stays finite."""
    skip_unsupported(backend, dtype)
    shape = (2, 3, 6, 6)
    x_adv, grad, x_nat = attack_inputs(shape, dtype, "contiguous", gen)
    nan_mask = rand(shape, gen) < 0.5
    grad = torch.where(nan_mask, torch.full_like(grad, float("nan")), grad)
    expected = reference.pgd_step_(x_adv.clone(), torch.nan_to_num(grad, nan=0.0), x_nat, EPS, STEP)
    out = run("pgd_step_", backend, x_adv.clone(), grad, x_nat, EPS)
    assert torch.isfinite(out).all()
    assert torch.equal(out, expected)
    # all-NaN gradient: exactly a projection
    all_nan = torch.full_like(grad, float("nan"))
    out = run("pgd_step_", backend, x_adv.clone(), all_nan, x_nat, EPS)
    assert torch.equal(out, reference.project_(x_adv.clone(), x_nat, EPS))


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("op", OPS)
def test_nan_in_x_adv_matches_reference(backend, op, gen):
    """A NaN already in x_adv is not hidden by the clamps (it stays NaN, as torch.clamp does)."""
    shape = (2, 3, 4, 4)
    x_adv, grad, x_nat = attack_inputs(shape, torch.float32, "contiguous", gen)
    x_adv[0, 1, 2, 3] = float("nan")
    expected = run_reference(op, x_adv.clone(), grad, x_nat, EPS)
    out = run(op, backend, x_adv, grad, x_nat, EPS)
    assert_same_attack_result(out, expected, backend)
    assert out[0, 1, 2, 3].isnan() and int(out.isnan().sum()) == 1


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("where", ["x_nat", "eps"])
def test_nan_bound_matches_reference(backend, op, where, gen):
    """A NaN in x_nat or in a tensor budget makes that element's bound NaN: it propagates as with
    torch.maximum / torch.minimum in the reference."""
    shape = (2, 3, 4, 4)
    x_adv, grad, x_nat = attack_inputs(shape, torch.float32, "contiguous", gen)
    eps = rand(shape, gen, high=0.05)
    if where == "x_nat":
        x_nat[1, 2, 0, 1] = float("nan")
    else:
        eps[0, 0, 3, 3] = float("nan")
    expected = run_reference(op, x_adv.clone(), grad, x_nat, eps)
    out = run(op, backend, x_adv, grad, x_nat, eps)
    assert_same_attack_result(out, expected, backend)
    assert int(out.isnan().sum()) == 1


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_subnormals_match_reference(backend, op, dtype):
    """Subnormal values of the storage dtype are neither flushed nor mangled (eps = 0 returns x_nat)."""
    skip_unsupported(backend, dtype)
    tiny = torch.finfo(dtype).tiny
    values = torch.tensor([tiny / 2, tiny / 8, tiny * 0.75, -tiny / 4, tiny, 0.0], dtype=torch.float64)
    x_nat = values.to(dtype).reshape(1, 1, 1, 6)
    x_adv = torch.zeros_like(x_nat)
    grad = torch.ones_like(x_nat)
    for eps in (0.0, torch.zeros((1, 1, 1, 6), dtype=dtype)):
        expected = run_reference(op, x_adv.clone(), grad, x_nat, eps, 0.0, -1.0, 1.0)
        assert torch.equal(expected, x_nat)
        out = run(op, backend, x_adv.clone(), grad, x_nat, eps, 0.0, -1.0, 1.0)
        assert_same_attack_result(out, expected, backend)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(backend, op):
    z = torch.empty((0, 3, 4, 4))
    out = run(op, backend, z, z.clone(), z.clone(), EPS)
    assert out.shape == (0, 3, 4, 4)


# ----------------------------------------------------------------------------- property tests
def _finite(dtype, min_value=None, max_value=None):
    width = 16 if dtype == torch.float16 else (64 if dtype == torch.float64 else 32)
    return st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=width)


def _representable(v, dtype):
    return float(torch.tensor(v, dtype=torch.float64).to(dtype))


@st.composite
def attack_case(draw, dtype):
    b = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    h = draw(st.integers(1, 5))
    w = draw(st.integers(1, 5))
    shape = (b, c, h, w)
    n = b * c * h * w
    # bounds exactly representable at the strategy's width
    big = 65504.0 if dtype == torch.float16 else (2.0**100 if dtype != torch.float64 else 2.0**1000)
    lo = _representable(draw(_finite(torch.float64, -big, big)), dtype)
    hi = _representable(draw(_finite(torch.float64, -big, big)), dtype)
    lo, hi = min(lo, hi), max(lo, hi)
    val = _finite(dtype, -big, big)
    x_nat = torch.tensor(draw(st.lists(_finite(torch.float64, lo, hi), min_size=n, max_size=n)), dtype=torch.float64)
    x_nat = x_nat.to(dtype).clamp(lo, hi).reshape(shape)  # natural images are inside the box
    x_adv = torch.tensor(draw(st.lists(val, min_size=n, max_size=n)), dtype=torch.float64).to(dtype).reshape(shape)
    # gradients may be NaN or infinite: sign(NaN) = 0 keeps x_adv finite
    grad_val = st.one_of(val, st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0]))
    grad = torch.tensor(draw(st.lists(grad_val, min_size=n, max_size=n)), dtype=torch.float64).to(dtype).reshape(shape)
    step = draw(_finite(torch.float64, 0.0, big))
    eps_kind = draw(st.sampled_from(["scalar", "tensor"]))
    if eps_kind == "scalar":
        eps = draw(_finite(torch.float64, 0.0, big))
    else:
        eps_shape = draw(st.sampled_from([shape, (b, 1, h, w), (1, c, 1, 1), ()]))
        m = math.prod(eps_shape)
        eps = torch.tensor(draw(st.lists(_finite(torch.float64, 0.0, big), min_size=m, max_size=m)))
        eps = eps.to(torch.float32).clamp(max=torch.finfo(torch.float32).max).reshape(eps_shape)
    layout = draw(st.sampled_from(LAYOUTS))
    return [to_layout(t, layout) for t in (x_adv, grad, x_nat)] + [eps, step, lo, hi]


PROPERTY = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@pytest.mark.parametrize("backend", DEVICE_ALL_BACKENDS, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_property_ball_and_box(backend, dtype):
    """For either op, any finite x_adv, x_nat in [lo, hi], any budget and any gradient (NaN and inf
    included): x_adv is finite, lo <= x_adv <= hi and |x_adv - x_nat| <= eps."""
    skip_unsupported(backend, dtype)

    @PROPERTY
    @given(st.sampled_from(OPS), attack_case(dtype))
    def check(op, case):
        x_adv, grad, x_nat, eps, step, lo, hi = case
        out = run(op, backend, x_adv, grad, x_nat, eps, step, lo, hi)
        assert_in_ball_and_box(out, x_nat, eps, lo, hi)

    check()


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_property_matches_reference(backend, dtype):
    """For either op and any inputs of attack_case: the reference's result, element for element."""
    skip_unsupported(backend, dtype)

    @PROPERTY
    @given(st.sampled_from(OPS), attack_case(dtype))
    def check(op, case):
        x_adv, grad, x_nat, eps, step, lo, hi = case
        expected = run_reference(op, x_adv.clone(), grad, x_nat, eps, step, lo, hi)
        out = run(op, backend, x_adv, grad, x_nat, eps, step, lo, hi)
        assert_same_attack_result(out, expected, backend)

    check()


# ---------------------------------------------------------------------------------- bad inputs
def _good(shape=(2, 3, 4, 4), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x_nat = rand(shape, g, dtype)
    return {"x_adv": x_nat.clone(), "grad": randn(shape, g, dtype), "x_nat": x_nat, "eps": EPS,
            "step_size": STEP, "lo": 0.0, "hi": 1.0}


def _with(**changes):
    args = _good()
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return args


BAD_CASES = {
    # shapes
    "x_adv_3d": (ValueError, lambda: _with(x_adv=lambda a: a["x_adv"][0], grad=lambda a: a["grad"][0],
                                           x_nat=lambda a: a["x_nat"][0])),
    "x_adv_5d": (ValueError, lambda: _with(x_adv=lambda a: a["x_adv"][None], grad=lambda a: a["grad"][None],
                                           x_nat=lambda a: a["x_nat"][None])),
    "grad_shape": (ValueError, lambda: _with(grad=lambda a: a["grad"][:, :2].contiguous())),
    "x_nat_shape": (ValueError, lambda: _with(x_nat=lambda a: a["x_nat"][:1].contiguous())),
    "x_nat_broadcastable_shape": (ValueError, lambda: _with(x_nat=lambda a: a["x_nat"][:1, :1].contiguous())),
    "eps_not_broadcastable": (ValueError, lambda: _with(eps=torch.full((2, 2, 4, 4), EPS))),
    "eps_broadcasts_up": (ValueError, lambda: _with(eps=torch.full((4, 3, 4, 4), EPS))),
    "eps_5d": (ValueError, lambda: _with(eps=torch.full((1, 2, 3, 4, 4), EPS))),
    # dtypes
    "grad_dtype": (TypeError, lambda: _with(grad=lambda a: a["grad"].double())),
    "x_nat_dtype": (TypeError, lambda: _with(x_nat=lambda a: a["x_nat"].half())),
    "x_adv_int": (TypeError, lambda: _with(x_adv=lambda a: a["x_adv"].to(torch.int32),
                                           grad=lambda a: a["grad"].to(torch.int32),
                                           x_nat=lambda a: a["x_nat"].to(torch.int32))),
    "x_adv_uint8": (TypeError, lambda: _with(x_adv=lambda a: a["x_adv"].to(torch.uint8),
                                             grad=lambda a: a["grad"].to(torch.uint8),
                                             x_nat=lambda a: a["x_nat"].to(torch.uint8))),
    "grad_int": (TypeError, lambda: _with(grad=lambda a: a["grad"].to(torch.int64))),
    "x_adv_bool": (TypeError, lambda: _with(x_adv=lambda a: a["x_adv"] > 0.5, grad=lambda a: a["grad"] > 0,
                                            x_nat=lambda a: a["x_nat"] > 0.5)),
    "x_adv_complex": (TypeError, lambda: _with(x_adv=lambda a: a["x_adv"].to(torch.complex64),
                                               grad=lambda a: a["grad"].to(torch.complex64),
                                               x_nat=lambda a: a["x_nat"].to(torch.complex64))),
    "eps_tensor_int": (TypeError, lambda: _with(eps=torch.ones((2, 3, 4, 4), dtype=torch.int32))),
    "eps_tensor_half_for_float_x": (TypeError, lambda: _with(eps=torch.full((2, 3, 4, 4), EPS, dtype=torch.float16))),
    "eps_tensor_double_for_float_x": (TypeError, lambda: _with(eps=torch.full((2, 3, 4, 4), EPS, dtype=torch.float64))),
    # devices (the only other device of a CPU-only machine is "meta")
    "x_nat_device": (ValueError, lambda: _with(x_nat=lambda a: a["x_nat"].to("meta"))),
    "grad_device": (ValueError, lambda: _with(grad=lambda a: a["grad"].to("meta"))),
    "eps_device": (ValueError, lambda: _with(eps=torch.full((2, 3, 4, 4), EPS, device="meta"))),
    # layouts: a non-dense x_adv is an error, not a hidden copy
    "x_adv_strided": (ValueError, lambda: _with(x_adv=lambda a: torch.zeros(2, 3, 4, 8)[..., ::2],
                                                grad=lambda a: a["grad"], x_nat=lambda a: a["x_nat"])),
    "x_adv_expanded": (ValueError, lambda: _with(x_adv=lambda a: torch.zeros(2, 3, 4, 1).expand(2, 3, 4, 4))),
    "x_adv_transposed": (ValueError, lambda: _with(x_adv=lambda a: torch.zeros(2, 3, 4, 4).transpose(2, 3))),
    "x_adv_cl_others_contiguous": (ValueError, lambda: _with(
        x_adv=lambda a: a["x_adv"].contiguous(memory_format=torch.channels_last))),
    "grad_channels_last": (ValueError, lambda: _with(grad=lambda a: a["grad"].contiguous(memory_format=torch.channels_last))),
    "x_nat_strided": (ValueError, lambda: _with(x_nat=lambda a: torch.zeros(2, 3, 4, 8)[..., ::2])),
    "grad_strided": (ValueError, lambda: _with(grad=lambda a: torch.zeros(2, 3, 8, 4)[:, :, ::2])),
    # scalars
    "eps_negative": (ValueError, lambda: _with(eps=-1e-3)),
    "eps_negative_int": (ValueError, lambda: _with(eps=-1)),
    "eps_nan": (ValueError, lambda: _with(eps=float("nan"))),
    "eps_inf": (ValueError, lambda: _with(eps=float("inf"))),
    "eps_str": (TypeError, lambda: _with(eps="0.03")),
    "eps_bool": (TypeError, lambda: _with(eps=True)),
    "eps_none": (TypeError, lambda: _with(eps=None)),
    "step_negative": (ValueError, lambda: _with(step_size=-STEP)),
    "step_nan": (ValueError, lambda: _with(step_size=float("nan"))),
    "step_str": (TypeError, lambda: _with(step_size="a")),
    "lo_gt_hi": (ValueError, lambda: _with(lo=1.0, hi=0.0)),
    "lo_nan": (ValueError, lambda: _with(lo=float("nan"))),
    "hi_nan": (ValueError, lambda: _with(hi=float("nan"))),
    "lo_tensor": (TypeError, lambda: _with(lo=torch.tensor(0.0))),
}

# project_ takes no gradient or step: the cases about them do not apply.
PROJECT_SKIP = {"grad_shape", "grad_dtype", "grad_int", "grad_device", "grad_channels_last", "grad_strided",
                "step_negative", "step_nan", "step_str"}


def _bad_input_cases() -> list:
    """(backend, op, case): every bad input once per backend. A backend checks the arguments of both ops with
    the same code (part_fast/_checks.py, csrc/checks.h), so the op alternates: across the backends each case
    that applies to both ops meets both, and each backend meets both ops."""
    cases = []
    for i, case in enumerate(sorted(BAD_CASES)):
        ops_here = ["pgd_step_"] if case in PROJECT_SKIP else OPS
        for j, backend in enumerate(ALL_BACKENDS):
            op = ops_here[(i + j) % len(ops_here)]
            cases.append(pytest.param(backend, op, case, id=f"{backend}-{op}-{case}"))
    return cases


@pytest.mark.parametrize("backend, op, case", _bad_input_cases())
def test_bad_input_raises(backend, op, case):
    """Every backend raises the same exception type for a bad argument, and leaves x_adv untouched."""
    exc, make = BAD_CASES[case]
    a = make()
    x_adv = a["x_adv"]
    before = x_adv.clone() if x_adv.device.type != "meta" else None
    with ops.use_backend(backend), pytest.raises(exc):
        if op == "pgd_step_":
            ops.pgd_step_(x_adv, a["grad"], a["x_nat"], a["eps"], a["step_size"], a["lo"], a["hi"])
        else:
            ops.project_(x_adv, a["x_nat"], a["eps"], a["lo"], a["hi"])
    if before is not None:
        assert torch.equal(x_adv, before), "a rejected call must not write x_adv"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_dense_x_adv_is_not_silently_copied(backend):
    """A strided view of a larger tensor would be updated in a hidden copy and the caller's tensor left
    stale: it must raise, and the base tensor must be unchanged."""
    base = torch.full((2, 3, 4, 8), 7.0)
    view = base[..., ::2]
    x_nat = torch.full((2, 3, 4, 4), 0.5)
    with ops.use_backend(backend), pytest.raises(ValueError, match="x_adv"):
        ops.project_(view, x_nat, EPS)
    assert (base == 7.0).all()
