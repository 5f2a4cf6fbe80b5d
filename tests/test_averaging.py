"""Weight averaging (--ema-decay): the EMA against its closed form, in a toy model and in training; what is
evaluated and loaded. (Exact resume with it on: the fault-tolerance runs of helpers keep an average.)"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from part_fast.errors import ConfigError
from part_fast.train import WeightAverage, averaging, load_checkpoint, load_model, model_from, train

from helpers import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def closed_form(history: list[dict], decay: float) -> dict:
    """sum_t w_t (1 - d_t) prod_{s > t} d_s + w_0 prod_s d_s, for each floating entry of the state dicts
    history[0] (the start) .. history[T] (after step T); integer entries are the last one's."""
    steps = len(history) - 1
    d = [None] + [min(decay, t / (t + 9)) for t in range(1, steps + 1)]
    out = {}
    for k, last in history[-1].items():
        if not last.is_floating_point():
            out[k] = last
            continue
        total = history[0][k].double() * torch.prod(torch.tensor(d[1:], dtype=torch.float64))
        for t in range(1, steps + 1):
            later = torch.prod(torch.tensor(d[t + 1:], dtype=torch.float64))
            total = total + history[t][k].double() * (1 - d[t]) * later
        out[k] = total
    return out


def test_decay_ramps_up_to_the_decay():
    assert [averaging.decay_at(t, 0.995) for t in (1, 9, 91)] == [0.1, 0.5, 91 / 100]
    assert averaging.decay_at(1791, 0.995) == pytest.approx(0.995) and averaging.decay_at(5000, 0.995) == 0.995
    assert averaging.decay_at(20, 0.5) == 0.5
    with pytest.raises(ValueError, match="step must be >= 1"):
        averaging.decay_at(0, 0.5)


def test_average_of_a_toy_model_equals_the_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    average = WeightAverage(model, decay=0.6)
    history = [{k: v.clone() for k, v in model.state_dict().items()}]
    for step in range(1, 16):  # the ramp (steps 1-13: t / (t + 9) < 0.6), then 0.6
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3, dtype=torch.float64))  # moves the BatchNorm statistics and count
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        average.update(model, step)
    expected = closed_form(history, 0.6)
    got = average.model.state_dict()
    assert got["1.num_batches_tracked"] == 15  # copied, not averaged
    for k, v in expected.items():
        torch.testing.assert_close(got[k].to(v.dtype), v, rtol=1e-12, atol=1e-12, msg=k)
    # Not the current weights, and the source untouched; the average is frozen and in eval mode.
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())


def test_bad_decay_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        WeightAverage(nn.Linear(1, 1), 1.0)
    with pytest.raises(ConfigError, match=r"ema_decay must be 0 \(off\) or in \(0, 1\)"):
        train(tiny(tmp_path / "run", ema_decay=1.5))


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    """tiny() with --ema-decay 0.5 and an evaluation, every update's source weights recorded:
    (RUN_DIR, history, the recorded (step, state_dict) list)."""
    out = tmp_path_factory.mktemp("ema") / "run"
    recorded = []
    real_update = WeightAverage.update

    def recording(self, source, step):
        recorded.append((step, {k: v.clone() for k, v in source.state_dict().items()}))
        return real_update(self, source, step)

    WeightAverage.update = recording
    try:
        initial = {}
        real_init = WeightAverage.__init__

        def init(self, source, decay):
            initial.update({k: v.clone() for k, v in source.state_dict().items()})
            real_init(self, source, decay)

        WeightAverage.__init__ = init
        try:
            history = train(tiny(out, ema_decay=0.5, epochs=4, eval_examples=16))
        finally:
            WeightAverage.__init__ = real_init
    finally:
        WeightAverage.update = real_update
    return out, history, [(0, initial)] + recorded


def test_training_updates_the_average_after_every_step_as_the_closed_form(averaged_run):
    out, _, recorded = averaged_run
    assert [step for step, _ in recorded] == list(range(13))  # the start, then 4 epochs of 3 steps
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["average"]["decay"] == 0.5
    expected = closed_form([sd for _, sd in recorded], 0.5)
    for k, v in expected.items():  # float32 weights: the order of the updates' roundings differs
        torch.testing.assert_close(ckpt["average"]["model"][k].to(v.dtype), v, rtol=1e-5, atol=1e-6,
                                   msg=k)
    # The last source is the trained model the checkpoint holds.
    assert all(torch.equal(recorded[-1][1][k], ckpt["model"][k]) for k in ckpt["model"])


def test_the_average_is_what_is_evaluated_and_loaded(averaged_run, monkeypatch):
    out, history, _ = averaged_run
    assert all(r["evaluated_weights"] == "average" for r in history)
    ckpt = load_checkpoint(out / "last.pt")
    model, _, which = model_from(ckpt)
    assert which == "average"
    assert torch.equal(model.state_dict()["linear.weight"], ckpt["average"]["model"]["linear.weight"])
    trained, _ = load_model(out / "last.pt", weights="trained")
    assert torch.equal(trained.state_dict()["linear.weight"], ckpt["model"]["linear.weight"])
    assert not torch.equal(ckpt["model"]["linear.weight"], ckpt["average"]["model"]["linear.weight"])
    # The per-epoch accuracy is the average's: evaluating the average again gives the last epoch's figure.
    from part_fast.evaluation import evaluate
    from part_fast.train.loaders import data_loaders
    from part_fast.train.distributed import Distributed
    config = tiny(out, ema_decay=0.5, epochs=4, eval_examples=16).resolved()
    loader = data_loaders(config, Distributed()).evaluation
    res = evaluate(model, loader, attacks=("natural",), eps=config.eps, alpha=config.step_size, seed=config.seed,
                   progress=False)
    assert res["natural"] == history[-1]["test_nat_acc"]


def test_a_run_without_an_average_refuses_to_load_one(tmp_path, two_epochs_plain):
    with pytest.raises(ConfigError, match="kept no weight average"):
        load_model(two_epochs_plain / "last.pt", weights="average")
    assert load_checkpoint(two_epochs_plain / "last.pt")["average"] is None
    assert "evaluated_weights" not in json.loads((two_epochs_plain / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def two_epochs_plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    train(tiny(out, epochs=1))
    return out


def test_cli_eval_says_which_weights_it_uses(averaged_run, tmp_path, capsys):
    from part_fast import cli
    out, history, _ = averaged_run
    args = ["eval", str(out / "last.pt"), "--attacks", "natural", "--test-subset", "16", "--json", str(tmp_path / "e.json")]
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "holds a weight average and the trained weights: using the weight average (EMA, decay 0.5)" in said
    assert json.loads((tmp_path / "e.json").read_text())["natural"] == history[-1]["test_nat_acc"]
    assert cli.main([*args, "--weights", "trained"]) == 0
    assert "using the trained weights (--weights trained)" in capsys.readouterr().out
