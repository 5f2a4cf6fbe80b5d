"""The PART trainer as a library: AT, TRADES, MART and their PART versions (PART, PART-T, PART-M).

Every step reads as the paper's algorithm:

    data -> augment -> budget (CAM of this exact batch -> per-pixel eps) -> attack -> outer loss -> step

The budget is computed for the augmented batch that is attacked, so the release's mask/image misalignment
(PART_REFERENCE.md §5) cannot happen. PART methods train `warmup` epochs with their base method first.

Reproducibility: everything random in epoch e is drawn from generators seeded by (seed, e, rank): the data
order (DistributedSampler), the augmentation and the attack's random start. A checkpoint, written
atomically after every epoch, therefore holds all the state an interrupted run needs to continue exactly
(also the global python / numpy / torch / CUDA generator states, for model code that uses them).

Scale: one process per device under torchrun (DDP). Each rank augments, budgets and attacks its own shard
of the global batch; the outer-loss forward/backward is the only DDP call; metrics are summed across ranks;
only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import data as data_mod
from .attacks import PGD
from .budget import MASKS, PixelBudget
from .cam import METHODS as CAM_METHODS
from .cam import find_layer
from .evaluate import evaluate
from .losses import OUTER_LOSSES
from .models import CAM_LAYERS, get_model

METHODS = ("at", "trades", "mart", "part", "part-trades", "part-mart")
BASE_METHOD = {"at": "at", "part": "at", "trades": "trades", "part-trades": "trades", "mart": "mart", "part-mart": "mart"}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STARTS = ("uniform", "release")

# The released recipe per dataset (PART_REFERENCE.md §2): values a flag left unset takes.
DATASET_DEFAULTS = {
    "cifar10": {"lr": 0.01, "weight_decay": 2e-4, "step_size": 2 / 255},
    "svhn": {"lr": 0.01, "weight_decay": 0.0035, "step_size": 1 / 255},
}
_OTHER_DEFAULTS = DATASET_DEFAULTS["cifar10"]  # TinyImageNet, ImageFolder, shapes: the CIFAR-10 recipe

# Config fields a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = ("epochs", "device", "workers", "progress", "eval_examples", "download", "data_dir")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    out: str
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    arch: str = "resnet18"
    method: str = "part"
    epochs: int = 80
    warmup: int = 20
    lr: float | None = None  # None: the dataset's released value
    momentum: float = 0.9
    weight_decay: float | None = None
    # The LR is multiplied by 0.1 at each milestone, counted in epochs after the warm-up (1-based), as the
    # release counts PART epochs; the same schedule applies to the base methods, so AT and PART differ
    # only in the budget.
    milestones: tuple[int, ...] = (60, 90)
    batch_size: int = 128  # global batch: split evenly across DDP ranks
    eps: float = 8 / 255
    eps_low: float = 7 / 255
    steps: int = 10
    step_size: float | None = None
    beta: float = 6.0
    cam: str = "gradcam"
    mask: str = "jet"
    # The AT/MART-CE attack's start: "uniform" draws inside the per-pixel box (and [0, 1]); "release" is the
    # released PART-PGD start (global eps, unclipped). TRADES and MART always start at x + 0.001 N(0, 1).
    start: str = "uniform"
    augment: bool = True
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    device: str = "cpu"
    workers: int = 0
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    eval_examples: int = 1000  # test examples for the per-epoch natural / PGD-20 accuracy (0: none)
    log_steps: bool = False  # also write RUN_DIR/steps.jsonl (one line per optimiser step)
    progress: bool | None = None  # None: progress bars only on a terminal

    def resolved(self) -> "TrainConfig":
        """A copy with the dataset's released defaults filled in, validated."""
        defaults = DATASET_DEFAULTS.get(self.dataset, _OTHER_DEFAULTS)
        cfg = dataclasses.replace(
            self,
            lr=defaults["lr"] if self.lr is None else float(self.lr),
            weight_decay=defaults["weight_decay"] if self.weight_decay is None else float(self.weight_decay),
            step_size=defaults["step_size"] if self.step_size is None else float(self.step_size),
            milestones=tuple(int(m) for m in self.milestones),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.dataset in data_mod.DATASETS, f"dataset must be one of {data_mod.DATASETS}, got {self.dataset!r}")
        need(self.cam in CAM_METHODS, f"cam must be one of {CAM_METHODS}, got {self.cam!r}")
        need(self.mask in MASKS, f"mask must be one of {MASKS}, got {self.mask!r}")
        need(self.start in STARTS, f"start must be one of {STARTS}, got {self.start!r}")
        need(self.amp in (None, *AMP_DTYPES), f"amp must be one of {tuple(AMP_DTYPES)} or None, got {self.amp!r}")
        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an int >= 1, got {self.epochs!r}")
        need(isinstance(self.warmup, int) and self.warmup >= 0, f"warmup must be an int >= 0, got {self.warmup!r}")
        # Base methods keep `warmup` only as the origin of the LR milestones (so AT and PART share a schedule).
        need(not self.is_part or self.warmup <= self.epochs,
             f"warmup ({self.warmup}) must not exceed epochs ({self.epochs}) for {self.method}")
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")
        need(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay is None or self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 2, f"batch_size must be an int >= 2, got {self.batch_size!r}")
        need(isinstance(self.steps, int) and self.steps >= 0, f"steps must be an int >= 0, got {self.steps!r}")
        need(0 <= self.eps_low <= self.eps <= 1, f"need 0 <= eps_low <= eps <= 1, got eps_low={self.eps_low}, eps={self.eps}")
        need(self.step_size is None or self.step_size >= 0, f"step_size must be >= 0, got {self.step_size}")
        need(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(all(m >= 1 for m in self.milestones), f"milestones must be epochs >= 1 after warm-up, got {self.milestones}")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(self.eval_examples >= 0, f"eval_examples must be >= 0, got {self.eval_examples}")
        need(not (self.amp == "fp16" and self.device == "cpu"), "amp fp16 needs a GPU; use --amp bf16 on the CPU")
        # TRADES' KL ascent starts 0.001 from x: its input gradients (~1e-10) flush to zero in fp16, so the
        # attack would never move. bf16 has float32's range.
        need(not (self.amp == "fp16" and self.base == "trades"),
             f"amp fp16 would stall the {self.method} attack (its KL gradients underflow in fp16); use --amp bf16")
        need(not (self.sync_bn and not self.device.startswith("cuda")),
             "sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); use plain BatchNorm on the CPU")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**{**d, "milestones": tuple(d.get("milestones", (60, 90)))})

    @property
    def is_part(self) -> bool:
        return self.method.startswith("part")

    @property
    def base(self) -> str:
        return BASE_METHOD[self.method]


