"""Section 2: every usable backend on the device against the reference (computed on the CPU from the same
values), torch.library.opcheck of each backend's ops, and one torch.compile(fullgraph=True) function.

The contract (README "Fused ops"): pgd_step_ / project_ equal the reference element for element on every
backend (NaN where it has NaN; the sign of a zero is not compared); cam_eps_map equals it too, except where
a z-score lies within ~1e-15 of the cut (the statistics are summed in each kernel's own order), so any
differing element is reported and fails the check."""
from __future__ import annotations

import itertools

import torch

from .. import ops, reference
from .inputs import CHECK_EPS_FORMS, EPS, EPS_LOW, LAYOUTS, STEP, attack_inputs, cam_inputs, make_eps, same_strides_on
from .runner import Context, Skipped

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ATTACK_SHAPES = {"odd": [(3, 3, 7, 5), (1, 1, 1, 1), (2, 3, 33, 31)], "real": [(128, 3, 32, 32), (32, 3, 64, 64)]}
QUICK_ATTACK_SHAPES = {"odd": [(3, 3, 7, 5), (1, 1, 1, 1)], "real": [(128, 3, 32, 32)]}
# (B, h, w) CAMs -> (H, W): CIFAR's 4x4 -> 32x32, TinyImageNet's 8x8 -> 64x64, ImageNet's 7x7 -> 224x224, odd.
CAM_CASES = [((128, 4, 4), (32, 32)), ((16, 8, 8), (64, 64)), ((8, 7, 7), (224, 224)), ((3, 7, 5), (13, 29)),
             ((1, 1, 1), (1, 1))]
QUICK_CAM_CASES = [((32, 4, 4), (32, 32)), ((3, 7, 5), (13, 29)), ((1, 1, 1), (1, 1))]


def device_backends(ctx: Context) -> list[str]:
    """The fast backends usable on the device (the reference is what they are compared with)."""
    return [b for b in ops.available_backends(ctx.device) if b != "reference"]


