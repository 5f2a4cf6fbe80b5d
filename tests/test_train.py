"""The trainer: schedule, run directory, seeding, resume, divergence, AMP, data. (Exact resume after
SIGKILL / SIGTERM: test_preemption.py.)"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from part_fast import train as train_mod
from part_fast.attacks import PGD
from part_fast.train import METHOD, TrainConfig, TrainingDiverged, load_checkpoint, lr_factor, train

from helpers import assert_same_weights, step_lines, tiny, weights, without_timings

# Small models: one intra-op thread is as fast, and never waits for a busy core (conftest's one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- schedule
def test_lr_schedule_counts_milestones_after_warmup():
    # The release: x0.1 from PART-epoch 60, x0.01 from PART-epoch 90 (PART epochs counted from 1 after warm-up).
    f = [lr_factor(e, 20, (60, 90)) for e in range(0, 120)]
    assert f[:79] == [1.0] * 79  # global epochs 0..78 = warm-up 20 + PART epochs 1..59
    assert f[79] == pytest.approx(0.1) and f[108] == pytest.approx(0.1)  # PART epoch 60 .. 89
    assert f[109] == pytest.approx(0.01)  # PART epoch 90
    assert lr_factor(0, 0, (1,)) == pytest.approx(0.1)


def test_lr_warmup_then_cosine_or_steps():
    # A linear warm-up of 4 epochs: (e + 1) / 4, then the schedule from its own start.
    cosine = [lr_factor(e, 20, (60, 90), schedule="cosine", lr_warmup=4, epochs=84) for e in range(84)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]
    # cosine: 0.5 (1 + cos(pi t / 80)), t = e - 4: 1 at t = 0, 1/2 at t = 40, near 0 in the last epoch
    assert cosine[4] == 1.0 and cosine[44] == pytest.approx(0.5) and cosine[24] == pytest.approx((1 + 2 ** -0.5) / 2)
    assert cosine[83] == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80))) and all(
        a > b for a, b in zip(cosine[4:], cosine[5:]))
    steps = [lr_factor(e, 20, (60, 90), lr_warmup=4) for e in range(120)]
    assert steps[:4] == [0.25, 0.5, 0.75, 1.0] and steps[4:] == [lr_factor(e, 20, (60, 90)) for e in range(4, 120)]
    # The scheduler's step after the last epoch (also of a run that was all LR warm-up) lands on 0.
    assert lr_factor(84, 20, (), schedule="cosine", lr_warmup=4, epochs=84) == 0.0
    assert lr_factor(5, 0, (), schedule="cosine", lr_warmup=5, epochs=5) == 0.0
    with pytest.raises(ValueError, match="cosine schedule needs the run's epochs"):
        lr_factor(5, 0, (), schedule="cosine")


def test_release_defaults_per_dataset(tmp_path):
    cifar = TrainConfig(out=str(tmp_path)).resolved()
    assert (cifar.lr, cifar.weight_decay, cifar.step_size) == (0.01, 2e-4, 2 / 255)
    assert (cifar.epochs, cifar.warmup, cifar.batch_size, cifar.beta) == (80, 20, 128, 6.0)
    assert (cifar.eps, cifar.eps_low, cifar.steps, cifar.cam, cifar.mask) == (8 / 255, 7 / 255, 10, "gradcam", "jet")
    svhn = TrainConfig(out=str(tmp_path), dataset="svhn").resolved()
    assert (svhn.lr, svhn.weight_decay, svhn.step_size) == (0.01, 0.0035, 1 / 255)
    # An explicit flag wins over the dataset default.
    assert TrainConfig(out=str(tmp_path), dataset="svhn", step_size=0.5 / 255).resolved().step_size == 0.5 / 255


@pytest.mark.parametrize("change, match", [
    ({"eps_low": 9 / 255}, "eps_low <= eps"),
    ({"method": "pgd"}, "method must be one of"),
    ({"dataset": "mnist"}, "dataset must be one of"),
    ({"warmup": 5, "epochs": 3}, r"warmup \(5\) must not exceed epochs \(3\) for part"),
    ({"warmup": -1}, "warmup must be an int >= 0"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"momentum": -0.1}, "momentum must be >= 0"),
    ({"amp": "bf16", "method": "part-trades", "device": "cuda", "sync_bn": False}, None),
    ({"amp": "fp16", "method": "trades", "device": "cuda"}, "stall the trades attack"),
    ({"amp": "fp8"}, "amp must be one of"),
    ({"amp": "fp16", "device": "cpu"}, "fp16 needs a GPU"),
    ({"sync_bn": True, "device": "cpu"}, "sync_bn needs CUDA"),
    ({"device": "gpu"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ({"eps": 8}, r"eps must be in \[0, 1\], got eps=2040/255 \(8\.0000\); inputs are in \[0, 1\], so a budget "
                 r"above 1 is never meant: did you mean 8/255 \(0\.0314\)\?"),
    ({"eps_low": 8 / 255, "eps": 4 / 255}, r"eps_low=8/255 \(0\.0314\) > eps=4/255 \(0\.0157\)"),
    ({"step_size": 2.0}, r"step_size must be in \[0, 1\], got step_size=510/255 \(2\.0000\).*did you mean 2/255"),
    ({"eps_low": -1 / 255}, r"eps_low must be in \[0, 1\], got eps_low=-1/255 \(-0\.0039\)$"),
    ({"mask": "heat"}, "mask must be one of"),
    ({"cam": "scorecam"}, "cam must be one of"),
    ({"batch_size": 1}, "batch_size"),
    ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
    ({"lr_warmup": 4, "epochs": 3}, r"lr_warmup must be an int of epochs >= 0 and at most epochs \(3\), got 4"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov needs momentum > 0"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
    ({"label_smoothing": 0.1, "method": "part-mart"}, "label_smoothing applies to AT and TRADES .*not part-mart"),
    ({"label_smoothing": 0.1, "method": "trades", "lr_schedule": "cosine", "nesterov": True}, None),
])
def test_bad_config_is_a_clear_error(tmp_path, change, match):
    if match is None:  # a valid combination next to the refused ones
        tiny(tmp_path / "run", **change).resolved()
        return
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path / "run", **change).resolved()


@pytest.mark.parametrize("epochs, warmup", [(80, 20), (100, 25), (10, 2), (4, 1), (3, 0), (1, 0)])
def test_an_unset_warmup_is_a_quarter_of_the_epochs(tmp_path, epochs, warmup):
    assert tiny(tmp_path / "run", epochs=epochs, warmup=None).resolved().warmup == warmup
    assert TrainConfig(out="r", epochs=epochs).resolved().warmup == warmup  # None is the default


def test_the_resolved_warmup_is_saved_and_kept_by_a_longer_resume(tmp_path):
    """config.json holds the number the run trained with: --resume --epochs 8 on a 4-epoch run keeps its
    1 warm-up epoch (a quarter of 8 would be 2, a change of what was trained)."""
    out = tmp_path / "run"
    train(tiny(out, epochs=4, warmup=None, train_subset=32))  # one step per epoch
    assert json.loads((out / "config.json").read_text())["warmup"] == 1
    saved = json.loads((out / "config.json").read_text())
    history = train(TrainConfig.from_json({**saved, "epochs": 8}), resume=True)
    assert [r["phase"] for r in history] == ["warmup"] + ["part"] * 7
    assert json.loads((out / "config.json").read_text())["warmup"] == 1


def test_a_name_is_checked_before_the_numbers(tmp_path):
    # The warm-up is longer than the run and the architecture misspelt: the misspelling is what is reported.
    with pytest.raises(ValueError, match=r"^unknown architecture 'resnet-nope'; bundled: cnn-small, preact-resnet18, "
                                         r"resnet-small, resnet18, wrn34-10; any torchvision classification model"):
        tiny(tmp_path / "run", arch="resnet-nope", epochs=1, warmup=20).resolved()
    assert tiny(tmp_path / "run", arch="resnet50").resolved().arch == "resnet50"  # torchvision's, not built


def test_base_methods_ignore_warmup_beyond_epochs(tmp_path):
    # AT / TRADES / MART have no warm-up: `part-fast train --method at --epochs 10` must not fail on warmup=20.
    config = tiny(tmp_path / "run", method="at", epochs=10, warmup=20).resolved()
    assert lr_factor(9, config.warmup, config.milestones) == 1.0


def test_global_batch_must_split_evenly_across_processes(tmp_path):
    from part_fast.train.loaders import data_loaders

    with pytest.raises(ValueError, match="batch_size 33 must be divisible by the 2 processes"):
        data_loaders(tiny(tmp_path / "run", batch_size=33).resolved(), train_mod.Distributed(0, 2, 0))


def test_unknown_arch_fails_before_the_run_dir_exists(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture"):
        train(tiny(tmp_path / "run", arch="resnet-nope"))
    assert not (tmp_path / "run").exists()


def test_auto_device_is_resolved_where_the_run_starts_and_kept_auto_in_config_json(tmp_path, logged):
    from part_fast.devices import describe_device, resolve_device

    out = tmp_path / "run"
    train(tiny(out, epochs=1, train_subset=64))
    lines = logged.messages
    assert json.loads((out / "config.json").read_text())["device"] == "auto"
    assert lines[0] == f"part-fast train: device {describe_device(resolve_device('auto'))}"
    assert lines[0].startswith("part-fast train: device cuda:" if torch.cuda.is_available() else
                               "part-fast train: device cpu (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU resolution of 'auto'; this machine has CUDA")
def test_device_dependent_settings_are_checked_against_the_resolved_device(tmp_path):
    with pytest.raises(ValueError, match="amp fp16 needs a GPU"):
        train(tiny(tmp_path / "fp16", amp="fp16"))
    with pytest.raises(ValueError, match="sync_bn needs CUDA"):
        train(tiny(tmp_path / "sync", sync_bn=True))
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available here"):
        train(tiny(tmp_path / "cuda", device="cuda"))
    assert not any(tmp_path.iterdir()), "a refused run leaves no directory behind"


def test_a_dropped_partial_batch_is_said_once(tmp_path, logged):
    history = train(tiny(tmp_path / "odd", epochs=2, train_subset=100))
    dropped = [line for line in logged.messages if "left out" in line]
    assert dropped == ["part-fast train: 4 of the 100 training examples are left out of each epoch: only whole "
                       "batches of 32 are trained (the last partial batch is dropped), and which examples are left "
                       "out changes with each epoch's shuffle"]
    assert [r["train_examples"] for r in history] == [96, 96]
    logged.clear()
    train(tiny(tmp_path / "even", epochs=1, train_subset=64))
    assert logged.messages and not [line for line in logged.messages if "left out" in line]


# ------------------------------------------------------------------------------------------ TensorBoard
def _tensorboard_scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard reads RUN_DIR/tensorboard (restart purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected_scalars(run_dir) -> dict:
    """The numeric fields of metrics.jsonl per epoch, as TensorBoard should hold them."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected: dict = {}
    for r in records:
        for k, v in r.items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(k, []).append((r["epoch"], v))
    return expected


