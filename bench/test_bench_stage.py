"""pytest-benchmark variants of bench/stage_report.py (the cheap parts): the CAM + budget stage (ours vs the
release's per-image pipeline), one PGD step of each attack loop, and the update phase alone.

    python -m pytest bench/test_bench_stage.py --benchmark-only          # ~1-2 min on an idle 2-core CPU
    python -m pytest bench/test_bench_stage.py --benchmark-only -k update

Timings only: nothing here asserts a speed. ResNet-18, batch 128, the same CAM-realistic model and images
as the report (see bench/STAGE.md). glibc's default malloc is kept (it is process-wide and these tests may
share a session with test_bench_ops.py); BENCH_KEEP_FREED_MEMORY=1 applies the report's setting
(bench.common.keep_freed_memory) when this module is imported. Full PGD-10 runs are left to the report (~25 s each on 2 cores);
here each attack is timed for one step (forward + input gradient + update), which is what PGD-10
repeats ten times.
"""
import functools
import os

import pytest

pytest.importorskip("pytest_benchmark", reason="the micro-benchmarks need pytest-benchmark (pip install -e .[bench])")

from bench.common import DEFAULT_DATA, keep_freed_memory, warm_up
from bench.stage_pgd import torchattacks_update
from bench.stage_setup import ALPHA, BATCH, CALIB_IMAGES, CPU, EPS, cam_realistic_resnet18, load_data
from part_fast.release import release_eps_map, release_update_pgd
from part_fast import ops, reference
from part_fast.attacks import PGD
from part_fast.budget import PixelBudget

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

if os.environ.get("BENCH_KEEP_FREED_MEMORY") == "1":
    keep_freed_memory()


@pytest.fixture(scope="module")
def setup():
    x, y, x_cal, y_cal, _ = load_data(DEFAULT_DATA, BATCH, CALIB_IMAGES)
    model, _ = cam_realistic_resnet18(x_cal, y_cal)
    eps_map = PixelBudget()(model, x)
    return model, x, y, eps_map


def test_budget_part_fast(benchmark, setup):
    model, x, _, _ = setup
    benchmark.group = "CAM + budget stage, batch 128"
    budget = PixelBudget(mask="jet")
    warm_up(lambda: budget(model, x), CPU)
    benchmark.pedantic(budget, args=(model, x), rounds=3, iterations=1)


def test_budget_release(benchmark, setup):
    model, x, _, _ = setup
    benchmark.group = "CAM + budget stage, batch 128"
    warm_up(lambda: release_eps_map(model, x[:4]), CPU)
    benchmark.pedantic(release_eps_map, args=(model, x), rounds=2, iterations=1)
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("impl", ["fused", "release-update", "torchattacks"])
@pytest.mark.parametrize("eps_form", ["map", "scalar"])
def test_pgd_one_step(benchmark, setup, impl, eps_form):
    model, x, y, eps_map = setup
    budget = eps_map if eps_form == "map" else None
    benchmark.group = f"PGD, 1 step, batch 128, eps {eps_form}"
    if impl == "fused":
        attack = PGD(model, steps=1, start=None)
        fn = lambda: attack(x, y, eps_map=budget)
    elif impl == "release-update":
        attack = PGD(model, steps=1, start=None)
        fn = lambda: release_update_pgd(attack, x, y, budget)
    else:
        torchattacks = pytest.importorskip("torchattacks")
        if eps_form == "map":
            pytest.skip("torchattacks supports a scalar eps only")
        fn = functools.partial(torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=1, random_start=False), x, y)
    warm_up(fn, CPU)
    benchmark.pedantic(fn, rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["fused", "release", "torchattacks"])
@pytest.mark.parametrize("eps_form", ["map", "scalar"])
def test_update_phase_10_calls(benchmark, setup, impl, eps_form):
    model, x, y, eps_map = setup
    if impl == "torchattacks" and eps_form == "map":
        pytest.skip("torchattacks supports a scalar eps only")
    eps = eps_map if eps_form == "map" else EPS
    grad = PGD(model)._input_gradient(x, y, None)
    benchmark.group = f"update phase, 10 calls, 128x3x32x32, eps {eps_form}"

    if impl == "fused":
        def fn():
            xa = x.clone()
            for _ in range(10):
                ops.pgd_step_(xa, grad, x, eps, ALPHA)
    else:
        update = reference.pgd_step_release if impl == "release" else torchattacks_update

        def fn():
            xa = x.clone()
            for _ in range(10):
                xa = update(xa, grad, x, eps, ALPHA)
    benchmark(fn)
