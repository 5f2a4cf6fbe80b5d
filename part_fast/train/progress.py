"""Where an epoch in progress stands on one rank: its running sums (EpochProgress), what a mid-epoch
checkpoint keeps of them (`state_dict()`, a dict keyed by name, one per rank), and how a checkpoint's saved
progress is read back, on the same number of ranks or, regrouped, on another.

Checkpoints of format 2 written before the dict form hold each rank's progress as a positional vector (the
values of LEGACY_FIELDS, in that order); `restored` reads both forms. Those and the dict-form checkpoints
written before the AWP stage have no "awp_seconds": it is read as 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from .distributed import Distributed
from .step import STAT_NAMES

# The step statistics a checkpoint keeps (not the non-finite count: a checkpoint is never written after a
# non-finite loss), and the stages of a step that are timed.
SAVED_STATS = tuple(name for name in STAT_NAMES if name != "non_finite")
STAGES = ("data", "budget", "attack", "awp", "update")
# The names of state_dict(), in the order the ranks exchange them in; LEGACY_FIELDS, the order of the
# checkpoints written before the dict form (before the AWP stage).
LEGACY_FIELDS = (*SAVED_STATS, "steps", *(f"{stage}_seconds" for stage in STAGES if stage != "awp"), "elapsed")
FIELDS = (*LEGACY_FIELDS, "awp_seconds")
# What the epoch's end adds over the ranks: the sums and the step count.
_SUMMED = (*SAVED_STATS, "steps")


@dataclass
class EpochProgress:
    """One rank's running sums over the epoch in progress; a mid-epoch checkpoint holds every rank's.

    The step statistics are summed on the device, so a step never waits for it; they are read at the
    points where the host needs them (a checkpoint, a log line, the epoch's end)."""

    device: torch.device
    totals: torch.Tensor | None = None  # sum of the steps' StepResult.stats
    first_non_finite: torch.Tensor | None = None  # global step of the first non-finite loss, or -1
    steps: int = 0
    seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    elapsed: float = 0.0  # wall seconds spent in this epoch before now (earlier processes included)

    def add(self, r, global_step: int) -> None:
        if self.totals is None:
            self.totals = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=self.device)
            self.first_non_finite = torch.full((), -1.0, dtype=torch.float64, device=self.device)
        bad = r.stats[STAT_NAMES.index("non_finite")] > 0
        self.first_non_finite = torch.where((self.first_non_finite < 0) & bad, float(global_step),
                                            self.first_non_finite)
        self.totals += r.stats
        self.steps += 1
        for k, v in r.seconds.items():
            self.seconds[k] += v

    def sums(self) -> dict:
        """The statistics summed so far (reads them from the device)."""
        values = [0.0] * len(STAT_NAMES) if self.totals is None else self.totals.tolist()
        return dict(zip(STAT_NAMES, values))

    def first_non_finite_step(self) -> int | None:
        if self.first_non_finite is None:
            return None
        step = int(self.first_non_finite)
        return None if step < 0 else step

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this rank's progress, keyed by FIELDS: the saved statistics' sums, the
        steps, each stage's seconds ('<stage>_seconds') and the elapsed seconds."""
        sums = self.sums()
        return {**{k: sums[k] for k in SAVED_STATS}, "steps": self.steps,
                **{f"{stage}_seconds": self.seconds[stage] for stage in STAGES}, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() (the non-finite record starts clean: none was saved). CheckpointError
        unless `state` has exactly the FIELDS."""
        state = {"awp_seconds": 0.0, **state}  # (saved before the AWP stage)
        missing, unexpected = sorted(set(FIELDS) - set(state)), sorted(set(state) - set(FIELDS))
        if missing or unexpected:
            raise CheckpointError(f"epoch progress: missing {missing}, unexpected {unexpected}")
        self.totals = torch.tensor([0.0 if k == "non_finite" else float(state[k]) for k in STAT_NAMES],
                                   dtype=torch.float64, device=self.device)
        self.first_non_finite = torch.full((), -1.0, dtype=torch.float64, device=self.device)
        self.steps = int(state["steps"])
        self.seconds = {stage: float(state[f"{stage}_seconds"]) for stage in STAGES}
        self.elapsed = float(state["elapsed"])


def _state_of(vector) -> dict:
    """A positional vector (FIELDS' values in order, or a legacy checkpoint's LEGACY_FIELDS') as a state_dict()."""
    names = {len(FIELDS): FIELDS, len(LEGACY_FIELDS): LEGACY_FIELDS}.get(len(vector))
    if names is None:
        raise CheckpointError(f"epoch progress has {len(vector)} values, expected {len(LEGACY_FIELDS)} (a checkpoint "
                              f"written before the dict form)")
    state = dict(zip(names, (float(v) for v in vector)))
    state["steps"] = int(state["steps"])
    return state


def gathered(progress: EpochProgress, ranks: Distributed) -> list[dict]:
    """Every rank's state_dict(), in rank order: what a mid-epoch checkpoint holds. A collective: every rank
    calls it (the values travel as one float64 vector per rank, in FIELDS' order)."""
    state = progress.state_dict()
    return [_state_of(vector) for vector in ranks.all_gather([state[k] for k in FIELDS])]


def regrouped(states: list[dict], rank: int) -> dict:
    """Rank `rank`'s state_dict() when a mid-epoch checkpoint of len(states) ranks continues on another
    number of them: rank 0 carries every saved rank's sums and step count (the epoch's end adds them over
    ranks, so its metrics still cover every example trained), the others start from zero; the stage times
    and the elapsed time are rank 0's, which is whose the metrics report."""
    first = dict(states[0])
    if rank == 0:
        for other in states[1:]:
            for k in _SUMMED:
                first[k] += other[k]
        return first
    return {**first, **dict.fromkeys(_SUMMED, 0.0)}


def restored(saved: list, rank: int, saved_world: int, world: int, device: torch.device) -> EpochProgress:
    """Rank `rank`'s EpochProgress from a mid-epoch checkpoint's `epoch_progress` (one entry per saved rank:
    a state_dict(), or the positional vector of checkpoints written before the dict form), saved by
    `saved_world` ranks and continued by `world` (regrouped when they differ)."""
    states = [_state_of(entry) if isinstance(entry, (list, tuple)) else entry for entry in saved]
    if not all(isinstance(state, dict) for state in states):
        raise CheckpointError(f"epoch progress holds {[type(s).__name__ for s in states]}, expected one dict per rank")
    progress = EpochProgress(device)
    progress.load_state_dict(states[rank] if saved_world == world else regrouped(states, rank))
    return progress
