"""Checkpoints that are whole, checked, and never the only copy.

A run directory holds the newest checkpoint `last.pt` and the one before it, `previous.pt`. A save writes a
temporary file, fsyncs it, hard-links the old `last.pt` to `previous.pt`, renames the new file over
`last.pt` and fsyncs the folder, so at every instant both names hold whole files; a failed write (a full
disk) leaves both as they were.

A load checks before it trusts: the file must be a whole zip archive whose records all match the CRC-32
that torch.save wrote for them (torch.load itself reads a flipped byte back silently), and must hold a
part_fast checkpoint. Resuming takes the newest intact checkpoint: a damaged `last.pt` is set aside (renamed
`last.pt.damaged`, never deleted) with a one-line warning, and the run continues from `previous.pt`.

The checkpoint holds only tensors and plain Python values, so it loads with `weights_only=True`. What it
holds is assembled by `contents` (the trainer's state, where the run stands, every rank's epoch progress in
the middle of an epoch); `load_checkpoint` and `load_model` are the readers for a finished or stopped run.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import __version__
from ..devices import resolve_device
from ..errors import CheckpointError, CheckpointWriteError, ConfigError
from ..files import NotDurable, atomic_write_bytes
from .config import TrainConfig
from .step import RunState, build_model

LAST = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"  # the epoch with the best validation PGD-20 accuracy (--val-examples)
FORMAT = 2
REQUIRED_KEYS = frozenset({"format", "model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step",
                           "config"})


@contextlib.contextmanager
def _crc32_recorded():
    """torch.save records a CRC-32 per archive member unless a caller switched it off process-wide; the
    integrity check needs them."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None or get():
        yield
        return
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(False)


def contents(state: RunState, *, config: TrainConfig, steps_per_epoch: int, world: int, metrics: list[dict],
             epoch_progress: list[dict] | None, rank_buffers: list | None) -> dict:
    """What a checkpoint of the run holds: the model, optimiser, scheduler and scaler states, where the run
    stands, its config and metrics so far. In the middle of an epoch, `epoch_progress` is every rank's
    EpochProgress.state_dict() and `rank_buffers` every rank's BatchNorm statistics (under DDP); between
    epochs both are None."""
    return {
        "format": FORMAT,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "average": state.average.state_dict() if state.average is not None else None,
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "world": world,
        "epoch_progress": epoch_progress,
        "rank_buffers": rank_buffers,
        "num_classes": state.num_classes,
        "config": config.to_json(),
        "metrics": metrics,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "part_fast_version": __version__,
    }


def save(path: str | os.PathLike, checkpoint: dict, *, keep_previous: bool = True) -> None:
    """Write `checkpoint` to `path` atomically; the file `path` held before becomes PREVIOUS beside it."""
    path = Path(path)

    def write(f):
        with _crc32_recorded():
            torch.save(checkpoint, f)

    previous = path.with_name(PREVIOUS)
    try:
        atomic_write_bytes(path, write, keep_previous=previous if keep_previous else None)
    except NotDurable as err:
        raise CheckpointWriteError(f"wrote the checkpoint {path}, but its folder could not be synced "
                                   f"({err.strerror or err}): a power cut could still lose it") from err
    except OSError as err:
        if path.exists():
            kept = f"{path} is the previous checkpoint, intact"
        elif keep_previous and previous.exists():
            kept = f"{previous} is the previous checkpoint, intact"
        else:
            kept = "no checkpoint was written before"
        raise CheckpointWriteError(f"could not write the checkpoint {path}: {err.strerror or err}; {kept}") from err


def verify(path: Path, data: bytes) -> None:
    """Raise CheckpointError unless `data` is a whole archive whose members all pass their CRC-32."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except Exception as err:  # noqa: BLE001 - BadZipFile, zlib / EOF errors, and RuntimeError or
        # NotImplementedError when a flipped bit marks a record encrypted or compressed another way
        raise CheckpointError(f"{path} is damaged: not a whole checkpoint archive, truncated? ({err})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: its record {bad} fails its CRC-32 check")


def read(path: str | os.PathLike) -> dict:
    """The checkpoint at `path`, checked (see the module doc), tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    verify(path, data)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the unpickler says, the file is not ours or not whole
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable part_fast checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format", "none") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a part_fast checkpoint of format {FORMAT} (found {found})")
    missing = REQUIRED_KEYS - set(ckpt)
    if missing:
        raise CheckpointError(f"{path} is not a part_fast checkpoint (missing {sorted(missing)})")
    return ckpt