def same_attack_result(out: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elements equal to the reference's, NaN where it has NaN (-0.0 == +0.0)."""
    return (out == expected) | (out.isnan() & expected.isnan())


def _attack_case(ctx, backend, op, shape, dtype, layout, form, seed):
    gen = torch.Generator().manual_seed(seed)
    x_adv, grad, x_nat = attack_inputs(shape, dtype, layout, gen)
    eps = make_eps(form, shape, layout, gen)
    if op == "pgd_step_":
        expected = reference.pgd_step_(x_adv.clone(), grad, x_nat, eps, STEP)
    else:
        expected = reference.project_(x_adv.clone(), x_nat, eps)
    d_adv, d_grad, d_nat, d_eps = (same_strides_on(t, ctx.device) for t in (x_adv, grad, x_nat, eps))
    with ops.use_backend(backend):
        if op == "pgd_step_":
            ops.pgd_step_(d_adv, d_grad, d_nat, d_eps, STEP)
        else:
            ops.project_(d_adv, d_nat, d_eps)
    same = same_attack_result(d_adv.cpu(), expected)
    return int((~same).sum()), same.numel()


def check_attack_ops(ctx: Context, backend: str):
    shapes = QUICK_ATTACK_SHAPES if ctx.quick else ATTACK_SHAPES
    cases = failures = elements = 0
    first = None
    for seed, (op, kind, dtype, layout, form) in enumerate(itertools.product(
            ("pgd_step_", "project_"), shapes, DTYPES, LAYOUTS, CHECK_EPS_FORMS)):
        for shape in shapes[kind]:
            bad, n = _attack_case(ctx, backend, op, shape, dtype, layout, form, 1000 + seed)
            cases += 1
            elements += n
            if bad:
                failures += 1
                if first is None:
                    first = (f"{op} {tuple(shape)} {str(dtype).replace('torch.', '')} {layout} eps={form}: "
                             f"{bad} of {n} elements differ")
    figure = (f"{cases} cases (pgd_step_ + project_; {len(DTYPES)} dtypes, {len(LAYOUTS)} layouts, {len(CHECK_EPS_FORMS)} "
              f"eps forms, NaN/inf gradients), {elements:,} elements: {failures} cases differ"
              + (f"; first: {first}" if first else " (bit-exact)"))
    return failures == 0, figure, {"cases": cases, "failed_cases": failures, "elements": elements, "first": first}


def check_cam_eps_map(ctx: Context, backend: str):
    cases = failures = elements = 0
    first = None
    for seed, ((shape, size), mode, dtype) in enumerate(itertools.product(
            QUICK_CAM_CASES if ctx.quick else CAM_CASES, ("jet", "cam"), DTYPES)):
        cam = cam_inputs(shape, dtype, torch.Generator().manual_seed(2000 + seed))
        expected = reference.cam_eps_map(cam, size, EPS, EPS_LOW, mode)
        with ops.use_backend(backend):
            out = ops.cam_eps_map(cam.to(ctx.device), size, EPS, EPS_LOW, mode).cpu()
        bad = int((out != expected).sum()) if out.shape == expected.shape else expected.numel()
        cases += 1
        elements += expected.numel()
        if bad:
            failures += 1
            first = first or (f"{mode} {tuple(shape)}->{size} {str(dtype).replace('torch.', '')}: {bad} of "
                              f"{expected.numel()} elements differ")
    figure = (f"{cases} cases (modes jet and cam, {len(DTYPES)} CAM dtypes, degenerate maps), {elements:,} elements: "
              f"{failures} cases differ" + (f"; first: {first}" if first else " (bit-exact)"))
    return failures == 0, figure, {"cases": cases, "failed_cases": failures, "elements": elements, "first": first}


def _raw_ops(backend: str):
    prefix = "triton_" if backend == "triton" else ""
    return tuple(getattr(torch.ops.part_fast, prefix + n).default for n in ("pgd_step_", "project_", "cam_eps_map"))


def check_opcheck(ctx: Context, backend: str):
    if backend == "triton" and not ctx.cuda:
        raise Skipped("the Triton ops are opchecked on the CPU by tests/test_compile.py (interpreter)")
    from torch.library import opcheck

    pgd_step, project, cam_eps_map = _raw_ops(backend)
    gen = torch.Generator().manual_seed(3)
    samples = 0
    for dtype, layout, form in (
            (torch.float32, "contiguous", "bchw"), (torch.bfloat16, "channels_last", "b1hw"),
            (torch.float16, "contiguous", "scalar")):
        shape = (4, 3, 8, 8)
        x_adv, grad, x_nat = (t.to(ctx.device) for t in attack_inputs(shape, dtype, layout, gen))
        eps = make_eps(form, shape, layout, gen)
        eps_map = eps.to(ctx.device) if isinstance(eps, torch.Tensor) else None
        eps_value = 0.0 if eps_map is not None else float(eps)
        opcheck(pgd_step, (x_adv.clone(), grad, x_nat, eps_map, eps_value, STEP, 0.0, 1.0))
        opcheck(project, (x_adv.clone(), x_nat, eps_map, eps_value, 0.0, 1.0))
        samples += 2
    for mode in ("jet", "cam"):
        opcheck(cam_eps_map, (torch.randn((3, 4, 4), generator=gen).to(ctx.device), [32, 32], EPS, EPS_LOW, mode))
        samples += 1
    return True, f"{samples} samples, every opcheck test (schema, fake kernel, autograd registration, AOT dispatch) passed", {
        "samples": samples}


def check_compile(ctx: Context, backend: str):
    """One function calling the three ops through the public API, compiled with fullgraph=True (a graph
    break would raise), on the device: the same result as eager."""
    gen = torch.Generator().manual_seed(4)
    shape = (16, 3, 32, 32)
    x_adv, grad, x_nat = (t.to(ctx.device) for t in attack_inputs(shape, torch.float32, "contiguous", gen))
    cam = torch.randn((16, 4, 4), generator=gen).to(ctx.device)

    def attack_step(x_adv, grad, x_nat, cam):
        eps = ops.cam_eps_map(cam, (32, 32), EPS, EPS_LOW)
        ops.pgd_step_(x_adv, grad, x_nat, eps, STEP)
        ops.project_(x_adv, x_nat, EPS)
        return x_adv * 2.0, eps

    compiler = "inductor" if ctx.cuda else "aot_eager"  # inductor on the CPU compiles C++ for minutes
    torch._dynamo.reset()
    with ops.use_backend(backend):
        eager = attack_step(x_adv.clone(), grad, x_nat, cam)
        compiled = torch.compile(attack_step, fullgraph=True, backend=compiler)(x_adv.clone(), grad, x_nat, cam)
    same = all(bool(same_attack_result(c, e).all()) for c, e in zip(compiled, eager))
    return same, f"torch.compile(fullgraph=True, backend={compiler!r}): no graph break, " + (
        "same result as eager" if same else "RESULT DIFFERS from eager"), {"compiler": compiler}


def run(ctx: Context, check) -> None:
    def fast_backends():
        found = device_backends(ctx)
        return bool(found), (f"{', '.join(found)}" if found else
                             f"no fast backend usable on {ctx.device.type}: only the reference"), {"backends": found}

    outcome = check("fast backends to check", fast_backends)
    backends = outcome.data.get("backends", [])
    for backend in backends:
        check(f"{backend}: pgd_step_ / project_ vs reference", lambda b=backend: check_attack_ops(ctx, b))
        check(f"{backend}: cam_eps_map vs reference", lambda b=backend: check_cam_eps_map(ctx, b))
        check(f"{backend}: torch.library.opcheck", lambda b=backend: check_opcheck(ctx, b))
        check(f"{backend}: torch.compile(fullgraph=True)", lambda b=backend: check_compile(ctx, b))
