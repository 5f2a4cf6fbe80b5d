"""The checks AutoAttack warns about: a sound model passes all four; a model that breaks one rule fails
exactly that check, with the figure that shows it; the checks leave the caller's random numbers and the
model's modes as they were."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from part_fast import model_audit
from part_fast.model_audit import AUDITED, audit_model
from template_net import TemplateNet, examples, templates

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n=6, seed=0):
    t = templates(size=8, seed=seed)
    y = torch.arange(n) % 10
    return t, examples(t, y, torch.full((n,), 0.05)), y


def verdicts_of(model, x, y) -> dict:
    out = audit_model(model, x, y)
    assert [v.check for v in out] == list(AUDITED)
    return {v.check: v for v in out}


def failed(verdicts: dict) -> set:
    return {name for name, v in verdicts.items() if not v.passed}


class Wrapped(nn.Module):
    """A model around `inner` that breaks one rule in its forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner


class Softmax(Wrapped):
    def forward(self, x):
        return self.inner(x).softmax(1)


class AlwaysDropout(Wrapped):
    """A randomised defence: dropout on the input even in eval mode."""

    def forward(self, x):
        return self.inner(F.dropout(x, 0.5, training=True))


class StuckInTraining(nn.Module):
    """A BatchNorm wrapper that ignores model.eval(): deterministic on one batch, but batch-dependent."""

    def __init__(self, inner):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.inner = inner

    def train(self, mode=True):
        return super().train(True)

    def forward(self, x):
        return self.inner(self.bn(x))


class Rounding(Wrapped):
    """Quantises its input to 8 bits (a classic masking "defence"): predictions survive, the input gradient is
    exactly zero."""

    def forward(self, x):
        return self.inner(torch.round(x * 255) / 255)


class Detached(Wrapped):
    def forward(self, x):
        return self.inner(x.detach())


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("shape mismatch")


def test_a_sound_model_passes_every_check():
    t, x, y = batch()
    verdicts = verdicts_of(TemplateNet(t), x, y)
    assert failed(verdicts) == set()
    assert "0 of 6 predictions differ" in verdicts["deterministic"].detail
    expected = ("DLR loss: 0 of the 6 correctly classified examples with an all-zero input gradient, "
                "0 non-finite; cross-entropy: 0 all-zero")
    assert expected in verdicts["input gradients"].detail
    assert verdicts["logits"].line().startswith("AutoAttack check logits: pass (outputs in [")


def test_softmax_outputs_fail_the_logits_check_only():
    t, x, y = batch()
    verdicts = verdicts_of(Softmax(TemplateNet(t)), x, y)
    assert failed(verdicts) == {"logits"}
    assert "look like probabilities" in verdicts["logits"].detail
    assert verdicts["logits"].line().startswith("AutoAttack check logits: FAIL")


def test_log_softmax_is_accepted():
    """Cross-entropy and DLR are unchanged by log_softmax (a per-row shift): only probabilities are refused."""
    t, x, y = batch()
    model = nn.Sequential(TemplateNet(t), nn.LogSoftmax(1))
    assert failed(verdicts_of(model, x, y)) == set()


def test_a_randomised_model_fails_determinism_only():
    t, x, y = batch()
    verdicts = verdicts_of(AlwaysDropout(TemplateNet(t)), x, y)
    assert failed(verdicts) == {"deterministic"}
    assert "version='rand'" in verdicts["deterministic"].detail


def test_a_module_stuck_in_training_fails_eval_mode_only():
    t, x, y = batch()
    model = StuckInTraining(TemplateNet(t, scale=0.01))
    verdicts = verdicts_of(model, x, y)
    assert failed(verdicts) == {"eval mode"}
    assert "4 module(s) stay in training mode after model.eval(): (the model), bn, inner, inner.conv" in \
        verdicts["eval mode"].detail


def test_batch_statistics_in_eval_mode_fail_the_eval_mode_check():
    t, x, y = batch()
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), TemplateNet(t, scale=0.01))
    verdicts = verdicts_of(model, x, y)
    assert failed(verdicts) == {"eval mode"}
    assert "without running statistics" in verdicts["eval mode"].detail and ": 0" in verdicts["eval mode"].detail


def test_zero_input_gradients_fail_the_gradient_check_only():
    t, x, y = batch()
    verdicts = verdicts_of(Rounding(TemplateNet(t)), x, y)
    assert failed(verdicts) == {"input gradients"}
    assert verdicts["input gradients"].detail.startswith("DLR loss: 6 of the 6 correctly classified examples with an "
                                                         "all-zero input gradient")


