"""One optimiser step, as the paper's algorithm reads:

    data -> augment -> budget (CAM of this exact batch -> per-pixel eps) -> attack -> outer loss -> step

The budget is computed for the augmented batch that is attacked, so the release's mask/image misalignment
(docs/method.md §5) cannot happen. Everything random in a step comes from generators seeded by
(seed, epoch, rank, step), so any step can be replayed, and a run resumed at any step continues exactly.
"""
from __future__ import annotations

import contextlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import data as data_mod
from ..attacks import PGD
from ..budget import PixelBudget
from ..cam import find_layer
from ..errors import TrainingDiverged
from ..losses import OUTER_LOSSES
from ..models import CAM_LAYERS, get_model
from .config import AMP_DTYPES, TrainConfig
from .distributed import Distributed

PURPOSE_AUGMENT, PURPOSE_ATTACK, PURPOSE_MODEL = 1, 2, 3


def lr_factor(epoch: int, warmup: int, milestones) -> float:
    """LR multiplier for 0-based global `epoch`: 0.1 per milestone reached, counted after the warm-up."""
    after_warmup = epoch - warmup + 1  # 1-based epoch count after the warm-up (<= 0 during it)
    return 0.1 ** sum(after_warmup >= m for m in milestones)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams per (seed, purpose, epoch, rank, step)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]) >> 1


class StepRandomness:
    """The random streams of one rank's steps. `at(epoch, step)` re-seeds the augmentation and attack
    generators for that step and returns a context in which the default CPU / CUDA generators (which model
    code such as dropout draws from) are seeded for it too; the caller's global generator states are
    restored afterwards."""

    def __init__(self, seed: int, rank: int, device: torch.device, augment: bool):
        self.seed, self.rank, self.device = seed, rank, device
        self.augment = torch.Generator() if augment else None
        self.attack = torch.Generator(device=device)

    def at(self, epoch: int, step: int):
        def seed(purpose: int) -> int:
            return derived_seed(self.seed, purpose, epoch, self.rank, step)

        if self.augment is not None:
            self.augment.manual_seed(seed(PURPOSE_AUGMENT))
        self.attack.manual_seed(seed(PURPOSE_ATTACK))
        return self._model_seeded(seed(PURPOSE_MODEL))

    @contextlib.contextmanager
    def _model_seeded(self, seed: int):
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)  # the current device, which the session set to ours
            yield


class _OuterForward(nn.Module):
    """The train-mode forwards of one step as one module call, so DDP sees exactly one forward per backward
    (TRADES and MART need f(x_nat) and f(x_adv), each with its own BatchNorm batch statistics, as the
    release computes them)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return tuple(self.model(x) for x in inputs)


@dataclass
class RunState:
    """Everything a step needs, and where the run stands; built once per run."""

    config: TrainConfig
    model: nn.Module  # the plain model (CAM, checkpoints)
    attack_model: nn.Module  # plain or compiled: used by the attack
    outer: nn.Module  # _OuterForward, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    dist: Distributed
    budget: PixelBudget
    num_classes: int = 10
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimiser steps taken in the epoch in progress
    global_step: int = 0  # optimiser steps taken in all

    def autocast(self):
        cfg = self.config
        if cfg.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[cfg.amp])

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    model = get_model(config.arch, num_classes=num_classes)
    find_layer(model, CAM_LAYERS.get(config.arch))  # fail now, not after an epoch, if no CAM layer is found
    return model


def build_state(config: TrainConfig, num_classes: int, device: torch.device, dist_info: Distributed) -> RunState:
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
        torch.manual_seed(config.seed)
        model = build_model(config, num_classes).to(device)
    if config.sync_bn and dist_info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    attack_model = torch.compile(model) if config.compile else model
    outer: nn.Module = _OuterForward(attack_model)
    if dist_info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        outer = nn.parallel.DistributedDataParallel(outer, device_ids=ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, config.warmup, config.milestones))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    budget = PixelBudget(config.eps, config.eps_low, config.cam, config.mask, layer=CAM_LAYERS.get(config.arch))
    return RunState(config, model, attack_model, outer, optimizer, scheduler, scaler, device, dist_info, budget,
                    num_classes=num_classes)


def make_attack(state: RunState, part_phase: bool) -> PGD:
    """The inner maximisation of the base method. AT starts uniformly in the (per-pixel) box; with
    start="release", PART epochs use the released PART-PGD start (global eps, unclipped) while warm-up
    epochs keep the uniform start, as the release's torchattacks PGD did."""
    cfg = state.config
    if cfg.base == "trades":
        loss, start = "kl", "normal"
    elif cfg.base == "mart":
        loss, start = "ce", "normal"
    else:
        loss, start = "ce", ("release" if cfg.start == "release" and part_phase else "uniform")
    return PGD(state.attack_model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, start=start, loss=loss)


