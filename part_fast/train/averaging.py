"""Weight averaging: an exponential moving average (EMA) of the model's weights and BatchNorm statistics,
updated after every optimiser step (Gowal et al. 2020; the `--tau` of DM-AT).

After the update of global step t (1-based), every floating-point entry of the model's state_dict (the
weights and the BatchNorm running statistics) is averaged as

    average <- d_t * average + (1 - d_t) * current,   d_t = min(decay, t / (t + 9))

and the integer entries (BatchNorm's batch counts) are copied. The ramp t / (t + 9) (DM-AT's (1 + s) /
(10 + s), s = t - 1) keeps the first steps from tying the average to the random initial weights for
hundreds of steps: it reaches 0.995 only at step 1791.

Under DDP the weights are the same on every rank after each step, so their average is too. The BatchNorm
statistics are each rank's own in the middle of an epoch (as the model's are): the trainer broadcasts
rank 0's at each epoch's end, for the average as for the model, and a mid-epoch checkpoint keeps every
rank's, so the average is identical on every rank whenever it is evaluated or saved.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# The ramp: d_t = min(decay, t / (t + RAMP)).
RAMP = 9


def decay_at(step: int, decay: float) -> float:
    """The decay d_t of the update after global step `step` (1-based).

    Args:
        step: global optimiser step just taken, >= 1.
        decay: the run's --ema-decay, in (0, 1).

    Returns:
        min(decay, step / (step + 9))."""
    if step < 1:
        raise ValueError(f"step must be >= 1 (the update follows an optimiser step), got {step}")
    return min(decay, step / (step + RAMP))


class WeightAverage:
    """The EMA of a model: `model` is a frozen copy in eval mode (evaluate it, save it), `update(source,
    step)` folds in the weights after an optimiser step.

    Args:
        source: the trained model (any nn.Module); the average starts as a copy of it.
        decay: the EMA decay, in (0, 1) (0.995 is Gowal et al.'s).
    """

    def __init__(self, source: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(source).eval()
        self.model.requires_grad_(False)

    def _pairs(self, source: nn.Module):
        mine, theirs = self.model.state_dict(keep_vars=True), source.state_dict(keep_vars=True)
        if mine.keys() != theirs.keys():
            raise ValueError("the source model's state_dict has other entries than the average's")
        return [(mine[k].data, theirs[k].data) for k in mine]

    @torch.no_grad()
    def update(self, source: nn.Module, step: int) -> None:
        """Fold `source`'s weights and buffers in, after global step `step` (1-based; see decay_at).

        Args:
            source: the model being trained (same architecture as the average).
            step: the global optimiser step just taken."""
        d = decay_at(step, self.decay)
        averaged, current, copied, copied_from = [], [], [], []
        for avg, cur in self._pairs(source):
            if avg.is_floating_point():
                averaged.append(avg)
                current.append(cur.to(avg.dtype))
            else:
                copied.append(avg)
                copied_from.append(cur)
        if averaged:
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, current, alpha=1 - d)
        for avg, cur in zip(copied, copied_from):
            avg.copy_(cur)

    def buffers(self) -> list[torch.Tensor]:
        """The average's buffers (BatchNorm statistics), in model.buffers() order."""
        return list(self.model.buffers())

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the averaged model's state_dict and the decay."""
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(); ValueError if its decay is not this run's."""
        if float(state["decay"]) != self.decay:
            raise ValueError(f"the checkpoint's weight average has decay {state['decay']}, this run {self.decay}")
        self.model.load_state_dict(state["model"])
