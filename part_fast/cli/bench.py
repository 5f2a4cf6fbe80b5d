"""`part-fast bench`: its parser (for --help only: main hands everything after `bench` to the harness) and the
command, which runs the source checkout's `python -m bench.run`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="every benchmark section side by side (needs a source checkout: bench/)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to `python -m bench.run` (try --help)")


def cmd_bench(args) -> int:
    import subprocess

    # The harness lives in the source tree's bench/, which the package never imports: run it as a program.
    root = Path(__file__).resolve().parents[2]  # part_fast/cli/bench.py -> the checkout
    if not (root / "bench" / "run.py").is_file():
        raise FileNotFoundError(f"part-fast bench needs a source checkout of part_fast (no bench/run.py under {root}); "
                                "install with `pip install -e .` from a clone")
    return subprocess.run([sys.executable, "-m", "bench.run", *args.bench_args], cwd=root).returncode
