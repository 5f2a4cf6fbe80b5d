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
from ..models import CAM_LAYERS, get_model
from .averaging import WeightAverage
from .awp import WeightPerturbation
from .config import AMP_DTYPES, TrainConfig
from .distributed import Distributed

PURPOSE_AUGMENT, PURPOSE_ATTACK, PURPOSE_MODEL = 1, 2, 3


def lr_factor(epoch: int, warmup: int, milestones, *, schedule: str = "step", lr_warmup: int = 0,
              epochs: int | None = None) -> float:
    """The LR multiplier of 0-based global `epoch`.

    Args:
        epoch: the epoch, 0-based, warm-ups included.
        warmup: PART warm-up epochs (--warmup): the origin of the step schedule's milestones.
        milestones: for "step", epochs after the PART warm-up (1-based) at which the LR drops 10x, as released.
        schedule: "step" or "cosine" (0.5 (1 + cos(pi t / T)), t = epoch - lr_warmup, T = epochs - lr_warmup;
            0 from epoch = epochs on, where the LR scheduler lands after the last epoch).
        lr_warmup: epochs of linear LR warm-up first: epoch e < lr_warmup trains at (e + 1) / lr_warmup.
        epochs: the run's epochs (needed by "cosine").

    Returns:
        The factor that multiplies --lr during `epoch`."""
    if epoch < lr_warmup:
        return (epoch + 1) / lr_warmup
    if schedule == "cosine":
        if epochs is None:
            raise ValueError("the cosine schedule needs the run's epochs")
        if epoch >= epochs:  # the scheduler's step after the last epoch: the end of the cosine
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - lr_warmup) / (epochs - lr_warmup)))
    if schedule != "step":
        raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")
    after_warmup = epoch - warmup + 1  # 1-based epoch count after the warm-up (<= 0 during it)
    return 0.1 ** sum(after_warmup >= m for m in milestones)


def restore_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a checkpoint is loaded: the LR of the epoch the run resumes at, from this run's schedule rather
    than the checkpoint's value (the same number, unless a resume changed --epochs under a cosine schedule,
    whose every epoch depends on it)."""
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


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
    ranks: Distributed
    budget: PixelBudget
    average: WeightAverage | None = None  # the weight average (config.ema_decay), else None
    perturbation: WeightPerturbation | None = None  # AWP (config.awp_gamma), else None
    num_classes: int = 10
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimiser steps taken in the epoch in progress
    global_step: int = 0  # optimiser steps taken in all

    @property
    def evaluated_model(self) -> nn.Module:
        """What the run evaluates (and best.pt is chosen by): the weight average when there is one."""
        return self.attack_model if self.average is None else self.average.model

    def rank_buffers(self) -> list[torch.Tensor]:
        """The tensors each rank updates on its own (BatchNorm statistics of the model, then of the average):
        broadcast from rank 0 at each epoch's end, gathered from every rank by a mid-epoch checkpoint."""
        return [*self.model.buffers(), *(self.average.buffers() if self.average is not None else ())]

    def autocast(self):
        config = self.config
        if config.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[config.amp])

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    model = get_model(config.arch, num_classes=num_classes)
    find_layer(model, CAM_LAYERS.get(config.arch))  # fail now, not after an epoch, if no CAM layer is found
    return model


def build_state(config: TrainConfig, num_classes: int, device: torch.device, ranks: Distributed) -> RunState:
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
        torch.manual_seed(config.seed)
        model = build_model(config, num_classes).to(device)
    if config.sync_bn and ranks.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    attack_model = torch.compile(model) if config.compile else model
    outer: nn.Module = _OuterForward(attack_model)
    if ranks.enabled:
        ids = [device.index] if device.type == "cuda" else None
        outer = nn.parallel.DistributedDataParallel(outer, device_ids=ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, config.warmup, config.milestones, schedule=config.lr_schedule,
                                       lr_warmup=config.lr_warmup, epochs=config.epochs))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    budget = PixelBudget(config.eps, config.eps_low, config.cam, config.mask, layer=CAM_LAYERS.get(config.arch))
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    perturbation = WeightPerturbation(model, config.awp_gamma, ranks) if config.awp_gamma else None
    return RunState(config, model, attack_model, outer, optimizer, scheduler, scaler, device, ranks, budget,
                    average=average, perturbation=perturbation, num_classes=num_classes)


def inner_attack(state: RunState, part_phase: bool) -> PGD:
    """The inner maximisation of the run's method in this phase (methods.py says which loss and start)."""
    config = state.config
    method = config.training_method
    return PGD(state.attack_model, eps=config.eps, alpha=config.step_size, steps=config.steps, loss=method.inner_loss,
               start=method.attack_start(part_phase, config.start))


