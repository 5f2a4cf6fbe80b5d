"""RobustBench's evaluation protocol for L-inf models, step for step, and its leaderboard record.

RobustBench's `benchmark()` (robustbench 1.1) does, for CIFAR-10 / CIFAR-100 under L-inf:
1. the test set from torchvision's files (train=False, ToTensor only: inputs in [0, 1], any normalisation
   is the model's), its first `n_examples` images in file order;
2. clean accuracy in batches of `batch_size` (argmax of the logits);
3. the original AutoAttack, version "standard", over the same tensor with `bs=batch_size` (AutoAttack
   reseeds each attack on every batch, so the batch size is part of the protocol);
4. the accuracy on AutoAttack's output in batches of `batch_size`;
5. `update_json`: a `model_info` record whose `clean_acc` / `autoattack_acc` are percentages rounded to two
   decimals, written as strings, and `eps` as given.

Here the same steps run, with two differences that make a number reproducible and trustworthy, and are
recorded: the model is put in eval mode (RobustBench only warns when it is not), and AutoAttack gets a
fixed seed (RobustBench passes none, so AutoAttack seeds itself from the clock and two runs can differ by
a few examples). The model checks AutoAttack warns about (`model_audit`) run first and are reported.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from .model_audit import audit_model
from .errors import ConfigError
from .evaluation import autoattack_source, run_standard_evaluation, standard_autoattack
from .extras import require
from .modes import eval_mode

DATASETS = {"cifar10": 10, "cifar100": 100}  # RobustBench's L-inf datasets part_fast can train for
N_EXAMPLES = 10_000  # benchmark()'s default: the whole CIFAR test set
BATCH_SIZE = 500  # `python -m robustbench.eval`'s default (benchmark() called from Python defaults to 32)
THREAT_MODEL = "Linf"
# The leaderboard's name for each bundled architecture.
ARCHITECTURE_NAMES = {"resnet18": "ResNet-18", "preact-resnet18": "PreActResNet-18", "wrn34-10": "WideResNet-34-10",
                      "resnet-small": "ResNet (small)", "cnn-small": "CNN (small)"}
# robustbench.utils.ModelInfo's fields, in its order: the leaderboard's model_info JSON.
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                     "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d",
                     "corruptions_mce", "corruptions_mce_3d", "autoattack_acc", "footnote")


def _files_hint(dataset: str, root: Path) -> str:
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[dataset]
    return (f"expected torchvision's {dataset} files (python version) in {root / folder}; RobustBench's example "
            "order is that file's order, so an ImageFolder copy cannot stand in for it")


def load_test_set(dataset: str, data_dir, n_examples: int = N_EXAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 (n, 3, 32, 32) in [0, 1], y int64 (n,)): the first `n_examples` test images in the order of
    torchvision's files, bit-identical to RobustBench's `load_clean_dataset` (ToTensor = uint8 / 255)."""
    # torchvision's classes are looked up at call time, so tests can substitute them
    tvd = require("torchvision.datasets", "the RobustBench protocol's test set")
    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r}: the RobustBench protocol covers {', '.join(DATASETS)}")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ConfigError(f"n_examples must be a positive int, got {n_examples!r}")
    if data_dir is None:
        raise ConfigError(f"the RobustBench protocol needs the {dataset} test files: pass --data-dir")
    root = Path(data_dir)
    cls = tvd.CIFAR10 if dataset == "cifar10" else tvd.CIFAR100
    try:
        test = cls(str(root), train=False, download=False)
    except (RuntimeError, OSError) as error:  # torchvision's "not found or corrupted", or a missing file
        raise FileNotFoundError(f"{dataset} test files not found (or corrupted): {_files_hint(dataset, root)}") \
            from error
    if n_examples > len(test.data):
        raise ConfigError(f"n_examples={n_examples}: the {dataset} test set has {len(test.data)} images")
    images = torch.from_numpy(test.data[:n_examples].copy()).permute(0, 3, 1, 2).contiguous()
    return images.to(torch.float32).div(255), torch.as_tensor(test.targets[:n_examples], dtype=torch.int64)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> int:
    """Correct predictions, counted in RobustBench's batches (its `clean_accuracy`)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out = model(x[start:start + batch_size].to(device))
            correct += int((out.max(1)[1] == y[start:start + batch_size].to(device)).sum())
    return correct


@dataclasses.dataclass
class ProtocolResult:
    dataset: str
    eps: float
    n_examples: int
    batch_size: int
    seed: int
    clean_correct: int
    autoattack_correct: int
    checks: list  # model_audit.Verdict, in model_audit.AUDITED order
    autoattack: str  # the package that ran it, with its version
    seconds: dict

    @property
    def clean_acc(self) -> float:
        """A fraction, as benchmark() returns it."""
        return self.clean_correct / self.n_examples

    @property
    def autoattack_acc(self) -> float:
        return self.autoattack_correct / self.n_examples

    @property
    def checks_passed(self) -> bool:
        return all(v.passed for v in self.checks)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["checks"] = [v.to_json() for v in self.checks]
        out.update(clean_acc=self.clean_acc, autoattack_acc=self.autoattack_acc, checks_passed=self.checks_passed,
                   threat_model=THREAT_MODEL, version="standard")
        return out


def evaluate_robustbench(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, dataset: str = "cifar10",
                         eps: float = 8 / 255, batch_size: int = BATCH_SIZE, device=None, seed: int = 0,
                         verbose: bool = True, on_audit=None) -> ProtocolResult:
    """RobustBench's benchmark() steps 2-4 on (x, y) (from `load_test_set`), with the model in eval mode and
    AutoAttack seeded with `seed`. device: where the model runs (None: where its parameters are; else the
    model is moved there, as benchmark() does). `verbose` lets AutoAttack print its per-attack progress;
    `on_audit`, if given, is called with the verdicts of `model_audit.audit_model` (first batch) before
    AutoAttack starts."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ConfigError(f"x must be (N, C, H, W) and y (N,); got {tuple(x.shape)} and {tuple(y.shape)}")
    if device is None:
        device = next(model.parameters()).device
    else:
        device = torch.device(device)
        model.to(device)
    seconds = {}
    with eval_mode(model):
        checks = audit_model(model, x[:batch_size].to(device), y[:batch_size].to(device))
        if on_audit is not None:
            on_audit(checks)
        start = time.perf_counter()
        clean = _accuracy(model, x, y, batch_size, device)
        seconds["clean"] = time.perf_counter() - start
        adversary = standard_autoattack(model, eps, device, seed, verbose=verbose)
        start = time.perf_counter()
        x_adv = run_standard_evaluation(adversary, x, y, batch_size)
        robust = _accuracy(model, x_adv, y, batch_size, device)
        seconds["autoattack"] = time.perf_counter() - start
    return ProtocolResult(dataset=dataset, eps=eps, n_examples=int(x.shape[0]), batch_size=batch_size, seed=seed,
                          clean_correct=clean, autoattack_correct=robust, checks=checks,
                          autoattack=autoattack_source(type(adversary)), seconds=seconds)


def _percent(fraction: float) -> str:
    return str(round(fraction * 100, 2))  # robustbench.utils.update_json's rounding and type


def model_info(result: ProtocolResult, *, name: str, arch: str, footnote: str | None = None) -> dict:
    """The leaderboard's model_info record (robustbench.utils.ModelInfo's fields, in order): the fields
    benchmark() writes hold the same values, the ones it leaves empty are filled where part_fast knows them
    (link, authors, venue and `reported` stay for the authors to fill)."""
    info = dict.fromkeys(MODEL_INFO_FIELDS)
    info.update(name=name, additional_data=False, number_forward_passes=1, dataset=result.dataset,
                architecture=ARCHITECTURE_NAMES.get(arch, arch), eps=result.eps,
                clean_acc=_percent(result.clean_acc), autoattack_acc=_percent(result.autoattack_acc),
                footnote=footnote)
    return info
