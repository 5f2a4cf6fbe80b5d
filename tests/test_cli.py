"""The `part-fast` command line: parsing, errors, eval, show-cam, demo."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from part_fast import cli
from part_fast.demo import DemoSettings, budget_on_object, run_demo, summary_table


TRAIN = ["train", "--dataset", "shapes", "--arch", "cnn-small", "--epochs", "2", "--warmup", "1", "--batch-size", "32",
         "--steps", "1", "--train-subset", "64", "--test-subset", "32", "--eval-examples", "0"]


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.5", 0.5), (" 2/255 ", 2 / 255), ("0", 0.0), ("3", 3.0),
                                         ("1.5/255", 1.5 / 255)])
def test_fraction(text, value):
    assert cli.fraction(text) == value


@pytest.mark.parametrize("text", ["8/0", "a/255", "", "8//255", "nan", "inf", "1/2/3"])
def test_fraction_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="fraction like 8/255"):
        cli.fraction(text)


def test_train_flags_reach_the_config():
    args = cli.build_parser().parse_args(TRAIN + ["--out", "r", "--eps", "6/255", "--eps-low", "5/255", "--step-size", "1/255",
                                                  "--milestones", "3,5", "--mask", "cam", "--cam", "layercam",
                                                  "--no-augment", "--amp", "bf16", "--method", "part-trades"])
    cfg = cli.config_from_args(args)
    assert (cfg.eps, cfg.eps_low, cfg.step_size) == (6 / 255, 5 / 255, 1 / 255)
    assert cfg.milestones == (3, 5) and cfg.mask == "cam" and cfg.cam == "layercam"
    assert cfg.augment is False and cfg.amp == "bf16" and cfg.method == "part-trades"
    # Unset flags stay None and take the dataset's released values.
    default = cli.config_from_args(cli.build_parser().parse_args(["train", "--out", "r", "--dataset", "svhn"]))
    assert default.lr is None and default.resolved().weight_decay == 0.0035


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(TRAIN + ["--out", str(tmp_path / "r"), "--eps-low", "9/255"]) == 2
    err = capsys.readouterr().err
    assert "error: need 0 <= eps_low <= eps" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists(), "a refused run must not leave a directory behind"
    assert cli.main(TRAIN + ["--out", str(tmp_path / "r"), "--dataset", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "--download" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--arch", "resnet-nope"], "error: unknown architecture 'resnet-nope'"),
    (["--dataset", "imagefolder", "--data-dir", "MISSING"], "error: "),
])
def test_library_user_errors_are_one_line(tmp_path, capsys, flags, message):
    flags = [str(tmp_path / "missing") if f == "MISSING" else f for f in flags]
    assert cli.main(TRAIN + ["--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_internal_value_error_keeps_its_traceback(tmp_path, monkeypatch):
    """A bare ValueError from the command line's own code can only be a bug: it is not dressed as a user
    error (exit 2, one line) but propagates with its traceback."""
    def broken(_args):
        raise ValueError("a bug, not the user's fault")

    monkeypatch.setitem(cli.COMMANDS, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(TRAIN + ["--out", str(tmp_path / "r")])


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TRAIN + ["--out", "x", "--eps", "eight"])
    assert exit_info.value.code == 2
    assert "fraction like 8/255" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(TRAIN + ["--out", str(out), "--seed", "1"]) == 0
    return out


def test_python_dash_m_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "part_fast", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "show-cam" in done.stdout and "demo" in done.stdout


def test_eval_writes_table_and_json(trained_run, capsys, tmp_path):
    path = tmp_path / "e.json"
    assert cli.main(["eval", str(trained_run / "last.pt"), "--attacks", "natural,pgd20", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| natural |" in printed and "| PGD-20 |" in printed
    assert "AutoAttack check" not in printed  # no AutoAttack, no checks
    result = json.loads(path.read_text())
    assert result["examples"] == 32 and 0 <= result["pgd20"] <= result["natural"] <= 100
    assert result["step_size"] == 2 / 255
    assert cli.main(["eval", str(trained_run / "last.pt"), "--attacks", "natural,fgsm"]) == 2


def test_eval_labels_the_release_autoattack_and_checks_the_model_first(trained_run, capsys, tmp_path):
    path = tmp_path / "e.json"
    assert cli.main(["eval", str(trained_run / "last.pt"), "--attacks", "natural,aa-release", "--test-subset", "8",
                     "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| aa-release (torchattacks AA as released: 10 iterations, weaker) |" in printed
    result = json.loads(path.read_text())
    assert result["labels"]["aa-release"] == "aa-release (torchattacks AA as released: 10 iterations, weaker)"
    checks = [c["check"] for c in result["autoattack_checks"]]
    assert checks == ["logits", "deterministic", "eval mode", "input gradients"]
    for check in result["autoattack_checks"]:
        assert f"AutoAttack check {check['check']}: {'pass' if check['passed'] else 'FAIL'}" in printed
    assert printed.index("AutoAttack check logits") < printed.index("| attack |")
    assert 0 <= result["aa-release"] <= result["natural"]


def test_show_cam_writes_a_png(trained_run, tmp_path):
    png = tmp_path / "cams.png"
    assert cli.main(["show-cam", str(trained_run / "last.pt"), "--out", str(png), "--n", "5"]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


def test_budget_on_object_counts_what_it_says():
    class Fixed:  # a stand-in budget: full eps exactly on the left half of every image
        eps = 1.0

        def __call__(self, model, x):
            m = torch.zeros(x.shape[0], 3, 4, 4)
            m[..., :2] = 1.0
            return m

    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :, :1] = True  # object = first column: half of the full-eps elements, a quarter of the pixels
    got = budget_on_object(None, torch.zeros(2, 3, 4, 4), masks, Fixed())
    assert got == {"full_eps_on_object": 0.5, "object_share_of_pixels": 0.25, "full_eps_share": 0.5}


@pytest.mark.slow
def test_demo_runs_small(tmp_path, logged):
    settings = DemoSettings(train_size=128, test_size=64, epochs=2, warmup=1, batch_size=64, steps=1)
    results = run_demo(tmp_path / "demo", settings)
    lines = logged.messages
    for method in ("at", "part"):
        r = results[method]
        assert 0 <= r["pgd20"] <= r["natural"] <= 100
        assert sum(r["time_share"].values()) == pytest.approx(1.0)
    assert results["at"]["time_share"]["budget"] < 0.01 < results["part"]["time_share"]["budget"]
    b = results["part"]["budget"]
    assert 0 < b["object_share_of_pixels"] < 1 and 0 <= b["full_eps_on_object"] <= 1
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["at", "budget_maps.png", "part", "summary.json", "summary.md"]
    assert "| PART |" in lines[-2] and summary_table(results) == lines[-2]
    # The trainer's epoch lines, indented under the demo's, and each seen by the epoch-load sampler.
    assert [line.split(" [")[0] for line in lines if line.startswith("  epoch ")] == ["  epoch 1/2", "  epoch 2/2"] * 2
    assert all(isinstance(c, float) for m in ("at", "part") for c in results[m]["other_processes_cores"])
    with pytest.raises(FileExistsError):
        run_demo(tmp_path / "demo", settings)


def test_train_help_shows_every_setting_with_its_default(capsys):
    import dataclasses

    from part_fast.train import TrainConfig

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in dataclasses.fields(TrainConfig):
        if f.name != "out":
            assert (f.metadata.get("flag") or "--" + f.name.replace("_", "-")) in text, f.name
    for shown in ("--eps EPS L-inf budget of the important pixels (and of AT) (default: 8/255)",
                  "(default: 7/255)", "--epochs EPOCHS epochs in all, warm-up included (default: 80)",
                  "(default: 60,90)", "--save-every-minutes", "(default: 10.0)", "--auto-resume"):
        assert shown in text, shown
