"""The real-data study's verdict rule (bench/study_report.py): the study itself is hours of training
and never runs in CI, but the sentence it writes into the README must follow from the numbers."""
from __future__ import annotations

import pytest

from bench.study_report import aggregate, compare, headline


def _runs(label: str, natural: list[float], pgd20: list[float], mma: list[float]) -> list[dict]:
    return [{"label": label, "complete": True, "train_seconds": 600.0, "eval_seconds": 120.0,
             "accuracy": {"natural": n, "pgd20": p, "mma": m}} for n, p, m in zip(natural, pgd20, mma)]


def _agg(part_natural, part_pgd20, part_mma, part_label="PART (jet)"):
    at = _runs("AT", [50.45, 50.65, 50.35], [28.55, 29.30, 29.30], [24.55, 25.25, 25.55])
    other = "PART (cam)" if part_label == "PART (jet)" else "PART (jet)"
    return aggregate(at + _runs(part_label, part_natural, part_pgd20, part_mma)
                     + _runs(other, [50.45, 50.65, 50.35], [28.55, 29.30, 29.30], [24.55, 25.25, 25.55]))


def test_a_natural_gain_within_two_standard_errors_is_inconclusive():
    # The committed study's PART (jet) runs: +0.30 natural with a standard error of 0.23.
    c = compare(_agg([50.65, 51.20, 50.50], [27.90, 29.00, 29.05], [24.30, 25.25, 25.50]), "PART (jet)")
    assert c["diffs"]["natural"]["diff"] == pytest.approx(0.30, abs=1e-9)
    assert c["diffs"]["natural"]["se"] == pytest.approx(0.23, abs=0.005)
    assert (c["natural_higher"], c["robust_kept"], c["verdict"]) == (False, True, "inconclusive at this scale")


def test_a_clear_natural_gain_at_equal_robustness_shows():
    c = compare(_agg([52.40, 52.60, 52.30], [28.60, 29.40, 29.20], [24.60, 25.20, 25.50]), "PART (jet)")
    assert (c["natural_higher"], c["robust_kept"], c["verdict"]) == (True, True, "shows")


def test_a_clear_robustness_drop_does_not_show_even_with_a_natural_gain():
    c = compare(_agg([52.40, 52.60, 52.30], [26.00, 26.30, 26.10], [24.60, 25.20, 25.50]), "PART (jet)")
    assert (c["natural_higher"], c["robust_kept"], c["verdict"]) == (True, False, "does not show")


def test_no_natural_gain_does_not_show():
    c = compare(_agg([50.10, 50.30, 50.00], [28.60, 29.40, 29.20], [24.60, 25.20, 25.50]), "PART (jet)")
    assert c["verdict"] == "does not show" and c["reason"] == "natural accuracy is not higher"


def test_one_seed_is_inconclusive_and_the_headline_quotes_the_gaps():
    one = aggregate(_runs("AT", [50.45], [28.55], [24.55]) + _runs("PART (jet)", [52.0], [29.0], [25.0])
                    + _runs("PART (cam)", [52.0], [29.0], [25.0]))
    assert compare(one, "PART (jet)")["verdict"] == "inconclusive at this scale"
    agg = _agg([52.40, 52.60, 52.30], [28.60, 29.40, 29.20], [24.60, 25.20, 25.50], part_label="PART (cam)")
    comparisons = {label: compare(agg, label) for label in ("PART (jet)", "PART (cam)")}
    text = headline(comparisons)
    assert text.startswith("With the released jet mask it does not show; with the cam mask it shows")
    assert "natural +0.00 ± 0.12 (jet), +1.95 ± 0.12 (cam)" in text
