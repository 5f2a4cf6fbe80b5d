"""The model audit: the rules AutoAttack itself warns about (its "checks"), verified before any AutoAttack
evaluation and reported as verdicts.

AutoAttack's guarantees hold for a deterministic classifier that returns logits and whose input gradients
exist. When a model breaks one of these rules AutoAttack only logs a warning, and the number it prints can
still look like robustness. So every rule here gets a verdict with the figure it measured, one line in
the eval output and one entry in its JSON:

- logits: the outputs are not a probability distribution (AutoAttack's own test: every output in
  (-1e-5, 1 + 1e-5) and every row summing to 1 within 1e-5 means softmax outputs, whose saturated gradients
  hide adversarial examples);
- deterministic: two forward passes on the same batch give the same predictions and outputs within
  AutoAttack's tolerance (L2 distance of the L2-normalised outputs <= 1e-4); a randomised defence needs
  AutoAttack's "rand" version, not "standard";
- eval mode (RobustBench's warning rather than AutoAttack's): no module is in training mode during the
  evaluation, and no BatchNorm normalises with batch statistics (track_running_stats=False does so even in
  eval mode, so a prediction depends on the batch);
- input gradients: the gradient of AutoAttack's DLR loss with respect to the input is finite and non-zero
  for every correctly classified example, the ones AutoAttack attacks (AutoAttack checks that loss; a zero gradient, as from rounding or a detached input,
  defeats the gradient-based attacks). The cross-entropy's is reported beside it: where it is saturated,
  APGD-CE has no signal, but the DLR-based APGD-T still has.

The checks see the model in eval mode (as the attacks do) and restore its modes afterwards.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modes import eval_mode

# AutoAttack's tolerances (its checks.py): outputs count as probabilities within PROBABILITY_TOL, and two
# passes agree when the normalised outputs are within DETERMINISM_TOL.
PROBABILITY_TOL = 1e-5
DETERMINISM_TOL = 1e-4
# What the audit verifies, in report order (the names are AutoAttack's: its output and JSON say "check").
AUDITED = ("logits", "deterministic", "eval mode", "input gradients")


@dataclass(frozen=True)
class Verdict:
    check: str
    passed: bool
    detail: str  # what was measured, in words a reader can act on

    def line(self) -> str:
        return f"AutoAttack check {self.check}: {'pass' if self.passed else 'FAIL'} ({self.detail})"

    def to_json(self) -> dict:
        return asdict(self)


def _audit_logits(out: torch.Tensor) -> Verdict:
    # AutoAttack's tolerance is for float32 outputs; a bf16 / fp16 softmax row is only within a few of its
    # own rounding units of 1, so the tolerance widens to two of them there.
    tol = PROBABILITY_TOL if out.dtype in (torch.float32, torch.float64) else \
        max(PROBABILITY_TOL, 2 * torch.finfo(out.dtype).eps)
    out = out.flatten(1).double()
    row_sums = out.sum(-1)
    lo, hi = float(out.min()), float(out.max())
    worst_sum = float((row_sums - 1).abs().max())
    probabilities = hi < 1 + tol and lo > -tol and worst_sum < tol
    if probabilities:
        return Verdict("logits", False, f"the outputs look like probabilities: all in [{lo:.3g}, {hi:.3g}] and "
                                        f"every row sums to 1 within {worst_sum:.1e}; return the logits, not "
                                        "softmax")
    return Verdict("logits", True, f"outputs in [{lo:.3g}, {hi:.3g}], row sums up to {worst_sum:.3g} away from 1")


def _normalised(out: torch.Tensor) -> torch.Tensor:
    out = out.flatten(1).double()
    return out / (out.norm(dim=1, keepdim=True) + 1e-10)


def _audit_deterministic(model: nn.Module, x: torch.Tensor, first: torch.Tensor) -> Verdict:
    with torch.no_grad():
        second = model(x)
    changed = int((first.argmax(1) != second.argmax(1)).sum())
    distance = float((_normalised(first) - _normalised(second)).norm(dim=1).max())
    passed = changed == 0 and distance <= DETERMINISM_TOL
    detail = (f"two passes: {changed} of {x.shape[0]} predictions differ, normalised outputs up to "
              f"{distance:.2e} apart (tolerance {DETERMINISM_TOL:g})")
    if not passed:
        detail += "; a randomised model needs AutoAttack's version='rand'"
    return Verdict("deterministic", passed, detail)


def _audit_eval_mode(model: nn.Module) -> Verdict:
    training = [name or "(the model)" for name, m in model.named_modules() if m.training]
    batch_stats = [name for name, m in model.named_modules()
                   if isinstance(m, _BatchNorm) and m.running_mean is None]
    problems = []
    if training:
        problems.append(f"{len(training)} module(s) stay in training mode after model.eval(): "
                        + ", ".join(training[:5]) + (" ..." if len(training) > 5 else ""))
    if batch_stats:
        problems.append(f"{len(batch_stats)} BatchNorm(s) without running statistics normalise with the "
                        "batch's statistics even in eval mode: " + ", ".join(batch_stats[:5])
                        + (" ..." if len(batch_stats) > 5 else ""))
    if problems:
        return Verdict("eval mode", False, "; ".join(problems))
    count = sum(1 for _ in model.modules())
    return Verdict("eval mode", True, f"all {count} modules in eval mode, no BatchNorm uses batch statistics")


def _dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AutoAttack's difference-of-logits-ratio loss (APGD-DLR / APGD-T), summed over the batch: scale
    invariant, so it keeps a gradient where the cross-entropy has saturated."""
    z, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None])[:, 0]
    top_is_y = (logits.argmax(1) == y).float()
    other = z[:, -2] * top_is_y + z[:, -1] * (1 - top_is_y)  # the best logit that is not y's
    return (-(z_y - other) / (z[:, -1] - z[:, -3] + 1e-12)).sum()


