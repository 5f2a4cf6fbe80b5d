"""The run directory: what a run writes, and how a new run, a resumed one and an auto-resumed one find it.

    RUN_DIR/config.json      the resolved TrainConfig, written when the run starts
    RUN_DIR/last.pt          the newest checkpoint; previous.pt the one before (checkpoint.py)
    RUN_DIR/metrics.jsonl    one line per completed epoch, rewritten from the checkpoint's history
    RUN_DIR/steps.jsonl      with log_steps: one line per optimiser step
    RUN_DIR/tensorboard/     with tensorboard: the per-epoch metrics as TensorBoard scalars

Only rank 0 writes. Every file is replaced atomically, except steps.jsonl, which is appended to and, on
resume, cut back to the steps the checkpoint holds (a torn last line included), and TensorBoard's event
files, which TensorBoard itself appends to (its reader skips a torn last record).
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, UserError
from ..extras import require
from ..files import atomic_write_json, atomic_write_text, remove_stale_temp_files
from . import checkpoint
from .config import RESUMABLE_CHANGES, TrainConfig, flag_of
from .distributed import Distributed

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
TENSORBOARD = "tensorboard"


class RunDirError(UserError):
    """RUN_DIR cannot be used as asked (exists for a new run, missing for --resume, another config...)."""


class RunDirExists(RunDirError, FileExistsError):
    """A new run was asked for in a RUN_DIR that holds files."""


class RunDirMissing(RunDirError, FileNotFoundError):
    """A run was to be resumed from a RUN_DIR that does not exist."""


class ConfigMismatch(RunDirError, ValueError):
    """A resumed run would change a setting that changes what it computes."""


class WorldSizeMismatch(RunDirError, ValueError):
    """A resumed run would continue with another number of processes, not allowed by allow_world_change."""


def holds_run(out: str | Path) -> bool:
    return (Path(out) / CONFIG).is_file()


def saved_config(out: str | Path) -> dict | None:
    """RUN_DIR/config.json as a dict; None when RUN_DIR holds no run."""
    path = Path(out) / CONFIG
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} is damaged ({err}); it says what the run is, so it cannot be resumed without it")
    if not isinstance(saved, dict):
        raise RunDirError(f"{path} is damaged (not a JSON object)")
    return saved


def validate_same_config(saved: dict, config: TrainConfig, where: Path) -> None:
    now = config.to_json()
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"{flag_of(k)}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigMismatch(f"resuming with another configuration than {where} ({detail}); only "
                             f"{', '.join(flag_of(k) for k in RESUMABLE_CHANGES if k != 'out')} may change")


def validate_resumable(ckpt: dict, path: Path, config: TrainConfig, world: int) -> None:
    """ConfigMismatch or WorldSizeMismatch when the checkpoint at `path` cannot continue as `config` on
    `world` processes."""
    validate_same_config(ckpt["config"], config, path)
    saved_world = ckpt.get("world", 1)
    if saved_world != world and not config.allow_world_change:
        raise WorldSizeMismatch(
            f"{path} was trained by {saved_world} process(es) and would continue with {world}; each rank's data "
            f"shard and random streams depend on the count, so resume with {saved_world}, or pass "
            f"{flag_of('allow_world_change')} to continue with {world} (no longer bit-equal to an uninterrupted run)")


def prepare(config: TrainConfig, resume: bool | str, warn: Callable[[str], None],
            world: int = 1) -> tuple[dict, Path] | None:
    """Create RUN_DIR for a new run, or check it for a resumed one (on `world` processes); returns the
    checkpoint to resume from and its path (None: start from step 0). resume="auto": resume when RUN_DIR holds
    a run. Every refusal comes before anything in RUN_DIR is written, moved or removed."""
    out = Path(config.out)
    if resume == "auto":
        if not holds_run(out) and out.exists() and any(out.iterdir()):
            raise RunDirError(f"--auto-resume: {out} is not empty but holds no part_fast run (no {CONFIG}); "
                              "choose another --out")
        resume = holds_run(out)
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise RunDirExists(f"run directory {out} already exists and is not empty; pass --resume to continue it, "
                               "or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG, config.to_json())
        return None
    if not out.is_dir():
        raise RunDirMissing(f"--resume: run directory {out} does not exist")
    saved = saved_config(out)
    if saved is not None:
        validate_same_config(saved, config, out / CONFIG)
    found = checkpoint.newest_intact(out, warn, accept=lambda ckpt, path: validate_resumable(ckpt, path, config, world))
    remove_stale_temp_files(out)  # left by a process killed while it wrote
    if saved != config.to_json():
        atomic_write_json(out / CONFIG, config.to_json())  # with the safe changes: it says what the run is now
    return found  # None: stopped before its first checkpoint, start over in the same directory


def prepare_on_all_ranks(config: TrainConfig, ranks: Distributed, resume: bool | str,
                         warn: Callable[[str], None]) -> dict | None:
    """Rank 0 prepares RUN_DIR and picks the checkpoint (one process decides, so ranks cannot race on the
    files); the others read the checkpoint it picked. Every failure is agreed: all ranks raise, at the same
    point, so none is left waiting in a collective."""
    # 1. Same settings everywhere, checked before rank 0 touches a file.
    theirs = ranks.broadcast_object(config.to_json())
    differs = sorted(k for k, v in config.to_json().items() if theirs.get(k) != v)
    (mismatches,) = ranks.all_sum([1.0 if differs else 0.0])
    if mismatches:
        raise RunDirError(f"{int(mismatches)} process(es) were started with other settings than rank 0"
                          + (f" (this one: {', '.join(differs)})" if differs else ""))
    # 2. Rank 0 prepares RUN_DIR.
    found, error = None, None
    if ranks.is_main:
        try:
            found = prepare(config, resume, warn, ranks.world)
        except UserError as err:  # (some are OSErrors too: RunDirExists, RunDirMissing)
            error = err
        except OSError as err:  # an unwritable or vanished RUN_DIR: the user's to fix
            error = RunDirError(f"cannot prepare the run directory {config.out}: {err.strerror or err}")
        except Exception as err:  # noqa: BLE001 - a bug: the other ranks must hear of it, or they wait forever
            error = err
    verdict = ranks.broadcast_object({"error": str(error) if error else None,
                                     "checkpoint": str(found[1]) if found else None})
    if error is not None:
        raise error
    if verdict["error"] is not None:
        raise RunDirError(f"rank 0 could not prepare {config.out}: {verdict['error']}")
    # 3. The others read the checkpoint rank 0 picked.
    ckpt, failure = (found[0] if found else None), None
    if not ranks.is_main and verdict["checkpoint"] is not None:
        try:
            ckpt = checkpoint.read(verdict["checkpoint"])
        except CheckpointError as err:
            failure = RunDirError(f"rank {ranks.rank} cannot read the checkpoint rank 0 picked: {err} (RUN_DIR "
                                  "must be on a filesystem that every node sees)")
    ranks.raise_together(failure, lambda failed: RunDirError(
        f"{failed} process(es) could not read {verdict['checkpoint']}; see their errors"))
    return ckpt


def write_metrics(out: Path, history: list) -> None:
    atomic_write_text(out / METRICS, "".join(json.dumps(m) + "\n" for m in history))


def read_metrics(out: str | Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl, one record per completed epoch; RunDirError for a missing or empty file and for
    a damaged line (named by its number)."""
    path = Path(out) / METRICS
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: no epoch of this run has finished yet")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    if not lines:
        raise RunDirError(f"{path} is empty: no epoch of this run has finished yet")
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path} line {number} is damaged ({err.msg}); every line is one epoch's JSON "
                              "record") from None
        if not isinstance(record, dict):
            raise RunDirError(f"{path} line {number} is damaged (not a JSON object); every line is one epoch's "
                              "JSON record")
        records.append(record)
    return records


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter; a MissingExtraError (a ConfigError) naming the extra
    [tensorboard] when the tensorboard package is missing."""
    return require("torch.utils.tensorboard", "tensorboard").SummaryWriter


class TensorBoardLog:
    """RUN_DIR/tensorboard/: every numeric field of each epoch's metrics record as a scalar of the same name at
    step = the epoch (1-based, as in metrics.jsonl), flushed when written.

    A resumed run writes the records its checkpoint holds again, into a new event file that starts with
    TensorBoard's restart marker at step 1 (purge_step): TensorBoard then hides what earlier processes wrote,
    epochs they logged after the checkpoint included, and shows exactly what metrics.jsonl holds."""

    def __init__(self, out: Path, history: list[dict]):
        writer_class = summary_writer_class()
        self.writer = writer_class(str(Path(out) / TENSORBOARD), purge_step=1)
        for record in history:
            self._add_scalars(record)
        self.writer.flush()

    def _add_scalars(self, record: dict) -> None:
        epoch = record["epoch"]
        for name, value in record.items():
            if name != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, global_step=epoch)

    def add(self, record: dict) -> None:
        self._add_scalars(record)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def trim_steps_log(out: Path, global_step: int) -> None:
    """Keep the step lines up to `global_step` (the checkpoint's), none torn: the steps after it are redone."""
    path = out / STEPS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("global_step", 0) <= global_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
