"""Adversarial weight perturbation (--awp-gamma, part_fast/train/awp.py): the perturbation's size and
direction, the exact restore, the step's gradient taken at the perturbed weights, and the trainer's use of it.
(Exact resume with it on: test_train's recipe resume and the DDP runs of test_distributed.)"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from part_fast.errors import ConfigError
from part_fast.train import load_checkpoint, train
from part_fast.train import step as step_mod
from part_fast.train.awp import WeightPerturbation, perturbed_names
from part_fast.train.distributed import Distributed

from helpers import assert_same_weights, tiny, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _loss_of(x, y):
    return lambda net: nn.functional.cross_entropy(net(x), y)


def test_each_layer_moves_by_gamma_of_its_norm_along_its_loss_gradient():
    model, x, y = _toy(), torch.rand(5, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    awp = WeightPerturbation(model, 0.01)
    assert perturbed_names(model) == ["0.weight", "4.weight"]  # not biases, not BatchNorm
    before = copy.deepcopy(model.state_dict())
    v = awp.perturbation(model, _loss_of(x, y))
    assert_same_weights(before, model.state_dict())  # the model itself (buffers included) is untouched
    reference = copy.deepcopy(model).train()
    grads = torch.autograd.grad(_loss_of(x, y)(reference), [reference[0].weight, reference[4].weight])
    for name, v_l, g in zip(awp.names, v, grads):
        w = model.state_dict()[name]
        assert (v_l.norm() / w.norm()).item() == pytest.approx(0.01, rel=1e-5)
        cosine = torch.nn.functional.cosine_similarity(v_l.reshape(-1), g.reshape(-1), dim=0)
        assert cosine.item() == pytest.approx(1.0, abs=1e-5), name  # uphill on the loss


def test_applied_restores_the_weights_bit_exact():
    model = _toy()
    awp = WeightPerturbation(model, 5e-3)
    v = awp.perturbation(model, _loss_of(torch.rand(2, 3, 6, 6), torch.tensor([0, 2])))
    w = model[0].weight.detach().clone()
    # The guard's power: subtracting v again would not give w back in float32.
    assert not torch.equal((w + v[0]) - v[0], w)
    with awp.applied(model, v):
        assert torch.equal(model[0].weight, w + v[0]) and torch.equal(model[4].bias, _toy()[4].bias)
    assert torch.equal(model[0].weight, w)


class _SecondRank:
    """What Distributed.average_ does on rank 0 of two when rank 1's tensors are `other`."""

    def __init__(self, other):
        self.other = other

    def average_(self, tensors):
        for t, o in zip(tensors, self.other):
            t.add_(o).div_(2)