def _zero_and_non_finite(loss: torch.Tensor, x: torch.Tensor, attacked: torch.Tensor):
    """(attacked examples whose input gradient is all zero, attacked examples with a non-finite one), or None
    when the loss has no gradient with respect to x."""
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True, retain_graph=True)
    if grad is None:
        return None
    flat = grad.flatten(1)[attacked]
    return int((flat.abs().sum(1) == 0).sum()), int((~torch.isfinite(flat)).any(1).sum())


_NO_INPUT_GRADIENT = Verdict("input gradients", False, "the loss does not depend on the input through autograd "
                                                       "(is the input detached or the forward under no_grad?)")


def _audit_input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Verdict:
    """The gradient AutoAttack checks (its check_zero_gradients looks at the DLR loss) must be finite and
    non-zero for every example AutoAttack attacks, i.e. every correctly classified one (on a misclassified
    example whose label ranks third the DLR loss is constant, so its zero gradient means nothing). The
    cross-entropy's (APGD-CE's) is reported beside it: where it is saturated (an exactly one-hot softmax) a
    confident example gives APGD-CE no gradient, yet the DLR-based APGD-T still has one: a note, not a
    failure. Fewer than 3 classes have no DLR loss: the cross-entropy's gradient decides."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if not logits.requires_grad:
            return _NO_INPUT_GRADIENT
        logits = logits.flatten(1).float()
        attacked = logits.argmax(1) == y
        n = int(attacked.sum())
        if n == 0:
            return Verdict("input gradients", True, f"none of the {x.shape[0]} examples is classified correctly: "
                                                    "AutoAttack attacks none of them, nothing to check")
        ce = _zero_and_non_finite(F.cross_entropy(logits, y, reduction="sum"), x, attacked)
        dlr = _zero_and_non_finite(_dlr_loss(logits, y), x, attacked) if logits.shape[1] >= 3 else None
    if ce is None:
        return _NO_INPUT_GRADIENT
    decisive, name = (dlr, "DLR") if dlr is not None else (ce, "cross-entropy")
    zero, non_finite = decisive
    passed = zero == 0 and non_finite == 0
    detail = (f"{name} loss: {zero} of the {n} correctly classified examples with an all-zero input gradient, "
              f"{non_finite} non-finite")
    if dlr is not None:
        detail += f"; cross-entropy: {ce[0]} all-zero, {ce[1]} non-finite"
        if passed and ce[0]:
            detail += " (saturated: APGD-CE gets no gradient there, APGD-T's DLR loss does)"
    if not passed:
        detail += "; gradient-based attacks cannot be trusted on them (gradient masking)"
    return Verdict("input gradients", passed, detail)


def audit_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[Verdict]:
    """The four verdicts (in AUDITED order) for `model` on the batch (x, y), x in [0, 1] on the model's device.

    Each check runs even when an earlier one failed; a check that raises is a failed verdict naming the
    error, never the end of the evaluation. The caller's random streams are left as they were (a randomised
    model draws from forked ones), so the attacks that follow start from the same random numbers."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        return _audit_model(model, x, y)


def _audit_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[Verdict]:
    verdicts = []
    with eval_mode(model):
        try:
            with torch.no_grad():
                first = model(x)
        except Exception as err:  # noqa: BLE001 - reported as the verdict of every check
            return [Verdict(name, False, f"the forward pass raised {type(err).__name__}: {err}") for name in AUDITED]
        steps = (lambda: _audit_logits(first), lambda: _audit_deterministic(model, x, first),
                 lambda: _audit_eval_mode(model), lambda: _audit_input_gradients(model, x, y))
        for name, step in zip(AUDITED, steps):
            try:
                verdicts.append(step())
            except Exception as err:  # noqa: BLE001
                verdicts.append(Verdict(name, False, f"the check raised {type(err).__name__}: {err}"))
    return verdicts