def describe(ckpt: dict) -> str:
    """Where a checkpoint stands, in words."""
    spe = ckpt.get("steps_per_epoch")
    if ckpt["step_in_epoch"] and ckpt["step_in_epoch"] != spe:
        return f"step {ckpt['global_step']}, epoch {ckpt['epoch'] + 1} step {ckpt['step_in_epoch']}/{spe}"
    done = ckpt["epoch"] + (1 if ckpt["step_in_epoch"] else 0)
    return f"step {ckpt['global_step']}, after epoch {done}"


def _unused_name(path: Path) -> Path:
    """`path`, or path.1, path.2, ... : an earlier damaged file is kept, never replaced."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def newest_intact(run_dir: str | os.PathLike, warn: Callable[[str], None],
                  accept: Callable[[dict, Path], None] | None = None) -> tuple[dict, Path] | None:
    """The newest checkpoint of `run_dir` that passes its checks, and its path; None when it has none.

    A damaged LAST is renamed LAST.damaged (.1, .2, ... if that exists; so the next save does not keep it as
    PREVIOUS) and `warn` is told in one line; when no checkpoint is intact, CheckpointError names every file tried.
    `accept(checkpoint, path)` may refuse the intact one it is given by raising, before any file is moved."""
    run_dir = Path(run_dir)
    candidates = [run_dir / LAST, run_dir / PREVIOUS]
    present = [p for p in candidates if p.exists()]
    if not present:
        return None
    problems = []
    for path in present:
        try:
            ckpt = read(path)
        except CheckpointError as err:
            problems.append((path, err))
            continue
        if accept is not None:
            accept(ckpt, path)
        for bad, err in problems:
            aside = _unused_name(bad.with_name(bad.name + ".damaged"))
            os.replace(bad, aside)
            warn(f"warning: {err}; moved it to {aside.name} and resuming from {path} ({describe(ckpt)})")
        if path.name == PREVIOUS and not problems:
            warn(f"warning: {run_dir / LAST} is missing; resuming from {path} ({describe(ckpt)})")
        return ckpt, path
    raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(str(err) for _, err in problems))


# ------------------------------------------------------------------------------------------ reading runs
def load_checkpoint(path) -> dict:
    """A checkpoint, checked (whole archive, every CRC-32, part_fast keys); CheckpointError otherwise."""
    return read(path)


# Which weights of a checkpoint a reader takes: the weight average (runs with --ema-decay) or the trained ones.
WEIGHTS = ("average", "trained")


def model_from(ckpt: dict, device="cpu", weights: str | None = None) -> tuple[nn.Module, TrainConfig, str]:
    """The model (eval mode) on `device`, the run's config and which weights were loaded, from a checkpoint.

    Args:
        ckpt: a checkpoint (load_checkpoint).
        device: 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device.
        weights: "average" (the run's weight average: ConfigError if it kept none), "trained", or None: the
            average when the run kept one (--ema-decay), else the trained weights.

    Returns:
        (model, config, "average" or "trained")."""
    if weights not in (None, *WEIGHTS):
        raise ConfigError(f"weights must be one of {WEIGHTS} or None, got {weights!r}")
    device = resolve_device(device)
    config = TrainConfig.from_json(ckpt["config"])
    average = ckpt.get("average")
    if weights == "average" and average is None:
        raise ConfigError("this run kept no weight average (it was trained without --ema-decay): load its trained weights")
    which = weights or ("average" if average is not None else "trained")
    model = build_model(config, ckpt["num_classes"])
    model.load_state_dict(average["model"] if which == "average" else ckpt["model"])
    return model.to(device).eval(), config, which


def load_model(path, device="cpu", weights: str | None = None) -> tuple[nn.Module, TrainConfig]:
    """The trained model (eval mode) on `device` ('auto', 'cpu', 'cuda', 'cuda:N' or a torch.device) and its
    config, from a RUN_DIR/last.pt (or previous.pt, best.pt). A run trained with --ema-decay gives its weight
    average unless `weights` is "trained" (see model_from)."""
    model, config, _ = model_from(read(path), device, weights)
    return model, config
