"""The table of training methods (part_fast.train.methods) and the step that reads it: each method's step
computes its paper formula, with the release's inner attack, and nothing else."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from part_fast import data as data_mod
from part_fast.attacks import PGD
from part_fast.budget import PixelBudget
from part_fast.losses import at_loss, mart_loss, trades_loss
from part_fast.train import METHOD, METHODS, Distributed, build_model, build_state, inner_attack, train_step
from part_fast.train.step import STAT_NAMES

from helpers import tiny

# What the release does, written out here and not read from the table: (base, PART?, inner loss, start in
# global-eps epochs, start in PART epochs with start="release", natural logits in the outer loss).
RELEASE = {
    "at": ("at", False, "ce", "uniform", None, False),
    "part": ("at", True, "ce", "uniform", "release", False),
    "trades": ("trades", False, "kl", "normal", None, True),
    "part-trades": ("trades", True, "kl", "normal", "normal", True),
    "mart": ("mart", False, "ce", "normal", None, True),
    "part-mart": ("mart", True, "ce", "normal", "normal", True),
}


def test_the_table_is_the_release():
    assert set(METHODS) == set(RELEASE)
    for name, (base, part, inner, global_start, part_start, natural) in RELEASE.items():
        m = METHOD[name]
        assert (m.name, m.base, m.pixel_budget, m.inner_loss, m.natural_logits) == (name, base, part, inner, natural)
        assert m.attack_start(False, "release") == global_start
        if part:
            assert m.attack_start(True, "release") == part_start
            # AT's PART-epoch start is the run's choice; TRADES and MART always start at x + 0.001 N(0, 1).
            assert m.attack_start(True, "uniform") == ("uniform" if base == "at" else "normal")
    assert [METHOD[name].attack_reuses_cam_logits for name in ("part", "part-trades", "part-mart")] == [
        False, True, False]


def _batch(config, n=16):
    train_set, _, _ = data_mod.build_datasets(config.dataset, train_subset=config.train_subset, test_subset=config.test_subset,
                                              seed=config.seed)
    xs, ys = zip(*(train_set[i] for i in range(n)))
    return torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("name, part_phase", [(n, False) for n in RELEASE] + [(n, True) for n in RELEASE if RELEASE[n][1]])
def test_each_method_step_computes_its_formula(tmp_path, name, part_phase, one_thread):
    """The step's loss equals the method's formula recomputed here from the losses module, an attack built
    from the RELEASE row above, and the budget of the same batch; for TRADES the attack's clean target from
    the CAM forward equals a fresh eval-mode forward, so reusing it changes nothing."""
    base, _, inner, global_start, part_start, natural = RELEASE[name]
    config = tiny(tmp_path / "run", method=name, start="release", steps=2).resolved()
    state = build_state(config, 10, torch.device("cpu"), Distributed())
    model = build_model(config, 10)
    model.load_state_dict(copy.deepcopy(state.model.state_dict()))
    x, y = _batch(config)

    r = train_step(state, x, y, part_phase=part_phase, attack=inner_attack(state, part_phase),
                   attack_gen=torch.Generator().manual_seed(5), augment_gen=None)

    eps_map = PixelBudget(config.eps, config.eps_low, config.cam, config.mask, layer="features")(model, x) if part_phase else None
    start = part_start if part_phase else global_start
    pgd = PGD(model, config.eps, config.step_size, config.steps, loss=inner, start=start)
    x_adv = pgd(x, y, eps_map=eps_map, generator=torch.Generator().manual_seed(5))
    model.train()
    if base == "at":
        expected = at_loss(model(x_adv), y)
    else:
        logits_nat, logits_adv = model(x), model(x_adv)
        expected = (trades_loss if base == "trades" else mart_loss)(logits_nat, logits_adv, y, config.beta)
    assert r.loss == pytest.approx(float(expected.detach()), rel=1e-6, abs=1e-7)
    assert r.value("examples") == 16 and r.finite
    assert r.eps_high == (1.0 if eps_map is None else float((eps_map == config.eps).double().mean()))
    if not natural:
        assert r.value("correct_nat") == 0  # AT has no natural logits to count


def test_a_new_method_is_one_row(tmp_path, monkeypatch):
    """Adding a method touches the table alone: a PART-AT variant that ascends KL trains, and its attack is
    the row's."""
    row = dataclasses.replace(METHOD["part"], name="part-kl", inner_loss="kl")
    monkeypatch.setitem(METHOD, "part-kl", row)
    config = tiny(tmp_path / "run", method="part-kl").resolved()
    state = build_state(config, 10, torch.device("cpu"), Distributed())
    attack = inner_attack(state, part_phase=True)
    assert (attack.loss, attack.start) == ("kl", "uniform")
    assert config.is_part and config.base == "at"


@pytest.mark.parametrize("time_stages", [False, True])
def test_a_step_waits_for_the_device_only_when_stages_are_timed(tmp_path, monkeypatch, time_stages):
    """Per-stage timing synchronises the device at each stage boundary, so it is opt-in; without it the
    step leaves its statistics on the device, unread."""
    config = tiny(tmp_path / "run", time_stages=time_stages).resolved()
    state = build_state(config, 10, torch.device("cpu"), Distributed())
    syncs = []
    monkeypatch.setattr(type(state), "sync", lambda self: syncs.append(1))
    x, y = _batch(config)
    r = train_step(state, x, y, part_phase=True, attack=inner_attack(state, True), attack_gen=torch.Generator(),
                   augment_gen=None)
    assert r._read is None and r.stats.shape == (len(STAT_NAMES),)
    if time_stages:
        assert len(syncs) == 4 and sorted(r.seconds) == ["attack", "budget", "data", "update"]
        assert all(v > 0 for v in r.seconds.values()), "every stage was timed"
    else:
        assert syncs == [] and r.seconds == {}


def test_metrics_have_the_stage_split_only_when_asked(tmp_path):
    from part_fast.train import train

    plain = train(tiny(tmp_path / "plain", epochs=1, warmup=0))
    timed = train(tiny(tmp_path / "timed", epochs=1, warmup=0, time_stages=True))
    assert not any(k.endswith("_seconds") and k != "epoch_seconds" for k in plain[0])
    assert {k for k in timed[0] if k.endswith("_seconds")} == {"epoch_seconds", "data_seconds", "budget_seconds",
                                                               "attack_seconds", "update_seconds"}
    assert plain[0]["train_loss"] == timed[0]["train_loss"]  # timing never changes what is trained