# ------------------------------------------------------------------------------------------ helpers
def lr_factor(epoch: int, warmup: int, milestones) -> float:
    """LR multiplier for 0-based global `epoch`: 0.1 per milestone reached, counted after the warm-up."""
    after_warmup = epoch - warmup + 1  # 1-based epoch count after the warm-up (<= 0 during it)
    return 0.1 ** sum(after_warmup >= m for m in milestones)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams per (seed, purpose, epoch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]) >> 1


_PURPOSE_AUGMENT, _PURPOSE_ATTACK = 1, 2


def atomic_write_bytes(path: Path, write) -> None:
    """write(file) into a temporary file next to `path`, fsync, then rename over `path`: a reader (or a
    crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


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
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def all_sum(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


# --------------------------------------------------------------------------------------- the run state
@dataclass
class RunState:
    """Everything a step needs; built once per run."""

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
    history: list = field(default_factory=list)

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
    torch.manual_seed(config.seed)  # model initialisation
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


# --------------------------------------------------------------------------------------------- a step
@dataclass
class StepResult:
    loss: float  # mean over this rank's batch
    correct_adv: int
    correct_nat: int | None
    examples: int
    eps_high: float  # pixels (x channels) given the full eps, over this batch
    seconds: dict


def train_step(state: RunState, x: torch.Tensor, y: torch.Tensor, *, part_phase: bool, attack: PGD,
               attack_gen: torch.Generator | None, augment_gen: torch.Generator | None) -> StepResult:
    """One optimiser step on the batch (x, y): augment -> budget -> attack -> outer loss -> step."""
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
    # Every rank decides together, or the healthy ranks would wait forever in the gradient all-reduce.
    (bad_ranks,) = state.dist.all_sum([0.0 if math.isfinite(loss_value) else 1.0], device)
    if bad_ranks:
        raise TrainingDiverged(f"the {cfg.method} loss became non-finite ({loss_value} on rank {state.dist.rank}) "
                               f"at epoch {state.epoch + 1}")
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.sync()
    t4 = time.perf_counter()

    with torch.no_grad():
        correct_adv = int((logits_adv.argmax(1) == y).sum())
        correct_nat = None if logits_nat is None else int((logits_nat.argmax(1) == y).sum())
        eps_high = 1.0 if eps_map is None else float((eps_map == cfg.eps).float().mean())
    return StepResult(loss_value, correct_adv, correct_nat, int(y.shape[0]), eps_high,
                      {"data": t1 - t0, "budget": t2 - t1, "attack": t3 - t2, "update": t4 - t3})


# -------------------------------------------------------------------------------------- run directory
def _rng_state(state: RunState) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # Data order, augmentation and attack noise of epoch e come from generators seeded by (seed, e, rank).
        "data_order": {"seed": state.config.seed, "next_epoch": state.epoch, "world": state.dist.world},
    }


def _set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        # A machine with fewer GPUs than the one that saved the run restores the devices it has.
        torch.cuda.set_rng_state_all(rng["cuda"][: torch.cuda.device_count()])


def checkpoint_dict(state: RunState) -> dict:
    return {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "epoch": state.epoch,
        "num_classes": state.num_classes,
        "rng": _rng_state(state),
        "config": state.config.to_json(),
        "metrics": state.history,
        "part_fast_version": _version(),
    }


def _version() -> str:
    from . import __version__

    return __version__


def save_checkpoint(state: RunState, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(checkpoint_dict(state), f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # Our own checkpoints hold numpy / python RNG states, which weights_only loading refuses.
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    missing = {"model", "optimizer", "scheduler", "epoch", "rng", "config"} - set(ckpt)
    if missing:
        raise ValueError(f"{path} is not a part_fast checkpoint (missing {sorted(missing)})")
    return ckpt


def load_model(path: str | os.PathLike, device="cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model (eval mode) and its config from a RUN_DIR/last.pt."""
    ckpt = load_checkpoint(path)
    config = TrainConfig.from_json(ckpt["config"])
    num_classes = ckpt.get("num_classes") or _num_classes_of_state(ckpt["model"])
    model = build_model(config, num_classes)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