@dataclass
class StepResult:
    loss: float  # mean over this rank's batch
    global_loss: float  # mean over the global batch (all ranks)
    correct_adv: int
    correct_nat: int | None
    examples: int
    eps_high: float  # pixels (x channels) given the full eps, over this batch
    seconds: dict
    control: tuple[float, ...] = ()  # the `control` values, summed over ranks


def train_step(state: RunState, x: torch.Tensor, y: torch.Tensor, *, part_phase: bool, attack: PGD,
               attack_gen: torch.Generator | None, augment_gen: torch.Generator | None,
               control=()) -> StepResult:
    """One optimiser step on the batch (x, y): augment -> budget -> attack -> outer loss -> step.

    `control`: per-rank numbers (stop requests, save decisions), or a function returning them, read just
    before the collective that checks the loss and summed across ranks in it, so the ranks agree on them
    without another synchronisation; see StepResult.control."""
    cfg, device = state.config, state.device
    t0 = time.perf_counter()
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if augment_gen is not None:
        x = data_mod.augment_batch(x, augment_gen)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    state.sync()
    t1 = time.perf_counter()

    eps_map, clean_logits = None, None
    with state.autocast():
        if part_phase:
            # The CAM of exactly this (augmented) batch; its eval-mode logits double as TRADES' clean target.
            eps_map, clean_logits = state.budget.with_logits(state.model, x)
    state.sync()
    t2 = time.perf_counter()

    with state.autocast():
        kwargs = {"clean_logits": clean_logits} if cfg.base == "trades" else {}
        x_adv = attack(x, y, eps_map=eps_map, generator=attack_gen, **kwargs)
    state.sync()
    t3 = time.perf_counter()

    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    with state.autocast():
        if cfg.base == "at":
            (logits_adv,) = state.outer(x_adv)
            logits_nat = None
            loss = OUTER_LOSSES["at"](logits_adv, y)
        else:
            logits_nat, logits_adv = state.outer(x, x_adv)
            loss = OUTER_LOSSES[cfg.base](logits_nat, logits_adv, y, cfg.beta)
    loss_value = float(loss.detach())
    n = int(y.shape[0])
    finite = math.isfinite(loss_value)
    # Every rank decides together, or the healthy ranks would wait forever in the gradient all-reduce.
    bad_ranks, loss_sum, count, *control_sums = state.dist.all_sum(
        [0.0 if finite else 1.0, loss_value * n if finite else 0.0, n, *(control() if callable(control) else control)],
        device)
    if bad_ranks:
        raise TrainingDiverged(f"the {cfg.method} loss became non-finite ({loss_value} on rank {state.dist.rank}) "
                               f"at epoch {state.epoch + 1}, step {state.step_in_epoch + 1}; the last checkpoint is "
                               "kept, with the weights before it")
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.sync()
    t4 = time.perf_counter()

    with torch.no_grad():
        correct_adv = int((logits_adv.argmax(1) == y).sum())
        correct_nat = None if logits_nat is None else int((logits_nat.argmax(1) == y).sum())
        eps_high = 1.0 if eps_map is None else float((eps_map == cfg.eps).float().mean())
    return StepResult(loss_value, loss_sum / count, correct_adv, correct_nat, n, eps_high,
                      {"data": t1 - t0, "budget": t2 - t1, "attack": t3 - t2, "update": t4 - t3},
                      tuple(control_sums))