def test_a_detached_input_fails_the_gradient_check():
    t, x, y = batch()
    verdicts = verdicts_of(Detached(TemplateNet(t)), x, y)
    assert failed(verdicts) == {"input gradients"}
    assert "does not depend on the input" in verdicts["input gradients"].detail


def test_saturated_cross_entropy_is_a_note_not_a_failure():
    """Huge logits: softmax is exactly one-hot in float32, so the cross-entropy's input gradient is exactly
    zero (APGD-CE cannot move there), but the DLR loss, the one AutoAttack's own check_zero_gradients looks
    at, is scale invariant and keeps its gradient: the check passes and says so."""
    t, x, y = batch()
    verdict = verdicts_of(TemplateNet(t, scale=1e4), x, y)["input gradients"]
    assert verdict.passed
    assert verdict.detail.startswith("DLR loss: 0 of the 6 correctly classified examples with an all-zero")
    assert "cross-entropy: 6 all-zero" in verdict.detail and "saturated" in verdict.detail


def test_two_classes_fall_back_to_the_cross_entropy():
    """DLR needs 3 classes: with 2 the cross-entropy's gradient decides."""
    t = templates(num_classes=2, size=8)
    y = torch.tensor([0, 1, 0, 1])
    x = examples(t, y, torch.full((4,), 0.05))
    assert verdicts_of(TemplateNet(t), x, y)["input gradients"].detail.startswith("cross-entropy loss: 0 of the 4")
    verdict = verdicts_of(Rounding(TemplateNet(t)), x, y)["input gradients"]
    assert not verdict.passed and verdict.detail.startswith("cross-entropy loss: 4 of the 4")


def test_only_the_examples_autoattack_attacks_are_checked():
    """A misclassified example is never attacked, and one whose label ranks third has a constant DLR loss
    (zero gradient): it must not fail the check. Here every example is misclassified."""
    t, x, y = batch()
    wrong = (y + 1) % 10
    verdict = verdicts_of(TemplateNet(t), x, wrong)["input gradients"]
    assert verdict.passed and "none of the 6 examples is classified correctly" in verdict.detail


class NoisyLogits(Wrapped):
    """Random noise of relative size `scale` on the logits: large margins keep every prediction."""

    def __init__(self, inner, scale):
        super().__init__(inner)
        self.scale = scale

    def forward(self, x):
        out = self.inner(x)
        return out + self.scale * out.abs().amax(1, keepdim=True) * torch.randn_like(out)


def test_outputs_that_move_fail_determinism_even_with_the_same_predictions():
    """AutoAttack's tolerance is on the normalised outputs: noise of 1e-3 fails it with every prediction
    unchanged, noise of 1e-7 (float non-determinism) passes."""
    t, x, y = batch()
    x = examples(t, y, torch.full((6,), 0.3))  # margins far beyond the noise
    verdict = verdicts_of(NoisyLogits(TemplateNet(t), 1e-3), x, y)["deterministic"]
    assert not verdict.passed and verdict.detail.startswith("two passes: 0 of 6 predictions differ")
    assert verdicts_of(NoisyLogits(TemplateNet(t), 1e-7), x, y)["deterministic"].passed


def test_the_randomised_model_check_is_stable():
    t, x, y = batch()
    for seed in range(40):
        torch.manual_seed(seed)
        assert failed(verdicts_of(AlwaysDropout(TemplateNet(t)), x, y)) == {"deterministic"}, seed


def test_half_precision_softmax_is_caught():
    t, x, y = batch()
    model = Softmax(TemplateNet(t)).to(torch.bfloat16)
    verdicts = verdicts_of(model, x.to(torch.bfloat16), y)
    assert not verdicts["logits"].passed


def test_a_forward_that_raises_fails_every_check_with_the_error():
    _, x, y = batch()
    verdicts = verdicts_of(Broken(), x, y)
    assert failed(verdicts) == set(AUDITED)
    assert all("RuntimeError: shape mismatch" in v.detail for v in verdicts.values())


def test_checks_leave_random_numbers_and_modes_alone():
    t, x, y = batch()
    model = AlwaysDropout(TemplateNet(t)).train()
    model.inner.eval()
    state = torch.random.get_rng_state()
    audit_model(model, x, y)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and not model.inner.training
    assert all(p.grad is None for p in model.parameters())


def test_verdict_json_round_trip():
    verdict = model_audit.Verdict("logits", True, "fine")
    assert model_audit.Verdict(**verdict.to_json()) == verdict