def _num_classes_of_state(state_dict: dict) -> int:
    weights = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    return int(weights[-1].shape[0])


def _write_metrics(out: Path, history: list) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))


def _trim_steps_log(out: Path, completed_epochs: int) -> None:
    """After a resume, keep only the step lines of completed epochs (and no partial last line)."""
    path = out / "steps.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("epoch", 0) <= completed_epochs:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def prepare_run_dir(config: TrainConfig, resume: bool, is_main: bool) -> dict | None:
    """Create RUN_DIR (or check it for --resume); returns the checkpoint to resume from, if any."""
    out = Path(config.out)
    ckpt_path = out / "last.pt"
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"run directory {out} already exists and is not empty; pass --resume to continue it, "
                                  "or choose another --out")
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", json.dumps(config.to_json(), indent=2) + "\n")
        return None
    if not out.is_dir():
        raise FileNotFoundError(f"--resume: run directory {out} does not exist")
    saved_path = out / "config.json"
    if saved_path.exists():
        _check_same_config(json.loads(saved_path.read_text()), config, saved_path)
    elif is_main:
        atomic_write_text(saved_path, json.dumps(config.to_json(), indent=2) + "\n")
    if not ckpt_path.exists():
        return None  # interrupted before the first epoch ended: start over in the same directory
    ckpt = load_checkpoint(ckpt_path)
    _check_same_config(ckpt["config"], config, ckpt_path)
    return ckpt


def _check_same_config(saved: dict, config: TrainConfig, where: Path) -> None:
    now = config.to_json()
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"--resume with a different configuration than {where} ({detail}); "
                         f"only {', '.join(RESUMABLE_CHANGES)} may change")


# ------------------------------------------------------------------------------------------ the loop
def _progress_enabled(config: TrainConfig, is_main: bool) -> bool:
    if not is_main:
        return False
    return sys.stderr.isatty() if config.progress is None else bool(config.progress)


def _init_distributed(config: TrainConfig) -> tuple[Distributed, torch.device]:
    info = Distributed.from_env()
    device = torch.device(config.device)
    if info.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if config.batch_size % info.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {info.world} processes")
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} requested but CUDA is not available")
        if device.index is not None:
            torch.cuda.set_device(device)  # Triton launches and pinned-memory copies follow the current device
    return info, device


