"""`part-fast check`: its parser and the command (the GPU proof of part_fast/check/; exit 1 when a check fails)."""
from __future__ import annotations

from pathlib import Path

from ..devices import AUTO
from .common import DEVICE_HELP, create_folder_of, with_default, writing


def check_parser(sub) -> None:
    p = sub.add_parser(
        "check", help="prove and measure the GPU path (or the CPU's): correctness, a training step, timings",
        description="Four sections, each check with the figure it measured: the environment; every usable "
                    "backend on the device against the reference, opcheck and torch.compile; a CAM and a PART "
                    "training step on the device; timings side by side. Exit 1 when any check fails, else 0.")
    p.add_argument("--device", default=AUTO, help=with_default(DEVICE_HELP, AUTO))
    p.add_argument("--out", default=None, metavar="DIR",
                   help=with_default("also write check-<date>-<machine>.json and .md into DIR", "no files"))
    p.add_argument("--quick", action="store_true", help=with_default("smaller cases and models: about a minute", "off"))


def cmd_check(args) -> int:
    from ..check import run_check

    if args.out is not None:
        out = Path(args.out)
        create_folder_of(out / "check.json", "--out")
        with writing(out, "--out"):  # the checks catch their own errors: an OSError here is the report's write
            report = run_check(args.device, quick=args.quick, out=out)
    else:
        report = run_check(args.device, quick=args.quick)
    failed = "; ".join(f"{o.section}: {o.name}" for o in report.failed)
    print(f"part-fast check: {'passed' if report.passed else 'FAILED (' + failed + ')'} in {report.seconds:.0f} s")
    return 0 if report.passed else 1
