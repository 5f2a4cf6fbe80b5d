"""The custom ops under PyTorch's machinery: torch.library.opcheck (schema, fake kernels, autograd
registration, AOT dispatch) and torch.compile(fullgraph=True) on CPU giving the eager result."""
import pytest
import torch
from torch.library import opcheck

import part_fast
from conftest import attack_inputs, rand
from part_fast import ops

pytestmark = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="needs the compiled extension part_fast._C")

EPS, EPS_LOW, STEP = 8 / 255, 7 / 255, 2 / 255


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


@pytest.mark.parametrize("index", range(12))
def test_opcheck_pgd_step(index):
    opcheck(torch.ops.part_fast.pgd_step_.default, _pgd_samples()[index])


@pytest.mark.parametrize("index", range(12))
def test_opcheck_project(index):
    x_adv, _, x_nat, eps_map, eps, _, lo, hi = _pgd_samples()[index]
    opcheck(torch.ops.part_fast.project_.default, (x_adv, x_nat, eps_map, eps, lo, hi))


@pytest.mark.parametrize("mode", ["jet", "cam"])
@pytest.mark.parametrize("case", [((2, 4, 4), [32, 32]), ((3, 7, 5), [13, 29]), ((1, 1, 1), [1, 1]),
                                  ((2, 8, 8), [32, 32])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_opcheck_cam_eps_map(mode, case, dtype):
    shape, size = case
    cam = rand(shape, torch.Generator().manual_seed(len(shape) + size[0]), dtype)
    opcheck(torch.ops.part_fast.cam_eps_map.default, (cam, size, EPS, EPS_LOW, mode))


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cam = torch.empty((5, 4, 4))
        out = torch.ops.part_fast.cam_eps_map(cam, [32, 24], EPS, EPS_LOW, "jet")
        assert out.shape == (5, 3, 32, 24) and out.dtype == torch.float32
        out = torch.ops.part_fast.cam_eps_map(cam.half(), [7, 9], EPS, EPS_LOW, "cam")
        assert out.shape == (5, 1, 7, 9) and out.dtype == torch.float32


# -------------------------------------------------------------------------------- torch.compile
def _step_with_raw_ops(x_adv, grad, x_nat, cam):
    eps = torch.ops.part_fast.cam_eps_map(cam, [x_adv.shape[2], x_adv.shape[3]], EPS, EPS_LOW, "jet")
    torch.ops.part_fast.pgd_step_(x_adv, grad, x_nat, eps, 0.0, STEP, 0.0, 1.0)
    torch.ops.part_fast.project_(x_adv, x_nat, None, EPS, 0.0, 1.0)
    # something after the in-place ops, so their results must be read back inside the graph
    return x_adv * 2.0, eps


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


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_raw_ops(compiler):
    _check_compiled(_step_with_raw_ops, compiler)


@pytest.mark.parametrize("dtype,layout", [(torch.float16, "channels_last"), (torch.bfloat16, "contiguous"),
                                          (torch.float64, "contiguous")], ids=str)
def test_compile_fullgraph_raw_ops_dtypes(dtype, layout):
    _check_compiled(_step_with_raw_ops, "aot_eager", dtype, layout)


def test_compile_fullgraph_raw_ops_dynamic_shapes():
    _check_compiled(_step_with_raw_ops, "aot_eager", shapes=((2, 3, 32, 32), (3, 3, 24, 16), (5, 3, 8, 8)),
                    dynamic=True)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_public_api(compiler):
    """part_fast.pgd_step_ / project_ / cam_eps_map (backend selection included) inside a fullgraph
    compiled function: no graph break, same result as eager."""
    _check_compiled(_step_with_public_api, compiler)
