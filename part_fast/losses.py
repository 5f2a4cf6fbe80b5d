"""Outer (training) losses of AT, TRADES and MART, as the authors' release computes them.

Pure functions of logits: tensors in, a 0-dim tensor out, no model calls. The trainer owns the forward
passes (and so the train/eval mode of each one) and the inner maximisation (`part_fast.attacks.PGD`).

Numerics: half-precision logits (bf16/fp16, e.g. from a model under ``torch.autocast``) are upcast and
the loss is computed in float32 with autocast disabled; float64 logits are computed in float64. The
release's constants (MART's 1e-12, 1.0001, 1.0000001) are kept so the values match it; every log is taken
of a quantity bounded away from 0 or comes from ``log_softmax``, so a softmax that underflows to exactly
0 gives neither NaN values nor NaN gradients (the release's ``KLDivLoss(input, softmax(...))`` has an
infinite derivative with respect to a zero target). The reductions are the release's: batch means, and
the KL terms summed over classes and examples and divided by the batch size.

What the release (JiachengZ01/PART) does per base method
------------------------------------------------------------------------------------------------------
Inner attack, all three methods: L-inf, 10 steps of α = 2/255 (SVHN: 1/255), x ← x + α·sign(∇loss), the
perturbation clamped element-wise to [-ε_map, ε_map] (PART epochs; warm-up epochs: the global ε = 8/255),
then x clipped to [0, 1]. Every inner forward runs with the model in EVAL mode; every outer forward
(the ones whose logits these functions take) runs in TRAIN mode.

| method | inner loss (ascended)           | inner start (PGD start=)                   | outer loss  | outer forwards, train mode |
|--------|---------------------------------|--------------------------------------------|-------------|----------------------------|
| AT     | CE(f(x), y), batch mean         | x+U(-ε,ε), global ε, unclipped ("release"); | at_loss     | f(x_adv)                   |
|        |                                 | warm-up: torchattacks PGD, clipped ("uniform") |          |                            |
| TRADES | KL(p_nat ‖ p(x)), summed;       | x+0.001·N(0,1), unclipped ("normal")        | trades_loss | f(x_nat), f(x_adv), f(x_nat) |
|        | p_nat from an eval forward      |                                            |             |                            |
| MART   | CE(f(x), y), batch mean         | x+0.001·N(0,1), unclipped ("normal");       | mart_loss   | f(x_nat), f(x_adv)         |
|        |                                 | NOT a uniform start                        |             |                            |

Outer losses (B = batch size, p = softmax):
- AT:     CE(f(x_adv), y), batch mean.
- TRADES: CE(f(x_nat), y) batch mean + β · Σ_i Σ_c p_nat·(log p_nat − log p_adv) / B.
- MART:   CE(f(x_adv), y) mean − mean_i log(1.0001 − p_adv[y'] + 1e-12)
          + β · Σ_i KL_i·(1.0000001 − p_nat[y]) / B,  KL_i = Σ_c p_nat·(log p_nat − log(p_adv + 1e-12)),
          y' = the most likely class other than y under p_adv.
PGD's "normal" start projects x+0.001·N(0,1) into the box and [0, 1], the release does not: the noise is
far inside every ε, so only pixels at 0 or 1 start differently.

β = 6.0 (TRADES and MART). The trainer's table of methods (``part_fast.train.methods``) holds the matching
``PGD(loss=..., start=...)`` per method and phase.

Nothing is detached in the release's outer losses: in TRADES and MART the gradient flows into both the
natural logits (CE, the KL target p_nat, MART's weight 1 − p_nat[y]) and the adversarial logits. Only
MART's y' (an argsort index) carries no gradient. The functions here do the same.

KL direction: the release calls ``nn.KLDivLoss(log_softmax(f(x_adv)), softmax(f(x_nat)))``, which is
KL(p_nat ‖ p_adv) = Σ p_nat·log(p_nat / p_adv) (docs/method.md §4 writes the arguments the other way
round; the formula above is what the code computes).

Forward passes and BatchNorm: in the release each outer forward is a separate train-mode call, so
BatchNorm normalises x_nat and x_adv each with its own batch statistics (and updates the running
statistics once per call: TRADES three times, MART twice, AT once). A single forward on
``cat([x_nat, x_adv])`` gives the same loss formula but normalises with the statistics of the mixed 2B
batch, which is not what the release trained with. TRADES' second f(x_nat) equals the first (same batch,
same train-mode BatchNorm, no dropout in the released ResNet-18 / WRN-34-10), so passing one
``logits_nat`` computes the same value; only the running-statistics update count differs.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["at_loss", "trades_loss", "mart_loss", "OUTER_LOSSES"]

# The release's constants in MART (kept so values match it).
MART_LOG_EPS = 1e-12  # log(p_adv + 1e-12) in the KL and log(1.0001 - p + 1e-12) in the boosted term
MART_BOOST_ONE = 1.0001  # log(1.0001 - p_adv[y'] + 1e-12)
MART_WEIGHT_ONE = 1.0000001  # KL weight (1.0000001 - p_nat[y])


def _validate_logits(logits, name: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {str(logits.dtype).replace('torch.', '')}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, classes), got shape {tuple(logits.shape)}")
    if logits.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one example, got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {tuple(logits.shape)}")


def _validate_pair(logits_nat, logits_adv) -> None:
    _validate_logits(logits_nat, "logits_nat")
    _validate_logits(logits_adv, "logits_adv")
    if logits_adv.shape != logits_nat.shape:
        raise ValueError(
            f"logits_adv must have the shape of logits_nat {tuple(logits_nat.shape)}, got {tuple(logits_adv.shape)}"
        )
    if logits_adv.device != logits_nat.device:
        raise ValueError(f"logits_adv must be on logits_nat's device {logits_nat.device}, got {logits_adv.device}")


def _validate_labels(y, logits: torch.Tensor) -> None:
    batch, num_classes = logits.shape
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must be an integer tensor of class indices, got {str(y.dtype).replace('torch.', '')}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"y must be a 1-D tensor of {batch} labels (one per logits row), got shape {tuple(y.shape)}")
    if y.device != logits.device:
        raise ValueError(f"y must be on the logits' device {logits.device}, got {y.device}")
    # A data-dependent check (one host sync); skipped while torch.compile traces, where it would break the graph.
    if not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(y)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"y must hold class indices in [0, {num_classes - 1}], got {bad}")


def _validate_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    beta = float(beta)
    if not beta >= 0 or math.isinf(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return beta


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/float32 logits, float64 if any input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        return contextlib.nullcontext()


def _validated_pair_inputs(logits_nat, logits_adv, y, beta):
    """The checks TRADES and MART share; returns (nat, adv) in the compute dtype, y as int64, beta as float."""
    _validate_pair(logits_nat, logits_adv)
    _validate_labels(y, logits_nat)
    beta = _validate_beta(beta)
    dtype = _compute_dtype(logits_nat, logits_adv)
    return logits_nat.to(dtype), logits_adv.to(dtype), y.long(), beta


def _validate_label_smoothing(label_smoothing) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")


def at_loss(logits_adv: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """AT / PART outer loss: CE(f(x_adv), y), batch mean (the release: ``F.cross_entropy(model(x_adv), y)``
    after the inner attack, model in train mode).

    Inner attack in the release: CE ascent, 10 steps of α = 2/255 (SVHN 1/255), model in eval mode;
    PART epochs start at x + U(-ε, ε) with the global ε, unclipped (``PGD(start="release", loss="ce")``),
    warm-up epochs use torchattacks' PGD, whose start is clipped to [0, 1] (``start="uniform"``).

    label_smoothing ε (0: the release) makes the target (1 − ε) one-hot + ε/C uniform, as
    ``F.cross_entropy(..., label_smoothing=ε)``."""
    _validate_logits(logits_adv, "logits_adv")
    _validate_labels(y, logits_adv)
    _validate_label_smoothing(label_smoothing)
    y = y.long()
    with _no_autocast(logits_adv.device):
        return F.cross_entropy(logits_adv.to(_compute_dtype(logits_adv)), y, label_smoothing=label_smoothing)


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float = 6.0, *,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """TRADES / PART-T outer loss as the release reduces it:

        CE(f(x_nat), y)  [batch mean]  +  beta · Σ_i Σ_c p_nat,ic · (log p_nat,ic − log p_adv,ic) / B

    i.e. ``nn.KLDivLoss(reduction="sum")(log_softmax(adv), softmax(nat)) / batch_size`` = KL(p_nat ‖ p_adv)
    averaged over the batch. Nothing is detached: the KL target p_nat carries gradient, as in the release.

    Inner attack in the release: ascend the summed KL(softmax(f(x_nat)) ‖ softmax(f(x))) from
    x_nat + 0.001·N(0, 1) (unclipped), 10 steps of α = 2/255 (SVHN 1/255), model in eval mode
    (``PGD(loss="kl", start="normal")``).

    label_smoothing ε (0: the release) smooths the natural cross-entropy's target only; the KL term compares
    two predictions and has no label."""
    nat, adv, y, beta = _validated_pair_inputs(logits_nat, logits_adv, y, beta)
    _validate_label_smoothing(label_smoothing)
    with _no_autocast(nat.device):
        natural = F.cross_entropy(nat, y, label_smoothing=label_smoothing)
        # log-space KL: finite value and gradient even where a softmax probability underflows to 0
        robust = F.kl_div(F.log_softmax(adv, dim=1), F.log_softmax(nat, dim=1), reduction="sum", log_target=True)
        return natural + beta * (robust / nat.shape[0])


def mart_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float = 6.0) -> torch.Tensor:
    """MART / PART-M outer loss as the release computes it (constants included):

        CE(f(x_adv), y)                                        [batch mean]
        − mean_i log(1.0001 − p_adv,i[y'_i] + 1e-12)            [y'_i = argmax_{c ≠ y_i} p_adv,ic]
        + beta · Σ_i KL_i · (1.0000001 − p_nat,i[y_i]) / B,
        KL_i = Σ_c p_nat,ic · (log p_nat,ic − log(p_adv,ic + 1e-12)).

    Nothing is detached (p_nat in the KL and in the weight carry gradient, as in the release); y' is an
    index and carries none. Ties for y' pick the lowest class index; the loss value does not depend on
    which tied class is picked.

    Inner attack in the release: CE ascent from x_nat + 0.001·N(0, 1) (unclipped; the same start as
    TRADES, not a uniform one), 10 steps of α = 2/255 (SVHN 1/255), model in eval mode
    (``PGD(loss="ce", start="normal")``)."""
    nat, adv, y, beta = _validated_pair_inputs(logits_nat, logits_adv, y, beta)
    with _no_autocast(nat.device):
        rows = y[:, None]
        p_adv = F.softmax(adv, dim=1)
        # y': the most likely wrong class under p_adv (an index, no gradient)
        wrong = p_adv.detach().scatter(1, rows, -1.0).argmax(dim=1, keepdim=True)
        boosted = -torch.log(MART_BOOST_ONE - p_adv.gather(1, wrong) + MART_LOG_EPS).mean()
        loss_adv = F.cross_entropy(adv, y) + boosted

        log_p_nat = F.log_softmax(nat, dim=1)
        p_nat = log_p_nat.exp()
        kl = (p_nat * (log_p_nat - torch.log(p_adv + MART_LOG_EPS))).sum(dim=1)
        weight = MART_WEIGHT_ONE - p_nat.gather(1, rows).squeeze(1)
        robust = (kl * weight).sum() / nat.shape[0]
        return loss_adv + beta * robust


OUTER_LOSSES = {"at": at_loss, "trades": trades_loss, "mart": mart_loss}
