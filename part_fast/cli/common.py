"""What every command of the CLI shares: the argument types, the --help text of a default, the device line
that starts a command, the run's test loader, and the writers that turn a failed write into a one-line error
naming the user's path."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

from ..devices import describe_device, resolve_device
from ..errors import ConfigError, OutputWriteError
from ..train import TrainConfig
from ..train.checkpoint import WEIGHTS

DEVICE_HELP = "auto (cuda when there is a GPU, else cpu) | cpu | cuda | cuda:N"


def fraction(text: str) -> float:
    """'8/255', '1.5/255', '0.03' or '2' -> float (a/b is float(a) / float(b), exactly Python's 8/255);
    anything else is an argparse error naming the form."""
    parts = text.strip().split("/")
    try:
        if len(parts) > 2:
            raise ValueError
        value = float(parts[0]) / float(parts[1]) if len(parts) == 2 else float(parts[0])
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 60,90, got {text!r}") from None


def with_default(help: str, default) -> str:
    """Help text ending in argparse's "(default: ...)", for every option that has one."""
    return f"{help} (default: {default})"


def validate_positive(flag: str, value) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value}")


def announced_device(command: str, device_name: str):
    """The device a command runs on, announced in one line before the work starts."""
    device = resolve_device(device_name)
    print(f"part-fast {command}: device {describe_device(device)}", flush=True)
    return device


def add_weights_flag(p) -> None:
    """--weights: which of a checkpoint's weights a reading command loads."""
    p.add_argument("--weights", choices=WEIGHTS, default=None,
                   help=with_default("the run's weight average (runs trained with --ema-decay) or its trained "
                                     "weights", "the average when the run kept one"))


def load_announced(command: str, path, device, weights):
    """The checkpoint's model and config (train.model_from); a run that kept a weight average gets one line
    saying which weights the command uses."""
    from ..train import load_checkpoint, model_from

    ckpt = load_checkpoint(path)
    model, config, which = model_from(ckpt, device, weights)
    average = ckpt.get("average")
    if average is not None:
        chosen = (f"the weight average (EMA, decay {average['decay']:g}); --weights trained for the trained weights"
                  if which == "average" else "the trained weights (--weights trained); the run also kept a weight average")
        print(f"part-fast {command}: {path} holds a weight average and the trained weights: using {chosen}", flush=True)
    return model, config


def run_test_loader(config: TrainConfig, data_dir, test_subset, batch_size):
    """(loader, test set, DataInfo) of a run's test split, the flags given taking the place of its settings."""
    from torch.utils.data import DataLoader

    from .. import data as data_mod

    _, test_set, data_info = data_mod.build_datasets(config.dataset, data_dir or config.data_dir,
                                                     test_subset=test_subset or config.test_subset, seed=config.seed)
    return DataLoader(test_set, batch_size=batch_size), test_set, data_info


def create_folder_of(path: Path, flag: str) -> None:
    """Create the folder `path` goes into, so that a missing folder is never an error naming the writer's
    temporary file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputWriteError(f"{flag}: cannot create the folder {path.parent}: {err.strerror or err}") from None


@contextlib.contextmanager
def writing(path: Path, flag: str):
    """An OSError of the write inside becomes a one-line error naming the user's path."""
    try:
        yield
    except OSError as err:
        raise OutputWriteError(f"{flag}: cannot write {path}: {err.strerror or err}") from None


def write_json(path: Path, obj, flag: str) -> None:
    from ..files import atomic_write_text

    create_folder_of(path, flag)
    with writing(path, flag):
        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")
