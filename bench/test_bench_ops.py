"""pytest-benchmark micro-benchmarks of part_fast's ops: the cases of bench/ops_report.py, one test each.

    python -m pytest bench/test_bench_ops.py --benchmark-only                    # CPU
    BENCH_DEVICE=cuda python -m pytest bench/test_bench_ops.py --benchmark-only  # GPU: cuda, triton, reference

Timings only: nothing here asserts a speed. Each result carries the bytes the op moves and its GB/s in
extra_info (see --benchmark-json). Rows are grouped per op, shape and eps form / cam mode.
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="the micro-benchmarks need pytest-benchmark (pip install -e .[bench])")

from bench.common import synchronizer, timed_backends, warm_up
from bench.ops_report import Case, all_cases, build
from part_fast import ops

DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
WARMUP_CALLS = 3


@pytest.mark.parametrize("case", all_cases(timed_backends(DEVICE)), ids=Case.label)
def test_op(benchmark, case):
    fn, nbytes = build(case, DEVICE)
    sync = synchronizer(DEVICE)

    def call():  # a GPU call counts until its kernels finish
        fn()
        sync()

    benchmark.group = f"{case.op} {case.shape_text} {case.variant}".rstrip()
    benchmark.extra_info["bytes"] = nbytes
    with ops.use_backend(case.backend):
        warm_up(fn, DEVICE, WARMUP_CALLS)
        benchmark(call)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["gb_per_s"] = nbytes / benchmark.stats.stats.median / 1e9