def _loaders(config: TrainConfig, info: Distributed, device: torch.device):
    def build(download):
        return data_mod.build_datasets(config.dataset, config.data_dir, download=download,
                                       train_subset=config.train_subset, test_subset=config.test_subset, seed=config.seed)

    if config.download and info.enabled:
        # Rank 0 downloads alone; the others read what it fetched (one writer per folder).
        error = None
        if info.is_main:
            try:
                build(True)
            except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
                error = err
        (failed,) = info.all_sum([1.0 if error else 0.0], device)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("rank 0 could not download the dataset; see its error")
    train_set, test_set, data_info = build(config.download and not info.enabled)
    local_batch = config.batch_size // info.world
    if len(train_set) < config.batch_size:
        raise ValueError(f"the training set has {len(train_set)} examples, fewer than one batch of {config.batch_size}")
    # One sampler for one process or many: the permutation of epoch e depends only on (seed, e), and rank r
    # takes every world-th index of it, so ranks together see the batches of a single-process run.
    sampler = DistributedSampler(train_set, num_replicas=info.world, rank=info.rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=config.workers,
                              pin_memory=pin, drop_last=True, persistent_workers=config.workers > 0)
    eval_loader = None
    if config.eval_examples:
        n = min(config.eval_examples, len(test_set))
        if n < info.world:
            raise ValueError(f"eval_examples ({n} available) must be at least the number of processes ({info.world})")
        shard = Subset(test_set, range(info.rank, n, info.world))
        eval_loader = DataLoader(shard, batch_size=max(local_batch, 1), num_workers=config.workers, pin_memory=pin)
    return train_loader, sampler, eval_loader, data_info


def _evaluate_epoch(state: RunState, loader, info: Distributed) -> dict:
    cfg = state.config
    res = evaluate(state.attack_model, loader, attacks=("natural", "pgd20"), eps=cfg.eps, alpha=cfg.step_size,
                   device=state.device, seed=cfg.seed, progress=False)
    n = res["examples"]
    nat, pgd, total = info.all_sum([res["natural"] * n / 100, res["pgd20"] * n / 100, n], state.device)
    return {"test_nat_acc": 100 * nat / total, "test_pgd20_acc": 100 * pgd / total, "test_examples": int(total)}


def train(config: TrainConfig, *, resume: bool = False, log=print) -> list[dict]:
    """Train as `config` says, writing RUN_DIR/{config.json, metrics.jsonl, last.pt}; returns the
    per-epoch metrics. With resume=True, continue the run in config.out from its last checkpoint."""
    config = config.resolved()
    info, device = _init_distributed(config)
    try:
        return _train(config, info, device, resume, log)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _prepare_on_all_ranks(config: TrainConfig, info: Distributed, device, resume: bool) -> dict | None:
    """Rank 0 checks and creates RUN_DIR (one process decides, so ranks cannot race on it); the others
    follow its verdict and then read the checkpoint it found."""
    error = None
    ckpt = None
    if info.is_main:
        try:
            ckpt = prepare_run_dir(config, resume, is_main=True)
        except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks, or they wait forever
            error = err
    if info.enabled:
        (failed,) = info.all_sum([1.0 if error else 0.0], device)
        if failed and not info.is_main:
            raise RuntimeError(f"rank 0 could not prepare the run directory {config.out}; see its error")
        if not info.is_main and resume and (Path(config.out) / "last.pt").exists():
            ckpt = load_checkpoint(Path(config.out) / "last.pt")
    if error is not None:
        raise error
    return ckpt


def _sync_buffers(state: RunState) -> None:
    """Give every rank rank 0's BatchNorm running statistics. DDP broadcasts them at each forward, but each
    rank then updates its own copy; the checkpoint holds rank 0's, so without this a resumed rank 1 would
    start from other statistics than the uninterrupted one (and ranks would evaluate different models)."""
    if state.dist.enabled:
        for buffer in state.model.buffers():
            dist.broadcast(buffer, 0)


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def _train(config: TrainConfig, info: Distributed, device, resume: bool, log) -> list[dict]:
    # Data and model first: a missing dataset or an unknown architecture is reported before RUN_DIR exists,
    # so a corrected rerun needs no --resume.
    train_loader, sampler, eval_loader, data_info = _loaders(config, info, device)
    state = build_state(config, data_info.num_classes, device, info)
    ckpt = _prepare_on_all_ranks(config, info, device, resume)
    if not info.is_main:
        log = _silent
    out = Path(config.out)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if ckpt is not None:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            state.scaler.load_state_dict(ckpt["scaler"])
        state.epoch, state.history = int(ckpt["epoch"]), list(ckpt.get("metrics", []))
        saved_world = ckpt["rng"]["data_order"].get("world", 1)
        if saved_world != info.world:
            raise ValueError(f"--resume: the run was trained by {saved_world} processes and would continue with "
                             f"{info.world}; data shards and random streams depend on it, so resume with {saved_world}")
        _set_rng_state(ckpt["rng"])
        if info.is_main:
            _write_metrics(out, state.history)
            _trim_steps_log(out, state.epoch)
        log(f"resumed {out} after epoch {state.epoch}")
    elif resume and info.is_main:
        _trim_steps_log(out, 0)  # interrupted before the first checkpoint: its step lines are redone
    show = _progress_enabled(config, info.is_main)
    steps_log = open(out / "steps.jsonl", "a") if (config.log_steps and info.is_main) else None
    try:
        for epoch in tqdm(range(state.epoch, config.epochs), desc=f"{config.method} epochs", disable=not show,
                          initial=state.epoch, total=config.epochs):
            record = _train_epoch(state, epoch, train_loader, sampler, show, steps_log)
            _sync_buffers(state)
            if not _all_finite(state.model):
                raise TrainingDiverged(f"the weights became non-finite in epoch {epoch + 1}; "
                                       f"the checkpoint of epoch {state.epoch} is kept")
            if eval_loader is not None:
                record.update(_evaluate_epoch(state, eval_loader, info))
            state.epoch = epoch + 1
            state.history.append(record)
            if info.is_main:
                save_checkpoint(state, out / "last.pt")  # first the checkpoint, then the log that cites it
                _write_metrics(out, state.history)
                log(_summary_line(record, config))
    finally:
        if steps_log is not None:
            steps_log.close()
    return state.history


