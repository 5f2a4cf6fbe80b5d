"""The `part-fast` command: train, eval, demo, show-cam, plot, check, bench. The only package that parses arguments.

Every option's --help ends with its default; every command that computes prints the device it uses first.
This module builds the parser, runs a command and maps its errors to exit codes (a user error is one line,
no traceback); each command is a module of its own, holding its parser and its `cmd_*`:

    train.py      the flags generated from TrainConfig; new, resumed and auto-resumed runs
    eval.py       the attacks table, and --protocol robustbench
    demo.py, show_cam.py, plot.py, check.py, bench.py
    common.py     argument types, --help defaults, the device line, the writers that name the user's path
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import EXIT_DIVERGED, EXIT_USER_ERROR, USER_ERRORS, Interrupted, TrainingDiverged, report
from ..extras import MissingExtraError
from ..logs import console
from .bench import bench_parser, cmd_bench
from .check import check_parser, cmd_check
from .common import DEVICE_HELP, fraction, int_list, with_default
from .demo import cmd_demo, demo_parser
from .eval import DEFAULT_ATTACKS, PROTOCOLS, cmd_eval, eval_parser
from .plot import cmd_plot, plot_parser
from .show_cam import cmd_show_cam, show_cam_parser
from .train import cmd_train, config_from_args, given_settings, train_parser

__all__ = [
    "COMMANDS", "DEFAULT_ATTACKS", "DEVICE_HELP", "PROTOCOLS", "build_parser", "cmd_bench", "cmd_check", "cmd_demo",
    "cmd_eval", "cmd_plot", "cmd_show_cam", "cmd_train", "config_from_args", "fraction", "given_settings",
    "int_list", "main", "with_default",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="part-fast", description="Fast, reproducible PART (ICML 2024).")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser(sub)
    eval_parser(sub)
    demo_parser(sub)
    show_cam_parser(sub)
    plot_parser(sub)
    check_parser(sub)
    bench_parser(sub)
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "show-cam": cmd_show_cam, "plot": cmd_plot,
            "check": cmd_check, "bench": cmd_bench}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the harness's own parser
        try:
            return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
        except FileNotFoundError as err:
            report(f"part-fast bench: error: {err}")
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"part-fast {args.command}"
    try:
        with console():  # the library's log lines, printed as the command always printed them
            return COMMANDS[args.command](args)
    except Interrupted as err:
        if _is_rank0():
            report(f"{name}: {err}; resume with: {_resume_command(args.out)}")
        return err.exit_code
    except (*USER_ERRORS, MissingExtraError) as err:
        # A user error: one clear line, no traceback.
        report(f"{name}: error: {err}")
        return EXIT_USER_ERROR
    except TrainingDiverged as err:
        report(f"{name}: stopped: {err}")
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        if _is_rank0():
            after = _after_train_interrupt(args.out) if args.command == "train" else ""
            report(f"{name}: interrupted at once, nothing more saved{after}")
        return 130


def _after_train_interrupt(out: str) -> str:
    """What a run stopped at once (a second Ctrl-C) left, and how to go on from it."""
    from ..train.checkpoint import LAST, PREVIOUS
    from ..train.rundir import holds_run

    resume = _resume_command(out)
    if any((Path(out) / name).is_file() for name in (LAST, PREVIOUS)):
        return f"; the checkpoints in {out} are kept; resume with: {resume}"
    if holds_run(out):
        return f"; no checkpoint was written yet: {resume} starts the run again from its first step"
    return ""


def _resume_command(out: str) -> str:
    """How to go on: one process resumes with part-fast; a torchrun job with its own launch line, else it would
    come back as a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"the same torchrun command with --resume (or --auto-resume), e.g. torchrun ... -m part_fast train --out {out} --resume"
    return f"part-fast train --out {out} --resume"


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"
