"""What a run is: `TrainConfig`, one field per setting, each with its default and its help text (the
command line is built from these fields), and the released recipe per dataset."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .. import data as data_mod
from ..budget import MASKS
from ..cam import CAM_METHODS
from ..devices import AUTO, parse_device
from ..eps_text import validate_budget, validate_budgets
from ..errors import ConfigError
from ..models import BUNDLED, validate_arch
from .methods import METHOD, METHODS, Method

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The starts an AT-based run may choose for its PART epochs (TrainConfig.start; see methods.py).
AT_PART_STARTS = ("uniform", "release")
# The LR after its warm-up (step.lr_factor): the release's steps, or a cosine down to 0.
LR_SCHEDULES = ("step", "cosine")

# The released recipe per dataset (docs/method.md §2): values a flag left unset takes.
DATASET_DEFAULTS = {
    "cifar10": {"lr": 0.01, "weight_decay": 2e-4, "step_size": 2 / 255},
    "svhn": {"lr": 0.01, "weight_decay": 0.0035, "step_size": 1 / 255},
}
_OTHER_DEFAULTS = DATASET_DEFAULTS["cifar10"]  # TinyImageNet, ImageFolder, shapes: the CIFAR-10 recipe

# Settings a resumed run may change: where the run lives, how long it goes on, where and how fast it runs,
# what it logs and how often it saves. None changes what is trained; a resume on the same device is
# bit-exact, one on another device computes with that device's kernels and random streams.
RESUMABLE_CHANGES = ("out", "epochs", "device", "workers", "progress", "eval_examples", "download", "data_dir",
                     "log_steps", "time_stages", "tensorboard", "save_every_steps", "save_every_minutes",
                     "allow_world_change", "collective_timeout")

# An unset warm-up is this share of the epochs, rounded down: the release's 20 of 80, and a short run
# (--epochs 1 .. 3) gets none instead of failing on a warm-up longer than itself.
WARMUP_SHARE = 4


def setting(default, help: str, *, kind: str, choices=None, flag: str | None = None, shown: str | None = None):
    """A TrainConfig field with what the command line needs to offer it: `kind` says how a flag's text
    becomes the value (int, float, fraction, str, int_list; switch = store_true; negated = a --no-... flag;
    tristate = --x / --no-x), `shown` how --help writes the default when repr would not do."""
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices, "flag": flag,
                                            "shown": shown})


@dataclass
class TrainConfig:
    """Every setting of a training run, with its default and help: the `part-fast train` flags are generated
    from these fields, and RUN_DIR/config.json holds them (`to_json` / `from_json`).

    Defaults are the released recipe (ResNet-18, PART, 80 epochs, SGD 0.01 with the dataset's weight decay,
    PGD-10 at 8/255 with eps_low 7/255, the jet mask); None means "the dataset's default" (`resolved()`
    fills them in) or "off". `validate()` refuses, in one line naming the field, values out of range and
    combinations that cannot run. Only `out` is required.
    """

    out: str = field(metadata={"help": "run directory", "kind": "str"})  # required
    dataset: str = setting("cifar10", "training data", kind="str", choices=data_mod.DATASETS)
    data_dir: str | None = setting(None, "dataset folder (not needed for shapes)", kind="str", shown="none")
    download: bool = setting(False, "download CIFAR-10 / SVHN into --data-dir if missing", kind="switch")
    arch: str = setting("resnet18", f"{' | '.join(BUNDLED)} | a torchvision classification model name "
                        "(e.g. resnet50)", kind="str")
    method: str = setting("part", "training method", kind="str", choices=METHODS)
    epochs: int = setting(80, "epochs in all, warm-up included", kind="int")
    # None: a quarter of the epochs, fixed when the run starts (config.json holds the number, so a resume
    # with more --epochs keeps the warm-up it trained with).
    warmup: int | None = setting(None, "epochs of the base method before PART (PART methods; for the others the "
                                 "origin of --milestones); at most --epochs", kind="int",
                                 shown="a quarter of --epochs, rounded down: 20 of 80, 0 below 4")
    lr: float | None = setting(None, "learning rate", kind="float", shown="the dataset's released value: 0.01")
    momentum: float = setting(0.9, "SGD momentum", kind="float")
    weight_decay: float | None = setting(None, "weight decay", kind="float", shown="2e-4; SVHN 0.0035")
    # The LR is multiplied by 0.1 at each milestone, counted in epochs after the warm-up (1-based), as the
    # release counts PART epochs; the same schedule applies to the base methods, so AT and PART differ
    # only in the budget.
    milestones: tuple[int, ...] = setting((60, 90), "epochs after the warm-up where the LR drops 10x",
                                          kind="int_list", shown="60,90")
    lr_schedule: str = setting("step", "the LR after its warm-up: step (10x lower at each of --milestones, as "
                               "released) or cosine (from --lr down to 0 at the end of --epochs; a resume with more --epochs "
                               "stretches what remains of it)", kind="str",
                               choices=LR_SCHEDULES)
    # Not the PART warm-up (--warmup): an LR that starts small while the first epochs' gradients are large.
    lr_warmup: int = setting(0, "epochs over which the LR rises linearly to --lr (epoch e of N trains at "
                             "lr*(e+1)/N)", kind="int")
    nesterov: bool = setting(False, "Nesterov momentum (needs --momentum > 0)", kind="switch")
    label_smoothing: float = setting(0.0, "label smoothing of the outer loss's cross-entropy (AT, TRADES and their "
                                     "PART versions; the attack's loss keeps hard labels)", kind="float")
    # Gowal et al.'s 0.995; the average is what the per-epoch evaluation, best.pt's selection, `part-fast eval`
    # and `show-cam` use (averaging.py).
    ema_decay: float = setting(0.0, "decay of an exponential moving average of the weights and BatchNorm statistics, "
                               "updated every step (0: off; 0.995 is Gowal et al.'s); the average is what is "
                               "evaluated and what eval / show-cam load", kind="float")
    # Wu et al.'s gamma 5e-3 (awp.py); the released AWP-TRADES waits 10 epochs before it perturbs.
    awp_gamma: float = setting(0.0, "adversarial weight perturbation: each step's update is computed at weights "
                               "moved uphill on the batch's adversarial loss by this fraction of each layer's norm "
                               "(0: off; 5e-3 is Wu et al.'s); one more forward / backward per step", kind="float")
    awp_warmup: int = setting(0, "epochs trained without the weight perturbation first", kind="int")
    # DM-AT's --aux-data-filename / --unsup-fraction (0.7 there): part_fast/data/extra.py has the format.
    extra_data: str | None = setting(None, "an .npz of extra (e.g. generated) training images mixed into every batch: "
                                     "uint8 'images' (N, H, W, 3) and integer 'labels' (N,), written by np.savez "
                                     "(memory-mapped, never loaded whole)", kind="str", shown="none")
    extra_fraction: float = setting(0.7, "the share of every batch drawn from --extra-data", kind="float")
    batch_size: int = setting(128, "global batch, split evenly across processes", kind="int")
    eps: float = setting(8 / 255, "L-inf budget of the important pixels (and of AT)", kind="fraction")
    eps_low: float = setting(7 / 255, "L-inf budget of the other pixels", kind="fraction")
    steps: int = setting(10, "attack steps", kind="int")
    step_size: float | None = setting(None, "attack step size", kind="fraction", shown="2/255; SVHN 1/255")
    beta: float = setting(6.0, "TRADES / MART beta", kind="float")
    cam: str = setting("gradcam", "CAM method", kind="str", choices=CAM_METHODS)
    mask: str = setting("jet", "budget mask: jet (as released) or cam (channel-shared)", kind="str", choices=MASKS)
    # The AT/MART-CE attack's start: "uniform" draws inside the per-pixel box (and [0, 1]); "release" is the
    # released PART-PGD start (global eps, unclipped). TRADES and MART always start at x + 0.001 N(0, 1).
    start: str = setting("uniform", "AT attack start: inside the per-pixel box (uniform) or the release's "
                         "global-eps start", kind="str", choices=AT_PART_STARTS)
    augment: bool = setting(True, "switch off the random crop / flip", kind="negated", flag="--no-augment",
                            shown="augmentation on")
    seed: int = setting(0, "seed of everything random: init, data order, augmentation, attack noise", kind="int")
    train_subset: int | None = setting(None, "train on the first N examples", kind="int", shown="all")
    test_subset: int | None = setting(None, "test on the first N examples", kind="int", shown="all")
    # "auto" stays "auto" in config.json: a run resumed on another machine picks that machine's device.
    device: str = setting(AUTO, "auto (cuda when there is a GPU, else cpu) | cpu | cuda | cuda:N (under torchrun: "
                          "cuda is one GPU per process)", kind="str")
    workers: int = setting(0, "data-loader worker processes", kind="int")
    amp: str | None = setting(None, "autocast the model (the budget and x_adv stay float32)", kind="str",
                              choices=tuple(AMP_DTYPES), shown="off")
    channels_last: bool = setting(False, "channels-last memory format", kind="switch")
    compile: bool = setting(False, "torch.compile the model", kind="switch")
    sync_bn: bool = setting(False, "SyncBatchNorm across processes (CUDA)", kind="switch")
    # Bag of Tricks / Rice et al.: select the checkpoint on held-out training images, never on the test set.
    val_examples: int = setting(0, "hold out N training examples (the same N for a seed) as a validation set: "
                                "natural / PGD-20 accuracy on them every epoch, and RUN_DIR/best.pt is the checkpoint of "
                                "the epoch with the best PGD-20 accuracy on them (0: none)", kind="int")
    eval_examples: int = setting(1000, "test examples for the per-epoch natural / PGD-20 accuracy (0: none)",
                                 kind="int")
    log_steps: bool = setting(False, "also write RUN_DIR/steps.jsonl, one line per optimiser step (reads the "
                              "loss every step: one device synchronisation per step)", kind="switch")
    time_stages: bool = setting(False, "time the budget, attack and update stages of every step into the "
                                "metrics (synchronises the device four times per step)", kind="switch")
    tensorboard: bool = setting(False, "also write the per-epoch metrics as TensorBoard scalars into "
                                "RUN_DIR/tensorboard/ (needs pip install \"part_fast[tensorboard]\")", kind="switch")
    progress: bool | None = setting(None, "progress bars", kind="tristate", shown="on a terminal only")
    save_every_steps: int = setting(0, "also checkpoint every N optimiser steps (0: off)", kind="int")
    save_every_minutes: float = setting(10.0, "also checkpoint when this many minutes passed since the last "
                                        "checkpoint (0: off); bounds what a SIGKILL loses", kind="float")
    collective_timeout: float | None = setting(
        None, "minutes a process waits for the others in a collective, and for them to start, before it fails: "
        "bounds the wait when a node is lost without closing its connections (power, network)", kind="float",
        shown="torch's: 10 with NCCL, 30 with gloo")
    # A resume with another process count (a node fewer after a failure) keeps the data order (each global
    # batch holds the same examples) but not the per-rank random streams and BatchNorm statistics.
    allow_world_change: bool = setting(False, "resume with another number of processes than the checkpoint's "
                                       "(the run is then no longer bit-equal to an uninterrupted one)", kind="switch")

    def resolved(self) -> "TrainConfig":
        """A copy with the dataset's released defaults and the warm-up filled in, validated."""
        defaults = DATASET_DEFAULTS.get(self.dataset, _OTHER_DEFAULTS)
        warmup = self.warmup
        if warmup is None and isinstance(self.epochs, int):
            warmup = self.epochs // WARMUP_SHARE
        config = dataclasses.replace(
            self,
            warmup=warmup,
            lr=defaults["lr"] if self.lr is None else float(self.lr),
            weight_decay=defaults["weight_decay"] if self.weight_decay is None else float(self.weight_decay),
            step_size=defaults["step_size"] if self.step_size is None else float(self.step_size),
            milestones=tuple(int(m) for m in self.milestones),
            save_every_minutes=float(self.save_every_minutes),
        )
        config.validate()
        return config

    def validate_names(self) -> None:
        """The named settings (method, dataset, arch, cam, mask, start, amp, device), checked before any
        number: a misspelt name is the error a user sees, not a range error it would have caused."""
        need(isinstance(self.out, str) and self.out != "", f"out must name the run directory, got {self.out!r}")
        need(self.method in METHOD, f"method must be one of {tuple(METHOD)}, got {self.method!r}")
        need(self.dataset in data_mod.DATASETS, f"dataset must be one of {data_mod.DATASETS}, got {self.dataset!r}")
        validate_arch(self.arch)
        need(self.cam in CAM_METHODS, f"cam must be one of {CAM_METHODS}, got {self.cam!r}")
        need(self.mask in MASKS, f"mask must be one of {MASKS}, got {self.mask!r}")
        need(self.start in AT_PART_STARTS, f"start must be one of {AT_PART_STARTS}, got {self.start!r}")
        need(self.amp in (None, *AMP_DTYPES), f"amp must be one of {tuple(AMP_DTYPES)} or None, got {self.amp!r}")
        parse_device(self.device)

    def validate(self) -> None:
        self.validate_names()
        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an int >= 1, got {self.epochs!r}")
        need(isinstance(self.warmup, int) and self.warmup >= 0, f"warmup must be an int >= 0, got {self.warmup!r}")
        # Base methods keep `warmup` only as the origin of the LR milestones (so AT and PART share a schedule).
        need(not self.is_part or self.warmup <= self.epochs,
             f"warmup ({self.warmup}) must not exceed epochs ({self.epochs}) for {self.method}: the warm-up epochs "
             f"are part of the epochs; lower warmup, or leave it unset for a quarter of the epochs "
             f"({self.epochs // WARMUP_SHARE} here)")
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")
        need(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay is None or self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 2, f"batch_size must be an int >= 2, got {self.batch_size!r}")
        need(isinstance(self.steps, int) and self.steps >= 0, f"steps must be an int >= 0, got {self.steps!r}")
        validate_budgets(self.eps, self.eps_low)
        if self.step_size is not None:
            validate_budget("step_size", self.step_size)
        need(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(all(m >= 1 for m in self.milestones), f"milestones must be epochs >= 1 after warm-up, got {self.milestones}")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(isinstance(self.lr_warmup, int) and 0 <= self.lr_warmup <= self.epochs,
             f"lr_warmup must be an int of epochs >= 0 and at most epochs ({self.epochs}), got {self.lr_warmup!r}")
        need(not self.nesterov or self.momentum > 0, "nesterov needs momentum > 0 (torch's SGD has no Nesterov step "
             "without it)")
        need(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        # MART's outer loss weighs its terms by the model's probability of the true class: a smoothed target
        # has no place in it.
        need(self.label_smoothing == 0 or self.base != "mart",
             f"label_smoothing applies to AT and TRADES (and their PART versions), not {self.method}")
        need(self.ema_decay == 0 or 0 < self.ema_decay < 1, f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        need(self.awp_gamma >= 0, f"awp_gamma must be >= 0 (0: off), got {self.awp_gamma}")
        need(isinstance(self.awp_warmup, int) and 0 <= self.awp_warmup <= self.epochs,
             f"awp_warmup must be an int of epochs >= 0 and at most epochs ({self.epochs}), got {self.awp_warmup!r}")
        need(0 < self.extra_fraction < 1, f"extra_fraction must be in (0, 1), got {self.extra_fraction}")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(isinstance(self.val_examples, int) and self.val_examples >= 0,
             f"val_examples must be an int >= 0, got {self.val_examples!r}")
        need(self.eval_examples >= 0, f"eval_examples must be >= 0, got {self.eval_examples}")
        need(isinstance(self.save_every_steps, int) and self.save_every_steps >= 0,
             f"save_every_steps must be an int >= 0, got {self.save_every_steps!r}")
        need(self.collective_timeout is None or self.collective_timeout > 0,
             f"collective_timeout must be > 0 minutes, got {self.collective_timeout}")
        need(self.save_every_minutes >= 0, f"save_every_minutes must be >= 0, got {self.save_every_minutes}")
        # TRADES' KL ascent starts 0.001 from x: its input gradients (~1e-10) flush to zero in fp16, so the
        # attack would never move. bf16 has float32's range.
        need(not (self.amp == "fp16" and self.base == "trades"),
             f"amp fp16 would stall the {self.method} attack (its KL gradients underflow in fp16); use --amp bf16")
        # "auto" is checked by the trainer once the device is known (validate_device).
        device = parse_device(self.device)
        if device is not None:
            self.validate_device(device.type)

    def validate_device(self, kind: str) -> None:
        """The settings that need a kind of device, against the one the run uses ('cpu', 'cuda', ...)."""
        need(not (self.amp == "fp16" and kind == "cpu"), "amp fp16 needs a GPU; use --amp bf16 on the CPU")
        need(not (self.sync_bn and kind != "cuda"),
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
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**{**d, "milestones": tuple(d.get("milestones", (60, 90)))})

    @property
    def training_method(self) -> Method:
        return METHOD[self.method]

    @property
    def is_part(self) -> bool:
        return METHOD[self.method].pixel_budget

    @property
    def base(self) -> str:
        return METHOD[self.method].base


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flag_of(name: str) -> str:
    """The command-line flag of TrainConfig field `name` (e.g. eps_low -> --eps-low, augment -> --no-augment)."""
    f = next((f for f in dataclasses.fields(TrainConfig) if f.name == name), None)
    return (f is not None and f.metadata.get("flag")) or "--" + name.replace("_", "-")


def shown_default(f: dataclasses.Field) -> str:
    """How --help and the docstring write field f's default: its `shown` text, a fraction as k/255, a switch
    as on / off."""
    shown = f.metadata.get("shown")
    if shown is not None:
        return shown
    value = f.default
    if f.metadata["kind"] == "fraction":
        k = value * 255
        return f"{round(k):g}/255" if abs(k - round(k)) < 1e-9 else f"{value:g}"
    if f.metadata["kind"] == "negated":
        return "on"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _args_section() -> str:
    """TrainConfig's "Args:" docstring section, written from the fields' metadata, the same that `part-fast
    train --help` shows: the two cannot tell different stories."""
    lines = ["    Args:"]
    for f in dataclasses.fields(TrainConfig):
        choices = f"one of {', '.join(f.metadata['choices'])}; " if f.metadata.get("choices") else ""
        default = "required" if f.default is dataclasses.MISSING else f"default {shown_default(f)}"
        lines.append(f"        {f.name}: {f.metadata['help']} ({choices}{default}; flag {flag_of(f.name)}).")
    return "\n".join(lines)


TrainConfig.__doc__ = f"{TrainConfig.__doc__.rstrip()}\n\n{_args_section()}\n    "