def test_tensorboard_holds_the_metrics_also_after_a_resume(tmp_path, one_thread):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'part_fast[tensorboard]')")
    out = tmp_path / "run"
    settings = dict(method="part-trades", train_subset=64, eval_examples=16, time_stages=True, tensorboard=True)
    train(tiny(out, epochs=1, **settings))
    # A resume writes a second event file; TensorBoard shows each epoch once, as metrics.jsonl has it.
    train(tiny(out, epochs=2, **settings), resume=True)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    expected, got = _expected_scalars(out), _tensorboard_scalars(out)
    assert {"train_loss", "test_pgd20_acc", "train_nat_acc", "attack_seconds", "lr"} <= set(expected)
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [1, 2], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 in TB


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` sees when it is missing
    with pytest.raises(ValueError, match=r'^tensorboard needs the tensorboard package, which is not installed: '
                                         r'pip install "part_fast\[tensorboard\]"$'):
        train(tiny(tmp_path / "run", tensorboard=True))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- run directory
def test_run_dir_contents_and_checkpoint_keys(tmp_path):
    out = tmp_path / "run"
    history = train(tiny(out, epochs=2, eval_examples=32, log_steps=True, time_stages=True))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "metrics.jsonl", "previous.pt",
                                                     "steps.jsonl"]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "part" and config["lr"] == 0.05 and config["step_size"] == 2 / 255
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(history))
    assert [r["epoch"] for r in lines] == [1, 2]
    assert [r["phase"] for r in lines] == ["warmup", "part"]
    for r in lines:
        assert r["train_examples"] == 96
        assert 0 <= r["test_nat_acc"] <= 100 and r["test_examples"] == 32
        parts = r["data_seconds"] + r["budget_seconds"] + r["attack_seconds"] + r["update_seconds"]
        assert 0 < parts <= r["epoch_seconds"]
    # Warm-up epochs have no budget (full eps everywhere); PART epochs give eps_low to most elements.
    assert lines[0]["eps_high_fraction"] == 1.0 and lines[0]["budget_seconds"] < 0.01
    assert 0 < lines[1]["eps_high_fraction"] < 0.6
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(s["epoch"], s["step"], s["global_step"]) for s in steps] == [
        (1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 1, 4), (2, 2, 5), (2, 3, 6)]
    ckpt = load_checkpoint(out / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step_in_epoch", "global_step", "config"} <= set(ckpt)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"], ckpt["steps_per_epoch"]) == (2, 0, 6, 3)
    assert ckpt["epoch_progress"] is None and ckpt["rank_buffers"] is None  # an epoch boundary
    assert ckpt["config"] == config and ckpt["metrics"] == lines
    # previous.pt is the checkpoint of the epoch before.
    assert load_checkpoint(out / "previous.pt")["global_step"] == 3


def test_existing_run_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(out))
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_with_another_config_is_refused(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, epochs=1))
    with pytest.raises(ValueError, match="--eps-low"):
        train(tiny(out, epochs=2, eps_low=6 / 255), resume=True)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """tiny(epochs=2), float32: (RUN_DIR, history)."""
    out = tmp_path_factory.mktemp("two_epochs") / "run"
    return out, train(tiny(out, epochs=2))


def test_same_seed_same_run_other_seed_other_run(tmp_path, two_epochs):
    a_dir, a = two_epochs
    b = train(tiny(tmp_path / "b", epochs=2))
    assert_same_weights(weights(a_dir), weights(tmp_path / "b"))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    train(tiny(tmp_path / "c", epochs=2, seed=4))
    assert not torch.equal(weights(a_dir)["linear.weight"], weights(tmp_path / "c")["linear.weight"])


RECIPE = {"lr_schedule": "cosine", "lr_warmup": 2, "nesterov": True, "label_smoothing": 0.1, "ema_decay": 0.5,
          "awp_gamma": 5e-3, "awp_warmup": 1, "train_subset": 112, "val_examples": 16}


@pytest.mark.parametrize("options", [{"method": "part-trades"}, {"method": "part", "epochs": 4, **RECIPE}],
                         ids=["part-trades", "part-recipe-of-2026"])
def test_resume_in_process_equals_uninterrupted(tmp_path, options):
    full = train(tiny(tmp_path / "full", **options))
    epochs = options.get("epochs", 3)
    train(tiny(tmp_path / "cut", **{**options, "epochs": epochs - 2}))
    resumed = train(tiny(tmp_path / "cut", **options), resume=True)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert without_timings(resumed) == without_timings(full)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == epochs
    if "lr_schedule" in options:  # lr 0.05: warm-up 1/2, 2/2, then cosine over 2 epochs: 1, 1/2
        assert [r["lr"] for r in full] == pytest.approx([0.025, 0.05, 0.05, 0.025])
        assert load_checkpoint(tmp_path / "cut" / "last.pt")["optimizer"]["param_groups"][0]["nesterov"] is True
        assert_same_weights(weights(tmp_path / "full", "best.pt"), weights(tmp_path / "cut", "best.pt"))
        assert "average.linear.weight" in weights(tmp_path / "full")


@pytest.mark.parametrize("method", ["at", "part-trades"])
def test_label_smoothing_reaches_the_outer_loss(tmp_path, monkeypatch, method):
    record, smoothing = METHOD[method], []

    def recorded(*args):
        smoothing.append(args[4])
        return record.outer_loss(*args)

    monkeypatch.setitem(METHOD, method, dataclasses.replace(record, outer_loss=recorded))
    train(tiny(tmp_path / "run", method=method, epochs=1, warmup=0, label_smoothing=0.1))
    assert smoothing == [0.1] * 3  # 96 images in batches of 32


def _poison_outer_loss(monkeypatch, method: str, after_calls: int):
    """Make `method`'s outer loss NaN from call after_calls + 1 on."""
    record = METHOD[method]
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = record.outer_loss(*args)
        return loss * float("nan") if calls["n"] > after_calls else loss

    monkeypatch.setitem(METHOD, method, dataclasses.replace(record, outer_loss=poisoned))


@pytest.mark.parametrize("save_every_steps", [0, 1])
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                              save_every_steps):
    """Steps do not wait to read the loss; the NaN is still caught before anything is written after it, and
    the error names the step where it began."""
    _poison_outer_loss(monkeypatch, "part", after_calls=4)  # epoch 1 has 3 steps: NaN from global step 5
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the part loss became non-finite \(nan or inf\) at global step 5 "
                                               r"\(epoch 2\)"):
        train(tiny(out, save_every_steps=save_every_steps, log_steps=True))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["global_step"] == (4 if save_every_steps else 3)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [s["global_step"] for s in step_lines(out)] == [1, 2, 3, 4]


def test_nan_loss_without_step_logs_is_caught_at_the_epoch_end(tmp_path, monkeypatch):
    _poison_outer_loss(monkeypatch, "part", after_calls=4)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"at global step 5 \(epoch 2\)"):
        train(tiny(out))
    assert load_checkpoint(out / "last.pt")["global_step"] == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_amp_bf16_and_channels_last_train_like_float32(tmp_path, two_epochs):
    _, fp32 = two_epochs
    bf16 = train(tiny(tmp_path / "bf16", epochs=2, amp="bf16", channels_last=True))
    assert [r["phase"] for r in bf16] == ["warmup", "part"]
    for a, b in zip(fp32, bf16):  # bf16 keeps 8 bits of mantissa: the losses agree to a few per cent
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
    assert 0 < bf16[1]["eps_high_fraction"] < 1
    assert bf16[1]["eps_high_fraction"] == pytest.approx(fp32[1]["eps_high_fraction"], abs=0.05)


@pytest.mark.parametrize("method", ["at", "trades", "mart", "part-mart"])
def test_every_method_trains(tmp_path, method):
    history = train(tiny(tmp_path / method, epochs=3, method=method, lr=0.02))
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    assert (history[0]["train_nat_acc"] is None) == (method in ("at", "part"))
    if method not in ("at", "part"):
        # Natural accuracy is measured on the clean batch the outer loss also sees: above the attacked one.
        assert history[-1]["train_nat_acc"] >= history[-1]["train_adv_acc"]


def test_train_step_budget_belongs_to_the_attacked_batch(tmp_path, monkeypatch):
    """The attack gets the budget of the augmented batch it attacks (the release's misalignment is
    impossible): recomputing the budget of the attacked x with the same weights gives the same map."""
    from part_fast.budget import PixelBudget

    checks = []
    real_call = PGD.__call__

    def spy(self, x, y=None, eps_map=None, **kw):
        if eps_map is not None and len(checks) < 3:
            budget = PixelBudget(8 / 255, 7 / 255, "gradcam", "jet", layer="features")
            same = torch.equal(budget(self.model, x), eps_map)
            other = torch.equal(budget(self.model, x.flip(0)), eps_map)
            checks.append((same, other))
        return real_call(self, x, y, eps_map=eps_map, **kw)

    monkeypatch.setattr(PGD, "__call__", spy)
    train(tiny(tmp_path / "run", epochs=2))
    assert checks == [(True, False)] * 3


# ------------------------------------------------------------------------------------------ real data
def test_trains_briefly_on_real_cifar10_images(tmp_path, cifar_subset_dir):
    history = train(tiny(tmp_path / "run", dataset="imagefolder", data_dir=str(cifar_subset_dir), epochs=2,
                         train_subset=128, test_subset=16, batch_size=64, eval_examples=16))
    assert [r["phase"] for r in history] == ["warmup", "part"]
    assert all(r["train_examples"] == 128 for r in history)
    assert 0 < history[1]["eps_high_fraction"] < 0.6
    assert history[1]["test_examples"] == 16


@pytest.mark.parametrize("method, start, phase, expected", [
    ("part", "uniform", False, ("ce", "uniform")),
    ("part", "uniform", True, ("ce", "uniform")),
    ("part", "release", False, ("ce", "uniform")),  # warm-up: the release's torchattacks PGD start (clipped)
    ("part", "release", True, ("ce", "release")),  # PART epochs: global eps, unclipped, as released
    ("part-trades", "uniform", True, ("kl", "normal")),
    ("mart", "release", False, ("ce", "normal")),
])
def test_inner_attack_per_method_and_phase(tmp_path, method, start, phase, expected):
    config = tiny(tmp_path / "run", method=method, start=start).resolved()
    state = train_mod.build_state(config, 10, torch.device("cpu"), train_mod.Distributed())
    attack = train_mod.inner_attack(state, part_phase=phase)
    assert (attack.loss, attack.start) == expected
    assert (attack.eps, attack.alpha, attack.steps) == (config.eps, config.step_size, config.steps)


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path):
    """--compile (torch.compile of the model; the CAM keeps the eager module for its hook) trains to the
    same losses as eager, up to the compiler's float reassociation."""
    eager = train(tiny(tmp_path / "eager", epochs=2, train_subset=64))
    compiled = train(tiny(tmp_path / "compiled", epochs=2, train_subset=64, compile=True))
    assert [r["phase"] for r in compiled] == ["warmup", "part"]
    for a, b in zip(eager, compiled):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3)


# ---------------------------------------------------------------------------- validation split, best.pt
def test_validation_split_is_disjoint_covering_and_fixed_by_the_seed():
    from part_fast.train.loaders import validation_split
    data = list(range(100))
    train_part, val_part = validation_split(data, 30, seed=3)
    assert len(val_part) == 30 and len(train_part) == 70
    assert set(train_part.indices).isdisjoint(val_part.indices) and set(train_part.indices) | set(val_part.indices) == set(data)
    assert val_part.indices == sorted(val_part.indices)
    assert validation_split(data, 30, seed=3)[1].indices == val_part.indices
    assert validation_split(data, 30, seed=4)[1].indices != val_part.indices
    for n in (0, 100):
        with pytest.raises(ValueError, match="val_examples must be between 1 and the training set's size - 1 \\(99\\)"):
            validation_split(data, n, seed=3)


def test_the_training_loader_never_yields_a_validation_image(tmp_path):
    from part_fast.train.distributed import Distributed
    from part_fast.train.loaders import data_loaders
    config = tiny(tmp_path / "run", train_subset=128, val_examples=32).resolved()
    loaders = data_loaders(config, Distributed())

    def images(loader):
        return [bytes(x.numpy().tobytes()) for xb, _ in loader for x in xb]

    loaders.sampler.set_epoch(0)
    trained, validated = images(loaders.train), images(loaders.validation)
    assert len(trained) == 96 and len(validated) == 32
    assert not set(trained) & set(validated)
    everything = {bytes(x.numpy().tobytes()) for x, _ in train_mod.loaders.data_mod.build_datasets(
        "shapes", train_subset=128, test_subset=32, seed=3)[0]}
    assert set(trained) | set(validated) == everything
    with pytest.raises(ValueError, match="the training set has 96 examples once the 32 validation examples are held out, "
                                         "fewer than one batch of 128"):
        data_loaders(tiny(tmp_path / "r2", train_subset=128, val_examples=32, batch_size=128).resolved(), Distributed())


def test_best_checkpoint_is_the_epoch_with_the_best_validation_pgd(tmp_path, monkeypatch):
    from part_fast.train import loop
    scripted = iter([10.0, 30.0, 30.0, 20.0])  # the validation PGD-20 accuracy of epochs 1-4

    def fake_evaluate(model, loader, **kw):
        return {"natural": 50.0, "pgd20": next(scripted), "examples": len(loader.dataset)}

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    history = train(tiny(out, epochs=4, train_subset=128, val_examples=32, eval_examples=0))
    assert [r["val_pgd20_acc"] for r in history] == [10.0, 30.0, 30.0, 20.0]
    assert [r["best_epoch"] for r in history] == [1, 2, 2, 2]  # a tie keeps the earlier epoch
    assert all(r["val_examples"] == 32 and r["train_examples"] == 96 for r in history)
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert (best["epoch"], best["global_step"], last["epoch"]) == (2, 6, 4)
    assert best["metrics"] == history[:2]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl", "previous.pt"]
