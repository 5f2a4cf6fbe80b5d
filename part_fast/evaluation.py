"""Robustness evaluation: natural accuracy, PGD-20, MMA, and AutoAttack from the packages that implement it.

"aa" is the original AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square; 100 iterations),
from the `autoattack` package (original code) or its PyPI packaging `pyautoattack` (extra
`part_fast[eval]`). "aa-release" is torchattacks' AutoAttack, which the PART release reported (its APGD
and FAB run fewer iterations); it is labelled as such and never reported as "aa". AutoAttack is never
re-implemented here.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import time
from collections.abc import Iterable

import torch
from torch import nn

from .model_audit import audit_model
from .attacks import MMA, PGD
from .devices import resolve_device
from .errors import ConfigError
from .extras import MissingExtraError, missing, progress_bar, require  # noqa: F401 (MissingExtraError: its old home)
from .modes import eval_mode

ATTACKS = ("natural", "pgd20", "mma", "aa", "aa-release")
AUTOATTACKS = ("aa", "aa-release")
# What every table prints: "aa-release" is never mistaken for the original AutoAttack.
ATTACK_LABELS = {
    "natural": "natural",
    "pgd20": "PGD-20",
    "mma": "MMA (3 targets, 20 steps)",
    "aa": "AutoAttack (original, standard)",
    "aa-release": "aa-release (torchattacks AA as released: 10 iterations, weaker)",
}
# The torchattacks release the project is tested with (.ci/run installs this one; tests/test_packaging.py
# checks the two agree).
TORCHATTACKS_VERSION = "3.5.1"


def _install_zero_gradients_shim() -> None:
    """Old AutoAttack releases import `zero_gradients` from torch.autograd.gradcheck, which current torch
    removed. Put a compatible function on that *module* (sys.modules; `import torch.autograd.gradcheck as m`
    would bind the function torch.autograd.gradcheck instead)."""
    importlib.import_module("torch.autograd.gradcheck")
    module = sys.modules["torch.autograd.gradcheck"]
    if hasattr(module, "zero_gradients"):
        return

    def zero_gradients(x):
        if isinstance(x, torch.Tensor):
            if x.grad is not None:
                x.grad.detach_()
                x.grad.zero_()
        elif isinstance(x, Iterable):
            for elem in x:
                zero_gradients(elem)

    module.zero_gradients = zero_gradients


def load_autoattack():
    """The AutoAttack class of the original code: `autoattack` (GitHub install) or `pyautoattack` (PyPI)."""
    _install_zero_gradients_shim()
    for name in ("autoattack", "pyautoattack"):
        try:
            return importlib.import_module(name).AutoAttack
        except ImportError:
            continue
    raise missing("attack 'aa' (the original AutoAttack)", "pyautoattack", "eval")


def load_torchattacks():
    """The torchattacks package. No extra holds it: its pinned requests would be downgraded, so it is
    installed with --no-deps."""
    return require("torchattacks", "attack 'aa-release'",
                   install=f"pip install --no-deps torchattacks=={TORCHATTACKS_VERSION} (its pinned requests "
                           "would otherwise be downgraded)")


def autoattack_source(aa_cls) -> str:
    """'<distribution> <version>' of the AutoAttack class in use, for the records."""
    from importlib import metadata

    package = aa_cls.__module__.split(".")[0]
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} (version unknown)"


def run_standard_evaluation(adversary, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """x_adv from AutoAttack's run_standard_evaluation, whichever packaging: the original takes `bs=` and
    returns x_adv; pyautoattack takes `batch_size=` and returns (x_adv, y_adv)."""
    params = inspect.signature(adversary.run_standard_evaluation).parameters
    batch_kw = "batch_size" if "batch_size" in params else "bs"
    out = adversary.run_standard_evaluation(x, y, **{batch_kw: batch_size})
    return out[0] if isinstance(out, tuple) else out


def standard_autoattack(model, eps: float, device, seed: int, verbose: bool = False):
    """The original AutoAttack, L-inf, version "standard", seeded (whichever packaging load_autoattack finds)."""
    adversary = load_autoattack()(model, norm="Linf", eps=eps, version="standard", device=device, seed=seed)
    if hasattr(adversary, "verbose"):
        adversary.verbose = verbose
    return adversary


def _autoattack_runner(model, eps, device, seed):
    adversary = standard_autoattack(model, eps, device, seed)
    return lambda x, y: run_standard_evaluation(adversary, x, y, x.shape[0])


def _torchattacks_runner(model, eps, seed):
    ta = load_torchattacks()
    attack = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes_of(model), seed=seed)
    return lambda x, y: attack(x, y)


def num_classes_of(model) -> int:
    """The output width of the model's last Linear layer (10 when it has none)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 10


