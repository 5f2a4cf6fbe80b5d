"""The custom ops under PyTorch's machinery: torch.library.opcheck (schema, fake kernels, autograd
registration, AOT dispatch) and torch.compile(fullgraph=True) on CPU giving the eager result, for the
compiled extension's ops (part_fast::pgd_step_, ...) and the Triton backend's (part_fast::triton_pgd_step_,
..., run by the interpreter on CPU: conftest sets TRITON_INTERPRET=1)."""
import pytest
import torch
from torch.library import opcheck

import part_fast
from helpers import attack_inputs, pairwise, rand
from part_fast import backends, ops

EPS, EPS_LOW, STEP = 8 / 255, 7 / 255, 2 / 255

# The op families and what each needs here. The Triton ops are registered with part_fast.ops whether
# Triton is installed or not; running them needs part_fast.kernels.
_NEEDS = {
    "extension": pytest.mark.skipif(
        ops.EXTENSION_ERROR is not None, reason=f"needs the compiled extension part_fast._C ({ops.EXTENSION_ERROR!r})"
    ),
    "triton": pytest.mark.skipif(
        "triton" not in ops.available_backends("cpu"),
        reason=f"needs part_fast.kernels under TRITON_INTERPRET=1 (import error: {ops.TRITON_ERROR!r})",
    ),
}
FAMILIES = [pytest.param(family, marks=mark, id=family) for family, mark in _NEEDS.items()]
# The backend that runs each family through the public API.
BACKEND_OF = {"extension": "cpu", "triton": "triton"}


def _raw_ops(family):
    """(pgd_step_, project_, cam_eps_map) OpOverloads of a family."""
    prefix = "" if family == "extension" else "triton_"
    return tuple(getattr(torch.ops.part_fast, prefix + name).default for name in ("pgd_step_", "project_", "cam_eps_map"))


def _attack(shape, dtype, layout, seed):
    return attack_inputs(shape, dtype, layout, torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------- opcheck
def _pgd_samples():
    samples = []
    for i, (dtype, layout) in enumerate([(torch.float32, "contiguous"), (torch.float16, "channels_last"),
                                         (torch.bfloat16, "contiguous"), (torch.float64, "channels_last")]):
        x_adv, grad, x_nat = _attack((2, 3, 5, 7), dtype, layout, i)
        samples.append((x_adv, grad, x_nat, None, EPS, STEP, 0.0, 1.0))
        samples.append((x_adv.clone(), grad, x_nat, rand((2, 1, 5, 7), torch.Generator().manual_seed(i)) * 0.1,
                        0.0, STEP, 0.0, 1.0))
        samples.append((x_adv.clone(), grad, x_nat, torch.full((1, 3, 1, 1), 0.05, dtype=dtype), 0.0, STEP, -1.0, 2.0))
    return samples


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("index", range(12))
def test_opcheck_pgd_step(family, index):
    pgd_step, _, _ = _raw_ops(family)
    opcheck(pgd_step, _pgd_samples()[index])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("index", range(12))
def test_opcheck_project(family, index):
    _, project, _ = _raw_ops(family)
    x_adv, _, x_nat, eps_map, eps, _, lo, hi = _pgd_samples()[index]
    opcheck(project, (x_adv, x_nat, eps_map, eps, lo, hi))


OPCHECK_CAM_CASES = [((2, 4, 4), [32, 32]), ((3, 7, 5), [13, 29]), ((1, 1, 1), [1, 1]), ((2, 8, 8), [32, 32])]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode, case, dtype", [
    pytest.param(c["mode"], c["case"], c["dtype"], id=f"{c['mode']}-{c['case']}-{str(c['dtype']).replace('torch.', '')}")
    for c in pairwise(case=OPCHECK_CAM_CASES, dtype=[torch.float32, torch.float16, torch.float64], mode=["jet", "cam"])])
def test_opcheck_cam_eps_map(family, mode, case, dtype):
    """Every case in every dtype, each mode with every case and dtype (pairwise: 12 per family, not 24)."""
    _, _, cam_eps_map = _raw_ops(family)
    shape, size = case
    cam = rand(shape, torch.Generator().manual_seed(len(shape) + size[0]), dtype)
    opcheck(cam_eps_map, (cam, size, EPS, EPS_LOW, mode))


@pytest.mark.parametrize("family", FAMILIES)
def test_fake_kernels_give_shapes(family):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, _, cam_eps_map = _raw_ops(family)
    with FakeTensorMode():
        cam = torch.empty((5, 4, 4))
        out = cam_eps_map(cam, [32, 24], EPS, EPS_LOW, "jet")
        assert out.shape == (5, 3, 32, 24) and out.dtype == torch.float32
        out = cam_eps_map(cam.half(), [7, 9], EPS, EPS_LOW, "cam")
        assert out.shape == (5, 1, 7, 9) and out.dtype == torch.float32


