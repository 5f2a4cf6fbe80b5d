"""`part-fast demo`: its parser and the command (AT vs PART on the generated shapes, see part_fast/demo.py)."""
from __future__ import annotations

import time

from ..devices import AUTO, resolve_device
from .common import DEVICE_HELP, with_default


def demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="AT vs PART on built-in data, a few minutes on a laptop CPU")
    p.add_argument("--out", default=None, help=with_default("output folder", "runs/demo-<time>"))
    p.add_argument("--seed", type=int, default=0, help=with_default("seed of both runs", 0))
    p.add_argument("--device", default=AUTO, help=with_default(DEVICE_HELP, AUTO))


def cmd_demo(args) -> int:
    from ..demo import DemoSettings, run_demo
    from ..plots import BUDGET_PNG, require_matplotlib

    resolve_device(args.device)  # a bad name fails here; run_demo says the device it uses as its first line
    require_matplotlib(BUDGET_PNG)  # now, not after minutes of training
    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_demo(out, DemoSettings(seed=args.seed), device=args.device)
    return 0
