"""Settings of the micro-benchmarks: torch threads (BENCH_THREADS, default 2) and the machine info
pytest-benchmark records with every run (BENCH_DEVICE, default cpu). Without pytest-benchmark installed the
micro-benchmarks skip (pip install -e .[bench]) and this hook is not defined: pytest refuses a hook no
plugin declares."""
import importlib.util
import os

import torch

from bench.common import machine_info as part_fast_machine_info

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))


if importlib.util.find_spec("pytest_benchmark") is not None:
    def pytest_benchmark_update_machine_info(config, machine_info):
        machine_info["part_fast"] = part_fast_machine_info(torch.device(os.environ.get("BENCH_DEVICE", "cpu")))
