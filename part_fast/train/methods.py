"""What each training method is, in one table: `METHOD[name]` is a `Method` record.

A method is a base method (AT, TRADES, MART: an inner attack and an outer loss, docs/method.md §3) and
whether PART's pixel budget replaces the global eps after the warm-up. The trainer reads only these
records, so adding a method is one row here and nothing in step.py.

The inner attacks are the release's (part_fast.losses' docstring has the table and the reasons): AT ascends
the cross-entropy from a uniform start inside the box; in PART epochs the run's `start` setting chooses that
start or the release's global-eps one ("release"). TRADES ascends KL(p_nat || p(x)) and MART the
cross-entropy, both from x + 0.001 N(0, 1), in every phase.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..losses import at_loss, mart_loss, trades_loss

# Marks a PART-epoch start that the run's `start` setting chooses (TrainConfig.start).
START_FROM_CONFIG = "config"


def _at_outer(logits_nat: torch.Tensor | None, logits_adv: torch.Tensor, y: torch.Tensor, beta: float,
              label_smoothing: float = 0.0):
    del logits_nat, beta  # AT's outer loss sees the adversarial logits alone
    return at_loss(logits_adv, y, label_smoothing=label_smoothing)


def _trades_outer(logits_nat, logits_adv, y, beta, label_smoothing=0.0):
    return trades_loss(logits_nat, logits_adv, y, beta, label_smoothing=label_smoothing)


def _mart_outer(logits_nat, logits_adv, y, beta, label_smoothing=0.0):
    if label_smoothing:
        raise ValueError("MART's outer loss takes no label smoothing")  # TrainConfig refuses it first
    return mart_loss(logits_nat, logits_adv, y, beta)


@dataclass(frozen=True)
class Method:
    name: str
    base: str  # "at" | "trades" | "mart": the method whose attack and loss this one uses
    pixel_budget: bool  # after the warm-up, the CAM's per-pixel eps replaces the global eps (PART)
    inner_loss: str  # what the attack ascends (part_fast.attacks.PGD loss=)
    global_start: str  # the attack's start in global-eps epochs (the warm-up, or every epoch of a base method)
    part_start: str  # its start in PART epochs (START_FROM_CONFIG: the run's `start` setting)
    # f(x_nat) in train mode next to f(x_adv): the outer loss needs natural logits (TRADES, MART).
    natural_logits: bool
    # TRADES' KL target p_nat comes from an eval-mode f(x_nat); in PART epochs the budget's CAM forward
    # computes exactly that, so the attack reuses it instead of running the model again.
    attack_reuses_cam_logits: bool
    # outer_loss(logits_nat or None, logits_adv, y, beta, label_smoothing) -> 0-dim loss tensor
    outer_loss: Callable[..., torch.Tensor]

    def attack_start(self, part_phase: bool, configured_start: str) -> str:
        start = self.part_start if part_phase else self.global_start
        return configured_start if start == START_FROM_CONFIG else start

    @property
    def part(self) -> "Method":
        """The PART version of this base method."""
        return replace(self, name="part" if self.base == "at" else f"part-{self.base}", pixel_budget=True)


_BASES = (
    Method("at", "at", False, inner_loss="ce", global_start="uniform", part_start=START_FROM_CONFIG,
           natural_logits=False, attack_reuses_cam_logits=False, outer_loss=_at_outer),
    Method("trades", "trades", False, inner_loss="kl", global_start="normal", part_start="normal",
           natural_logits=True, attack_reuses_cam_logits=True, outer_loss=_trades_outer),
    Method("mart", "mart", False, inner_loss="ce", global_start="normal", part_start="normal",
           natural_logits=True, attack_reuses_cam_logits=False, outer_loss=_mart_outer),
)

METHOD: dict[str, Method] = {m.name: m for base in _BASES for m in (base, base.part)}
METHODS = tuple(METHOD)  # ("at", "part", "trades", "part-trades", "mart", "part-mart")
