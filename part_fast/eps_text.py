"""Budgets as people write them. Inputs are in [0, 1], so an L-inf budget is a small fraction; papers and
users write it in 255ths (8/255). Error messages show both: `eps_low=8/255 (0.0314)`."""
from __future__ import annotations

import math

# A value within this of k/255 is shown as k/255 (8/255 typed as a float is 0.03137254901960784).
_TOLERANCE = 1e-9


def eps_text(value: float) -> str:
    """0.0313725... -> '8/255 (0.0314)'; 1.5/255 -> '1.5/255 (0.0059)'; 0.01 -> '2.55/255 (0.0100)'; NaN -> 'nan'."""
    value = float(value)
    if not math.isfinite(value):
        return repr(value)
    k = value * 255
    for digits in (0, 1, 2):
        if abs(k - round(k, digits)) < _TOLERANCE * max(1.0, abs(k)):
            return f"{round(k, digits):g}/255 ({value:.4f})"
    return f"{k:.3g}/255 ({value:.4f})"


def named_eps(name: str, value: float) -> str:
    """'eps_low=8/255 (0.0314)'."""
    return f"{name}={eps_text(value)}"


def above_one_hint(value: float) -> str:
    """The hint for a budget > 1, which can never be meant on inputs in [0, 1] ('' when value <= 1)."""
    value = float(value)
    if not value > 1:
        return ""
    return (f"; inputs are in [0, 1], so a budget above 1 is never meant: did you mean {value:g}/255 "
            f"({value / 255:.4f})?")
