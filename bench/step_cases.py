"""One optimiser step of each method, as the benchmark sections run it (shared by train_step and
memory_report; a shared piece, not a section).

`Case` holds a RunState of its method loaded with shared initial weights and restores the same snapshot
(weights, BatchNorm buffers, momentum) before every step, so that repeated steps do identical work;
"release" is the released code's step, emulated by part_fast.release (per-image mask, eager update)."""
from __future__ import annotations

import copy
import statistics

import numpy as np
import torch
from torch import nn

from bench.common import Interference, Runs, Stopwatch
from part_fast.attacks import PGD
from part_fast.cam import find_layer
from part_fast.losses import OUTER_LOSSES
from part_fast.models import CAM_LAYERS
from part_fast.modes import eval_mode
from part_fast.release import release_eps_map, release_update_pgd
from part_fast.train import (
    Distributed,
    TrainConfig,
    build_state,
    inner_attack,
    train_step,
)

SEED = 0
CPU = torch.device("cpu")
SPLIT = ("data", "budget", "attack", "awp", "update")  # "awp": 0 for the rows without it


class Layer4Alias(nn.Module):
    """`part_fast.release.release_eps_map` reads its CAM layer as `model.layer4` (the release's ResNet-18
    choice); for another architecture this wrapper names the model's CAM layer `layer4`. It shares the
    model's parameters, so the release's `model.zero_grad()` and full backward act on the model itself."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        super().__init__()
        self.net, self.layer4 = model, layer

    def forward(self, x):
        return self.net(x)


def release_cam_model(model: nn.Module, arch: str) -> nn.Module:
    """What to hand `release_eps_map`: the model itself when its CAM layer is `layer4`, else a Layer4Alias."""
    layer = find_layer(model, CAM_LAYERS.get(arch))
    return model if getattr(model, "layer4", None) is layer else Layer4Alias(model, layer)


class Case:
    """One row: a RunState of its method loaded with the shared initial weights, restored to the same
    snapshot (weights, BatchNorm buffers, momentum) before every timed step."""

    def __init__(self, name: str, method: str, part_phase: bool, arch: str, batch: int, steps: int,
                 init: dict, device=CPU, options: dict | None = None):
        self.name, self.part_phase, self.device = name, part_phase, device
        self.release = method == "release"
        # options: more TrainConfig settings (the recipe additions: ema_decay, awp_gamma)
        config = TrainConfig(out="(unused: no run directory)", arch=arch, method="part" if self.release else method,
                             batch_size=batch, steps=steps, augment=False, eval_examples=0, device=str(device),
                             seed=SEED, time_stages=True, **(options or {})).resolved()  # time_stages: the split
        self.state = build_state(config, num_classes=10, device=device, ranks=Distributed())
        self.state.model.load_state_dict(copy.deepcopy(init))
        if self.release:
            # The release's PART-PGD: global-eps start, not clipped; the eager update is part_fast.release's loop.
            self.attack = PGD(self.state.attack_model, eps=config.eps, alpha=config.step_size, steps=config.steps,
                              start="release", loss="ce")
            model = self.state.model
            self.cam_model = release_cam_model(model, arch)
        else:
            self.attack = inner_attack(self.state, part_phase)
        self.snapshot = None
        self.timed = Runs()  # each timed step: wall seconds and the CPU other processes used
        self.splits, self.eps_high, self.losses = [], [], []

    def take_snapshot(self):
        self.snapshot = (copy.deepcopy(self.state.model.state_dict()), copy.deepcopy(self.state.optimizer.state_dict()))

    def restore(self):
        if self.snapshot is not None:
            self.state.model.load_state_dict(self.snapshot[0])
            self.state.optimizer.load_state_dict(self.snapshot[1])
        for p in self.state.model.parameters():
            p.grad = None

    def release_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The release's per-image CAM + mask pipeline on these images, timed (eval mode, as the release)."""
        model = self.state.model
        with eval_mode(model), np.errstate(invalid="ignore", divide="ignore"):
            watch = Stopwatch()
            eps_map = release_eps_map(self.cam_model, x, self.state.config.eps, self.state.config.eps_low)
            seconds = watch.elapsed()
        for p in model.parameters():  # the release's loop leaves a .grad on every parameter
            p.grad = None
        return eps_map, seconds

    def release_step(self, x, y, eps_map, mask_seconds: float) -> dict:
        """The release's step minus its mask (timed apart): eval-mode PGD-k with the global-eps unclipped
        start and the eager update, then the same train-mode CE + SGD step as train_step."""
        st = self.state
        watch = Stopwatch()
        x, y = x.to(self.device), y.to(self.device)
        data_s = watch.lap()
        x_adv = release_update_pgd(self.attack, x, y, eps_map)
        attack_s = watch.lap()
        st.model.train()
        st.optimizer.zero_grad(set_to_none=True)
        (logits_adv,) = st.outer(x_adv)
        loss = OUTER_LOSSES["at"](logits_adv, y)
        loss_value = float(loss.detach())
        loss.backward()
        st.optimizer.step()
        update_s = watch.lap()
        self.eps_high.append(float((eps_map == st.config.eps).float().mean()))
        self.losses.append(loss_value)
        return {"data": data_s, "budget": mask_seconds, "attack": attack_s, "awp": 0.0, "update": update_s}

    def step(self, x, y, timed: bool = True):
        """One optimiser step from the snapshot; records wall seconds (+ the amortised mask for the release)."""
        self.restore()
        if self.release:
            eps_map, mask_s = self.release_mask(x)  # once per rep: per-image cost x batch = this loop's time
            with Interference() as it:
                split = self.release_step(x, y, eps_map, mask_s)
            wall, others = it.seconds + mask_s, it.others
        else:
            gen = torch.Generator(device=self.device).manual_seed(SEED)  # the same random start every rep
            with Interference() as it:
                r = train_step(self.state, x, y, part_phase=self.part_phase, attack=self.attack, attack_gen=gen,
                               augment_gen=None, perturb_weights=self.state.perturbation is not None)
            wall, others, split = it.seconds, it.others, {"awp": 0.0, **r.seconds}
            self.eps_high.append(r.eps_high)
            self.losses.append(r.loss)
        if timed:
            self.timed.add(wall, others)
            self.splits.append(split)

    def summary(self, batch: int) -> dict:
        best, runs = self.timed.best(), self.timed.summary()
        median_split = {k: statistics.median(s[k] for s in self.splits) for k in SPLIT}
        return {"name": self.name, "method": "part (release emulation)" if self.release else self.state.config.method,
                "part_phase": self.part_phase, "min_s": runs["min_s"], "median_s": runs["median_s"],
                "runs_s": runs["runs_s"], "images_per_s": batch / runs["min_s"],
                "images_per_s_median": batch / runs["median_s"],
                "seconds": self.splits[best], "seconds_median": median_split,
                "others_cores_best": runs["others_cores_best"], "others_cores_runs": runs["others_cores_runs"],
                "eps_high_fraction": self.eps_high[-1], "loss": self.losses[-1]}