def make_attack(name: str, model: nn.Module, eps: float, alpha: float, device, seed: int = 0):
    """A callable (x, y) -> adversarial x for one attack name."""
    if name == "natural":
        return lambda x, y: x
    if name == "pgd20":
        pgd = PGD(model, eps=eps, alpha=alpha, steps=20, start="uniform")
        return lambda x, y: pgd(x, y)
    if name == "mma":
        mma = MMA(model, eps=eps, alpha=alpha, steps=20, k=3)
        return lambda x, y: mma(x, y)
    if name == "aa":
        return _autoattack_runner(model, eps, str(device), seed)
    if name == "aa-release":
        return _torchattacks_runner(model, eps, seed)
    raise ConfigError(f"unknown attack {name!r}; choose from {ATTACKS}")


def evaluate(model: nn.Module, loader, attacks=("natural", "pgd20", "mma", "aa"), eps: float = 8 / 255,
             alpha: float = 2 / 255, device=None, seed: int = 0, progress: bool = True, on_audit=None) -> dict:
    """Accuracy (%) of `model` on `loader` under each attack, every attack on the same examples.

    The model is evaluated in eval mode and its mode restored. When an AutoAttack runs ("aa" or
    "aa-release"), `model_audit.audit_model` audits the model on the first batch before any attack (a failed
    rule is reported and the attacks still run, as AutoAttack itself does).

    Args:
        model: the classifier; inputs in [0, 1].
        loader: an iterable of (x, y) batches.
        attacks: names from ATTACKS: "natural", "pgd20", "mma", "aa" (AutoAttack, standard version),
            "aa-release" (torchattacks' AutoAttack, as the release evaluated).
        eps, alpha: the L-inf budget and the PGD / MMA step.
        device: "auto", "cpu", "cuda", "cuda:N" or a torch.device (None: the model's).
        seed: the attacks' random starts.
        progress: a progress bar.
        on_audit: called with the audit's verdicts as soon as they exist.

    Returns:
        {attack: accuracy in %} for each attack, plus "seconds" ({attack: seconds}), "examples" (the count)
        and, with an AutoAttack, "autoattack_checks" (the audit's verdicts as dicts).
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attacks {unknown}; choose from {ATTACKS}")
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    runners = {name: make_attack(name, model, eps, alpha, device, seed) for name in attacks}
    correct = dict.fromkeys(attacks, 0)
    seconds = dict.fromkeys(attacks, 0.0)
    total = 0
    verdicts = None
    # The attacks' random starts come from a fixed seed; the caller's CPU and CUDA generators are untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with eval_mode(model):
            for x, y in progress_bar(loader, desc="evaluate", disable=not progress, leave=False):
                x, y = x.to(device), y.to(device)
                if verdicts is None and any(a in AUTOATTACKS for a in attacks):
                    verdicts = audit_model(model, x, y)
                    if on_audit is not None:
                        on_audit(verdicts)
                total += y.shape[0]
                for name, run in runners.items():
                    start = time.perf_counter()
                    x_adv = run(x, y)
                    with torch.no_grad():
                        correct[name] += int((model(x_adv).argmax(1) == y).sum())
                    seconds[name] += time.perf_counter() - start
    if total == 0:
        raise ValueError("the loader yielded no examples")
    result = {name: 100.0 * correct[name] / total for name in attacks}
    result["seconds"] = seconds
    result["examples"] = total
    if verdicts is not None:
        result["autoattack_checks"] = [v.to_json() for v in verdicts]
    return result