def _silent(*_args) -> None:
    pass


def _train_epoch(state: RunState, epoch: int, loader, sampler, show: bool, steps_log) -> dict:
    cfg, info = state.config, state.dist
    part_phase = cfg.is_part and epoch >= cfg.warmup
    attack = make_attack(state, part_phase)
    sampler.set_epoch(epoch)
    augment_gen = torch.Generator().manual_seed(derived_seed(cfg.seed, _PURPOSE_AUGMENT, epoch, info.rank)) \
        if cfg.augment else None
    attack_gen = torch.Generator(device=state.device).manual_seed(derived_seed(cfg.seed, _PURPOSE_ATTACK, epoch, info.rank))
    lr = state.optimizer.param_groups[0]["lr"]
    sums = {"loss": 0.0, "adv": 0.0, "nat": 0.0, "n": 0.0, "eps_high": 0.0, "steps": 0.0}
    seconds = {"data": 0.0, "budget": 0.0, "attack": 0.0, "update": 0.0}
    start = time.perf_counter()
    batches = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
    for step, (x, y) in enumerate(batches):
        r = train_step(state, x, y, part_phase=part_phase, attack=attack, attack_gen=attack_gen, augment_gen=augment_gen)
        sums["loss"] += r.loss * r.examples
        sums["adv"] += r.correct_adv
        sums["nat"] += r.correct_nat or 0
        sums["n"] += r.examples
        sums["eps_high"] += r.eps_high
        sums["steps"] += 1
        for k, v in r.seconds.items():
            seconds[k] += v
        if cfg.log_steps:  # every rank joins the reduction; rank 0 writes the global-batch loss
            loss_sum, count = info.all_sum([r.loss * r.examples, r.examples], state.device)
            if steps_log is not None:
                steps_log.write(json.dumps({"epoch": epoch + 1, "step": step + 1, "loss": loss_sum / count, "lr": lr}) + "\n")
                steps_log.flush()
        if show:
            batches.set_postfix(loss=f"{r.loss:.3f}")
    state.scheduler.step()
    loss, adv, nat, n, eps_high, steps = info.all_sum(
        [sums["loss"], sums["adv"], sums["nat"], sums["n"], sums["eps_high"], sums["steps"]], state.device)
    elapsed = time.perf_counter() - start
    record = {
        "epoch": epoch + 1,
        "phase": ("part" if part_phase else "warmup") if cfg.is_part else cfg.method,
        "lr": lr,
        "train_loss": loss / n,
        "train_adv_acc": 100 * adv / n,
        "train_nat_acc": 100 * nat / n if cfg.base != "at" else None,
        "train_examples": int(n),
        "eps_high_fraction": eps_high / steps,
        "epoch_seconds": elapsed,
        **{f"{k}_seconds": v for k, v in seconds.items()},
    }
    return record


def _summary_line(r: dict, cfg: TrainConfig) -> str:
    parts = [f"epoch {r['epoch']}/{cfg.epochs} [{r['phase']}]", f"loss {r['train_loss']:.4f}",
             f"train adv {r['train_adv_acc']:.1f}%"]
    if "test_nat_acc" in r:
        parts.append(f"test nat {r['test_nat_acc']:.1f}% pgd20 {r['test_pgd20_acc']:.1f}%")
    parts.append(f"{r['epoch_seconds']:.1f}s (budget {r['budget_seconds']:.1f} attack {r['attack_seconds']:.1f} "
                 f"update {r['update_seconds']:.1f})")
    return " | ".join(parts)