def test_under_ddp_the_perturbation_follows_the_gradient_averaged_over_the_ranks():
    """Each rank's gradient is averaged before v is formed, so v is the global batch's (the same on every
    rank): here two halves of one batch, for a model without BatchNorm, whose mean loss has the mean gradient."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, y = torch.rand(8, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    names = perturbed_names(model)
    params = dict(model.named_parameters())
    second_half = torch.autograd.grad(_loss_of(x[4:], y[4:])(model), [params[n] for n in names])
    v = WeightPerturbation(model, 0.01, ranks=_SecondRank(second_half)).perturbation(model, _loss_of(x[:4], y[:4]))
    whole = WeightPerturbation(model, 0.01).perturbation(model, _loss_of(x, y))
    alone = WeightPerturbation(model, 0.01).perturbation(model, _loss_of(x[:4], y[:4]))
    for v_l, whole_l, alone_l in zip(v, whole, alone):
        torch.testing.assert_close(v_l, whole_l, rtol=1e-4, atol=1e-7)
        assert (v_l - alone_l).abs().max() > 1e-3 * alone_l.abs().max()  # the average mattered


def test_gamma_must_be_positive():
    with pytest.raises(ValueError, match="gamma must be > 0"):
        WeightPerturbation(nn.Linear(2, 2), 0.0)
    with pytest.raises(ConfigError, match=r"awp_gamma must be >= 0 \(0: off\)"):
        train(tiny("unused", awp_gamma=-1.0))
    with pytest.raises(ConfigError, match=r"awp_warmup must be an int of epochs >= 0 and at most epochs \(3\)"):
        train(tiny("unused", awp_gamma=5e-3, awp_warmup=4))


@pytest.mark.parametrize("method", ["part", "part-trades"])
def test_the_step_s_gradient_is_taken_at_the_perturbed_weights_and_applied_from_the_restored_ones(tmp_path, method):
    config = tiny(tmp_path / "run", method=method, awp_gamma=0.02).resolved()
    state = step_mod.build_state(config, 4, torch.device("cpu"), Distributed())
    model = state.model
    start = copy.deepcopy(model.state_dict())
    forwards, seen = [], {}

    def forward_pre_hook(module, args):  # the update's forwards: train mode (the CAM's and attack's are eval)
        if module.training:
            forwards.append(({k: v.detach().clone() for k, v in module.state_dict().items()}, args[0].detach().clone()))

    hook = model.register_forward_pre_hook(forward_pre_hook)
    real_step = state.optimizer.step

    def checked_step(*a, **kw):
        seen["at_step"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return real_step(*a, **kw)

    state.optimizer.step = checked_step
    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 4, (32,))
    step_mod.train_step(state, x, y, part_phase=True, attack=step_mod.inner_attack(state, part_phase=True),
                        attack_gen=torch.Generator().manual_seed(0), augment_gen=None, perturb_weights=True)
    natural = config.training_method.natural_logits
    assert len(forwards) == (2 if natural else 1)  # (the proxy's forwards are not the model's)
    perturbed = set(perturbed_names(model))
    at_forward = forwards[0][0]
    for name, w in start.items():
        if name in perturbed:
            assert ((at_forward[name] - w).norm() / w.norm()).item() == pytest.approx(0.02, rel=1e-4), name
        else:
            assert torch.equal(at_forward[name], w), name
    for name, _ in model.named_parameters():  # every weight as it was before the step (the perturbed ones
        assert torch.equal(seen["at_step"][name], start[name]), name  # restored bit-exact), when the optimiser steps
    # The gradient the optimiser got is the outer loss's at w + v, on the inputs the update saw.
    hook.remove()  # (before the copy: deepcopy would copy it)
    replay = copy.deepcopy(model).train()
    replay.load_state_dict(at_forward)
    logits = [replay(inp) for _, inp in forwards]
    nat, adv = (logits[0], logits[1]) if natural else (None, logits[0])
    loss = config.training_method.outer_loss(nat, adv, y, config.beta, 0.0)
    grads = torch.autograd.grad(loss, list(replay.parameters()))
    for (name, _), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(seen["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_training_with_awp_after_its_warm_up(tmp_path):
    """The epochs before --awp-warmup train exactly as without AWP; after it the update differs, and its
    stage is timed."""
    plain = train(tiny(tmp_path / "plain", epochs=2, time_stages=True))
    with_awp = train(tiny(tmp_path / "awp", epochs=2, time_stages=True, awp_gamma=5e-3, awp_warmup=1))
    assert_same_weights(weights(tmp_path / "plain", "previous.pt"), weights(tmp_path / "awp", "previous.pt"))
    assert with_awp[0]["train_loss"] == plain[0]["train_loss"]
    assert not torch.equal(weights(tmp_path / "plain")["linear.weight"], weights(tmp_path / "awp")["linear.weight"])
    assert with_awp[0]["awp_seconds"] == 0.0 and with_awp[1]["awp_seconds"] > 0
    assert "awp_seconds" not in plain[0]
    assert load_checkpoint(tmp_path / "awp" / "last.pt")["config"]["awp_gamma"] == 5e-3
