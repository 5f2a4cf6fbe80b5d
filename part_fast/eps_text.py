"""Budgets as people write them, and the checks of their values. Inputs are in [0, 1], so an L-inf budget is a
small fraction; papers and users write it in 255ths (8/255). Error messages show both: `eps_low=8/255 (0.0314)`.
The checks (validate_budget, validate_budgets) are the one home of the rule for PixelBudget, PGD / MMA, TrainConfig
and the command line."""
from __future__ import annotations

import math
import numbers

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


def validate_budget(name: str, value) -> None:
    """An L-inf budget or step on inputs in [0, 1]: a finite real number in [0, 1]. The error names the
    argument, shows the value in 255ths and, above 1 (8 typed for 8/255), says what was probably meant.
    Raises part_fast.errors.ConfigError (a user error)."""
    from .errors import ConfigError  # errors imports nothing of ours; kept local so this module stays a leaf

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number such as 8/255, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number such as 8/255, got {name}={value!r}")
    if not 0 <= value <= 1:
        raise ConfigError(f"{name} must be in [0, 1], got {named_eps(name, value)}{above_one_hint(value)}")


def validate_budgets(eps, eps_low, names: tuple[str, str] = ("eps", "eps_low")) -> None:
    """PART's pair of budgets: each in [0, 1] (validate_budget), and eps_low <= eps."""
    from .errors import ConfigError

    validate_budget(names[0], eps)
    validate_budget(names[1], eps_low)
    if eps_low > eps:
        raise ConfigError(f"need 0 <= {names[1]} <= {names[0]} <= 1, got {named_eps(names[1], eps_low)} > "
                          f"{named_eps(names[0], eps)}")