# The per-step numbers a step leaves on the device, summed over the epoch without reading them back.
STAT_NAMES = ("loss_sum", "correct_adv", "correct_nat", "examples", "eps_high", "non_finite")


@dataclass
class StepResult:
    """What a step measured. `stats` stays on the device (STAT_NAMES: sums over this rank's batch) so a
    step never waits for the device; reading a field below waits for it once."""

    stats: torch.Tensor  # float64, len(STAT_NAMES)
    seconds: dict  # per stage, when config.time_stages; else empty
    _read: list | None = None

    def value(self, name: str) -> float:
        if self._read is None:
            self._read = self.stats.tolist()
        return self._read[STAT_NAMES.index(name)]

    @property
    def loss(self) -> float:  # mean over this rank's batch
        return self.value("loss_sum") / self.value("examples")

    @property
    def eps_high(self) -> float:  # share of pixels (x channels) given the full eps in this batch
        return self.value("eps_high")

    @property
    def finite(self) -> bool:
        return not self.value("non_finite")


class _StageClock:
    """Wall seconds per stage when asked for; otherwise nothing, and above all no device synchronisation
    (a synchronisation stalls the host until the device drains, so the next kernels are queued late)."""

    def __init__(self, state: RunState, enabled: bool):
        self.state, self.enabled, self.seconds = state, enabled, {}
        self.last = time.perf_counter() if enabled else 0.0

    def lap(self, stage: str) -> None:
        if self.enabled:
            self.state.sync()
            now = time.perf_counter()
            self.seconds[stage], self.last = now - self.last, now


def train_step(state: RunState, x: torch.Tensor, y: torch.Tensor, *, part_phase: bool, attack: PGD,
               attack_gen: torch.Generator | None, augment_gen: torch.Generator | None,
               perturb_weights: bool = False) -> StepResult:
    """One optimiser step on the batch (x, y): augment -> budget -> attack -> [AWP] -> outer loss -> step.

    With `perturb_weights` (needs state.perturbation), the outer loss's gradient is taken at the AWP-perturbed
    weights (awp.py). Nothing here waits for the device (unless config.time_stages): a non-finite loss is
    counted in the result's stats, which the loop checks before anything is saved or logged."""
    config, device, method = state.config, state.device, state.config.training_method
    clock = _StageClock(state, config.time_stages)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if augment_gen is not None:
        x = data_mod.augment_batch(x, augment_gen)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    clock.lap("data")

    eps_map, cam_logits = None, None
    with state.autocast():
        if part_phase:
            # The CAM of exactly this (augmented) batch, and its eval-mode logits.
            eps_map, cam_logits = state.budget.with_logits(state.model, x)
    clock.lap("budget")

    with state.autocast():
        reuse = {"clean_logits": cam_logits} if method.attack_reuses_cam_logits else {}
        x_adv = attack(x, y, eps_map=eps_map, generator=attack_gen, **reuse)
    clock.lap("attack")

    inputs = (x, x_adv) if method.natural_logits else (x_adv,)

    def outer_loss(logits):
        logits_nat, logits_adv = logits if method.natural_logits else (None, logits[0])
        return method.outer_loss(logits_nat, logits_adv, y, config.beta, config.label_smoothing), logits_nat, logits_adv

    perturbed = contextlib.nullcontext()
    if perturb_weights:
        def proxy_loss(proxy):
            with state.autocast():
                return outer_loss(tuple(proxy(inp) for inp in inputs))[0]

        perturbed = state.perturbation.applied(state.model, state.perturbation.perturbation(state.model, proxy_loss))
        clock.lap("awp")

    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    with perturbed:  # the weights are restored (bit-exact) before the optimiser steps
        with state.autocast():
            loss, logits_nat, logits_adv = outer_loss(state.outer(*inputs))
        # A non-finite loss still steps (every rank must join the gradient all-reduce); the loop refuses to
        # save or log past it, and the checkpoint before it is kept.
        state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.average is not None:
        state.average.update(state.model, state.global_step + 1)  # (the loop counts the step after this call)
    clock.lap("update")

    with torch.no_grad():
        loss64 = loss.detach().double()
        finite = torch.isfinite(loss64)
        n = y.shape[0]
        stats = torch.stack([
            torch.where(finite, loss64 * n, 0.0),
            (logits_adv.argmax(1) == y).sum().double(),
            (logits_nat.argmax(1) == y).sum().double() if logits_nat is not None else loss64.new_zeros(()),
            loss64.new_full((), float(n)),
            (eps_map == config.eps).double().mean() if eps_map is not None else loss64.new_ones(()),
            (~finite).double(),
        ])
    return StepResult(stats, clock.seconds)
