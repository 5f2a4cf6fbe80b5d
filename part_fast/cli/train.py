"""`part-fast train`: its parser, generated from TrainConfig's fields (one flag each, help and default taken
from the field), the config a command line asks for (new or resumed), and the command."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import ConfigError
from ..train import RESUMABLE_CHANGES, TrainConfig
from ..train.config import flag_of, shown_default
from .common import fraction, int_list, with_default


_PARSERS = {"int": int, "float": float, "fraction": fraction, "str": str, "int_list": int_list}


def _add_config_flag(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """One flag per TrainConfig field, its help and default taken from the field. The default is not set
    on the namespace (SUPPRESS): what the user typed is told apart from what was left unset, which is what
    lets --resume take the rest from the run's config.json."""
    meta = f.metadata
    kwargs = {"dest": f.name, "default": argparse.SUPPRESS,
              "help": f"{meta['help']} (default: {shown_default(f)})"}
    kind = meta["kind"]
    if kind == "switch":
        kwargs["action"] = "store_true"
    elif kind == "negated":
        kwargs["action"] = "store_false"
    elif kind == "tristate":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _PARSERS[kind]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
    p.add_argument(flag_of(f.name), **kwargs)


def train_parser(sub) -> None:
    changeable = ", ".join(flag_of(k) for k in RESUMABLE_CHANGES if k != "out")
    p = sub.add_parser(
        "train", help="adversarial training: AT, TRADES, MART and PART, PART-T, PART-M",
        description="Train with the released PART recipe; unset flags take the dataset's released value. "
                    "Exit codes: 0 done, 2 user error (one line), 3 diverged, 130 / 143 stopped by SIGINT / "
                    "SIGTERM after writing a checkpoint.")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run directory: created by a new run; with --resume / --auto-resume, the run to continue")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help=with_default("continue the run in RUN_DIR from its newest intact checkpoint, with the "
                                        f"settings of its config.json; flags given may change only {changeable}",
                                        "off"))
    mode.add_argument("--auto-resume", action="store_true",
                      help=with_default("resume when RUN_DIR holds a run, else start one: the same command line can "
                                        "be re-run by `torchrun --max-restarts` or a job scheduler", "off"))
    for f in dataclasses.fields(TrainConfig):
        if f.name != "out":
            _add_config_flag(p, f)


def given_settings(args) -> dict:
    """The TrainConfig settings typed on the command line (unset flags are absent)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name != "out" and hasattr(args, f.name)}


def config_from_args(args) -> TrainConfig:
    """A new run: the flags given, defaults for the rest. With --resume / --auto-resume and a run in
    RUN_DIR: its saved settings, with the flags given on top (train() refuses the unsafe changes)."""
    from ..train.rundir import CONFIG, RunDirError, RunDirMissing, saved_config

    given = given_settings(args)
    saved = saved_config(args.out) if (args.resume or args.auto_resume) else None
    if args.resume and saved is None:
        if not Path(args.out).is_dir():
            raise RunDirMissing(f"--resume: run directory {args.out} does not exist")
        raise RunDirError(f"--resume: {args.out} holds no part_fast run (no {CONFIG})")
    if saved is not None:
        config = TrainConfig.from_json({**saved, **given, "out": args.out})
        warmup = saved.get("warmup")
        if config.is_part and isinstance(warmup, int) and isinstance(config.epochs, int) and config.epochs < warmup:
            # The warm-up is fixed by the run (not a resumable change): only --epochs can give.
            raise ConfigError(f"--epochs {config.epochs}: this run warms up for {warmup} epochs (its {CONFIG}); "
                              f"a resumed run's --epochs must be at least {warmup}")
        return config
    return TrainConfig(out=args.out, **given)


def cmd_train(args) -> int:
    from ..train import train

    train(config_from_args(args), resume="auto" if args.auto_resume else args.resume)
    return 0