@_NEEDS["triton"]
def test_triton_fake_kernels_check_arguments():
    """The Triton ops' fake kernels make the real checks, so a bad call fails while tracing, naming the
    argument; float64 is refused off the CPU (meta tensors dispatch to the fake kernel)."""
    pgd_step, project, cam_eps_map = _raw_ops("triton")
    x = torch.empty((2, 3, 4, 4), device="meta")
    with pytest.raises(ValueError, match="x_nat must have the same shape"):
        pgd_step(x, x, x[:1], None, EPS, STEP, 0.0, 1.0)
    with pytest.raises(TypeError, match="x_adv must be .*float64 is CPU-only"):
        project(x.double(), x.double(), None, EPS, 0.0, 1.0)
    with pytest.raises(ValueError, match="eps_low must be <= eps"):
        cam_eps_map(torch.empty((2, 4, 4), device="meta"), [8, 8], EPS_LOW, EPS, "jet")
    assert cam_eps_map(torch.empty((2, 4, 4), device="meta"), [8, 8], EPS, EPS_LOW, "cam").shape == (2, 1, 8, 8)


# -------------------------------------------------------------------------------- torch.compile
def _step_with_raw_ops(family):
    pgd_step, project, cam_eps_map = _raw_ops(family)

    def step(x_adv, grad, x_nat, cam):
        eps = cam_eps_map(cam, [x_adv.shape[2], x_adv.shape[3]], EPS, EPS_LOW, "jet")
        pgd_step(x_adv, grad, x_nat, eps, 0.0, STEP, 0.0, 1.0)
        project(x_adv, x_nat, None, EPS, 0.0, 1.0)
        # something after the in-place ops, so their results must be read back inside the graph
        return x_adv * 2.0, eps

    return step


def _step_with_public_api(x_adv, grad, x_nat, cam):
    eps = part_fast.cam_eps_map(cam, (x_adv.shape[2], x_adv.shape[3]), EPS, EPS_LOW)
    part_fast.pgd_step_(x_adv, grad, x_nat, eps, STEP)
    part_fast.project_(x_adv, x_nat, EPS)
    return x_adv * 2.0, eps


def _check_compiled(fn, compiler, dtype=torch.float32, layout="contiguous", shapes=((4, 3, 32, 32),), dynamic=None):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compiler, dynamic=dynamic)
    for i, shape in enumerate(shapes):
        x_adv, grad, x_nat = _attack(shape, dtype, layout, 10 + i)
        cam = rand((shape[0], 4, 4), torch.Generator().manual_seed(20 + i))
        x_eager, x_comp = x_adv.clone(), x_adv.clone()
        expected = fn(x_eager, grad, x_nat, cam)
        got = compiled(x_comp, grad, x_nat, cam)
        for e, g in zip(expected, got):
            assert torch.equal(e, g)
        # the in-place update reached the caller's tensor
        assert torch.equal(x_comp, x_eager)
        assert not torch.equal(x_comp, x_adv)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_raw_ops(family, compiler):
    _check_compiled(_step_with_raw_ops(family), compiler)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,layout", [(torch.float16, "channels_last"), (torch.bfloat16, "contiguous"),
                                          (torch.float64, "contiguous")], ids=str)
def test_compile_fullgraph_raw_ops_dtypes(family, dtype, layout):
    _check_compiled(_step_with_raw_ops(family), "aot_eager", dtype, layout)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_raw_ops_dynamic_shapes(family):
    _check_compiled(_step_with_raw_ops(family), "aot_eager", shapes=((2, 3, 32, 32), (3, 3, 24, 16), (5, 3, 8, 8)),
                    dynamic=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_public_api(family, compiler):
    """part_fast.pgd_step_ / project_ / cam_eps_map (backend selection included) inside a fullgraph
    compiled function: no graph break, same result as eager."""
    with ops.use_backend(BACKEND_OF[family]):
        _check_compiled(_step_with_public_api, compiler)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_public_api_dynamic_shapes(family):
    with ops.use_backend(BACKEND_OF[family]):
        _check_compiled(_step_with_public_api, "aot_eager", shapes=((2, 3, 32, 32), (3, 3, 24, 16)), dynamic=True)


# The reference, traced here to show the switch, reads lru_cache'd tables, which Dynamo traces through.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_function_follows_the_forced_backend(family):
    """The backend choice is traced as a constant but guarded: forcing another backend recompiles the
    function rather than keep running the backend it was first traced with."""
    if backends._torch_version(torch.__version__) < (2, 14):
        pytest.skip(f"torch {torch.__version__}: Dynamo before 2.14 cannot trace ContextVar.get, so the forced "
                    "backend is a constant of each compile (part_fast.backends._forced_now; documented in the README)")
    graphs = []

    def recording_compiler(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(_step_with_public_api, fullgraph=True, backend=recording_compiler)
    x_adv, grad, x_nat = _attack((2, 3, 8, 8), torch.float32, "contiguous", 30)
    cam = rand((2, 4, 4), torch.Generator().manual_seed(31))
    ours = {str(op).removesuffix(".default") for op in _raw_ops(family)}
    for backend in (BACKEND_OF[family], "reference", BACKEND_OF[family]):
        with ops.use_backend(backend):
            expected = _step_with_public_api(x_adv.clone(), grad, x_nat, cam)
            got = compiled(x_adv.clone(), grad, x_nat, cam)
        assert all(torch.equal(e, g) for e, g in zip(expected, got)), backend
    assert len(graphs) == 2, "traced once per backend, the first graph reused when its backend comes back"
    called = [{name.removesuffix(".default") for name in graph} for graph in graphs]
    assert ours <= called[0], called[0]
    assert not any(name.startswith("part_fast.") for name in called[1]), called[1]
