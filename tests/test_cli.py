"""The `part-fast` command line: parsing and --help, one-line user errors (budgets written as k/255, names
checked before numbers), the device each command uses and says, training's messages (warm-up default, the
dropped partial batch, Ctrl-C and resume hints), eval / show-cam / demo, output folders, TensorBoard logs and
`part-fast plot`."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from part_fast import cli, plots
from part_fast.demo import DemoSettings, budget_on_object, run_demo, summary_table
from part_fast.devices import describe_device, resolve_device
from part_fast.train import loop, rundir

# Small models: one intra-op thread is as fast, and never waits for a busy core (conftest's one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--dataset", "shapes", "--arch", "cnn-small", "--epochs", "2", "--warmup", "1", "--batch-size", "32",
         "--steps", "1", "--train-subset", "64", "--test-subset", "32", "--eval-examples", "0"]
# 64 shapes images in batches of 32: two steps per epoch.
TINY = ["--dataset", "shapes", "--arch", "cnn-small", "--train-subset", "64", "--test-subset", "32",
        "--batch-size", "32", "--steps", "1", "--eval-examples", "32"]


def device_here() -> str:
    """How the commands describe the device they pick by default (its thread count as set now)."""
    return describe_device(resolve_device("auto"))


def one_line_error(capsys, code: int, prefix: str) -> str:
    """The command's stderr, checked to be the one line of a user error (no traceback); returned."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(prefix + ": error: "), err
    return err.strip()


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-epoch run with per-stage times and TensorBoard logs, trained through the command line: what
    eval, show-cam and plot read."""
    out = tmp_path_factory.mktemp("cli") / "run"
    flags = TINY + ["--epochs", "2", "--warmup", "1", "--time-stages", "--seed", "1"]
    if _has_tensorboard():
        flags.append("--tensorboard")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model: one thread is as fast, and never waits for a busy core
    try:
        assert cli.main(["train", "--out", str(out), *flags]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# ---------------------------------------------------------------------------------- parsing and --help
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
    config = cli.config_from_args(args)
    assert (config.eps, config.eps_low, config.step_size) == (6 / 255, 5 / 255, 1 / 255)
    assert config.milestones == (3, 5) and config.mask == "cam" and config.cam == "layercam"
    assert config.augment is False and config.amp == "bf16" and config.method == "part-trades"
    # Unset flags stay None and take the dataset's released values.
    default = cli.config_from_args(cli.build_parser().parse_args(["train", "--out", "r", "--dataset", "svhn"]))
    assert default.lr is None and default.resolved().weight_decay == 0.0035


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


def _option_actions(parser):
    return [a for a in parser._actions if a.option_strings and a.help != "show this help message and exit"]


@pytest.mark.parametrize("command", ["train", "eval", "demo", "show-cam", "plot", "check"])
def test_help_shows_every_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping, which may break a line inside a word like --max-restarts
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    options = _option_actions(sub)
    assert len(options) >= (30 if command == "train" else 1)
    for action in options:
        if action.required:  # train --out: no default to show
            continue
        shown = " ".join((action.help % {}).split())
        assert shown.endswith(")") and "(default: " in shown, action.option_strings
        assert shown in text, action.option_strings
    if command == "train":
        for line in ("--warmup WARMUP epochs of the base method before PART",
                     "(default: a quarter of --epochs, rounded down: 20 of 80, 0 below 4)",
                     "--device DEVICE auto (cuda when there is a GPU, else cpu) | cpu | cuda | cuda:N",
                     "--resume continue the run", "(default: off)"):
            assert line in text, line


# ------------------------------------------------------------------------------------------ user errors
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


def test_budgets_in_errors_are_written_in_255ths(tmp_path, capsys):
    code = cli.main(["train", "--out", str(tmp_path / "r"), *TINY, "--eps", "4/255", "--eps-low", "8/255"])
    err = one_line_error(capsys, code, "part-fast train")
    assert err.endswith("got eps_low=8/255 (0.0314) > eps=4/255 (0.0157)")


@pytest.mark.parametrize("flag, name", [("--eps", "eps"), ("--eps-low", "eps_low"), ("--step-size", "step_size")])
def test_a_budget_above_one_gets_a_hint(tmp_path, capsys, flag, name):
    code = cli.main(["train", "--out", str(tmp_path / "r"), *TINY, flag, "8"])
    err = one_line_error(capsys, code, "part-fast train")
    assert err == (f"part-fast train: error: {name} must be in [0, 1], got {name}=2040/255 (8.0000); inputs are in "
                   "[0, 1], so a budget above 1 is never meant: did you mean 8/255 (0.0314)?")


def test_eval_budgets_are_checked_with_the_hint(run_dir, capsys):
    err = one_line_error(capsys, cli.main(["eval", str(run_dir / "last.pt"), "--eps", "8"]), "part-fast eval")
    assert err == ("part-fast eval: error: --eps must be in [0, 1], got --eps=2040/255 (8.0000); inputs are in [0, 1], "
                   "so a budget above 1 is never meant: did you mean 8/255 (0.0314)?")
    err = one_line_error(capsys, cli.main(["eval", str(run_dir / "last.pt"), "--step-size", "2"]), "part-fast eval")
    assert "--step-size=510/255 (2.0000)" in err and "did you mean 2/255 (0.0078)?" in err


# ----------------------------------------------------------------------------------- train: the device
def test_a_one_epoch_run_says_its_device_and_needs_no_warmup_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY, "--epochs", "1", "--eval-examples", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"part-fast train: device {device_here()}"
    assert "epoch 1/1 [part]" in printed  # a quarter of 1 epoch: no warm-up
    assert "left out" not in printed, "64 examples are two whole batches: nothing dropped, nothing said"
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "auto", "a resume elsewhere picks its own"
    assert config["warmup"] == 0


def test_eval_and_show_cam_say_their_device_and_create_a_missing_output_folder(run_dir, tmp_path, capsys):
    report = tmp_path / "reports" / "eval.json"
    assert cli.main(["eval", str(run_dir / "last.pt"), "--attacks", "natural", "--json", str(report)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"part-fast eval: device {device_here()}"
    assert json.loads(report.read_text())["device"] == str(resolve_device("auto"))
    assert json.loads(report.read_text())["examples"] == 32
    png = tmp_path / "new" / "deeper" / "cams.png"
    assert cli.main(["show-cam", str(run_dir / "last.pt"), "--out", str(png), "--n", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"part-fast show-cam: device {describe_device(torch.device('cpu'))}"
    assert printed[-1] == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_forwards_its_device(tmp_path, monkeypatch):
    """run_demo's device keyword: the demo trains and evaluates where the command says (and says where)."""
    calls = []
    monkeypatch.setattr("part_fast.demo.run_demo", lambda out, settings, **kw: calls.append((out, settings, kw)))
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--device", "cpu", "--seed", "3"]) == 0
    (out, settings, kw), = calls
    assert out == str(tmp_path / "d") and settings.seed == 3 and kw == {"device": "cpu"}
    assert cli.main(["demo", "--out", str(tmp_path / "e")]) == 0
    assert calls[-1][2] == {"device": "auto"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it; this one has CUDA")
@pytest.mark.parametrize("command", [["train", "--out", "{tmp}/run", "--dataset", "shapes", "--arch", "cnn-small"],
                                     ["eval", "{tmp}/last.pt"], ["show-cam", "{tmp}/last.pt"], ["demo", "--out", "{tmp}/d"]])
def test_a_cuda_device_without_cuda_is_one_line(tmp_path, capsys, command):
    args = [a.format(tmp=tmp_path) for a in command] + ["--device", "cuda"]
    err = one_line_error(capsys, cli.main(args), f"part-fast {command[0]}")
    assert err.endswith("device 'cuda' requested but CUDA is not available here; use --device cpu or auto")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ train: what it says
def test_an_explicit_warmup_longer_than_the_run_is_one_line(tmp_path, capsys):
    code = cli.main(["train", "--out", str(tmp_path / "r"), *TINY, "--epochs", "3", "--warmup", "20"])
    err = one_line_error(capsys, code, "part-fast train")
    assert err == ("part-fast train: error: warmup (20) must not exceed epochs (3) for part: the warm-up epochs are "
                   "part of the epochs; lower warmup, or leave it unset for a quarter of the epochs (0 here)")
    assert not (tmp_path / "r").exists()


def test_an_unknown_arch_is_reported_before_any_number(tmp_path, capsys):
    code = cli.main(["train", "--out", str(tmp_path / "r"), "--arch", "resnet-nope", "--epochs", "1", "--warmup", "20",
                     "--eps", "9"])
    err = one_line_error(capsys, code, "part-fast train")
    assert err == ("part-fast train: error: unknown architecture 'resnet-nope'; bundled: cnn-small, preact-resnet18, "
                   "resnet-small, resnet18, wrn34-10; any torchvision classification model name works too "
                   "(e.g. resnet50)")


def test_the_demo_output_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a source checkout (this is an installed copy)")
    done = subprocess.run(["git", "check-ignore", "-v", "runs/demo-20260101-000000/summary.json"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and ".gitignore" in done.stdout, done.stdout + done.stderr


def test_an_output_folder_that_cannot_be_made_names_the_users_path(run_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    png = tmp_path / "file" / "cams.png"
    err = one_line_error(capsys, cli.main(["show-cam", str(run_dir / "last.pt"), "--out", str(png), "--n", "2"]),
                         "part-fast show-cam")
    assert err.startswith(f"part-fast show-cam: error: --out: cannot create the folder {tmp_path / 'file'}: ")
    assert ".tmp-" not in err


def test_a_second_ctrl_c_after_a_checkpoint_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt (Ctrl-C pressed again: stop at once) arriving after epoch 1's checkpoint."""
    def interrupted(out, history):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "write_metrics", interrupted)  # runs right after the epoch's checkpoint
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY, "--epochs", "2", "--eval-examples", "0"]) == 130
    assert capsys.readouterr().err == (f"part-fast train: interrupted at once, nothing more saved; the checkpoints in "
                                       f"{out} are kept; resume with: part-fast train --out {out} --resume\n")
    assert (out / "last.pt").is_file()


def test_a_ctrl_c_before_any_checkpoint_says_what_resume_does(tmp_path, monkeypatch, capsys):
    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_step", interrupted)
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY, "--epochs", "2"]) == 130
    assert capsys.readouterr().err == (f"part-fast train: interrupted at once, nothing more saved; no checkpoint was "
                                       f"written yet: part-fast train --out {out} --resume starts the run again from "
                                       "its first step\n")


def test_train_says_when_the_last_partial_batch_is_dropped(tmp_path, capsys):
    flags = [f if f != "64" else "70" for f in TINY]  # --train-subset 70: 2 batches of 32, 6 left out
    assert cli.main(["train", "--out", str(tmp_path / "r"), *flags, "--epochs", "1", "--eval-examples", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == ("part-fast train: 6 of the 70 training examples are left out of each epoch: only whole "
                          "batches of 32 are trained (the last partial batch is dropped), and which examples are left "
                          "out changes with each epoch's shuffle")


def test_resume_hint_under_torchrun_keeps_the_launch(monkeypatch):
    """One process resumes with part-fast; under torchrun the hint keeps torchrun (a plain part-fast line
    would bring the job back as a single process)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli._resume_command("RUN") == "part-fast train --out RUN --resume"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli._resume_command("RUN") == ("the same torchrun command with --resume (or --auto-resume), e.g. "
                                          "torchrun ... -m part_fast train --out RUN --resume")


def test_resume_with_fewer_epochs_than_the_warmup_says_what_can_change(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--dataset", "shapes", "--arch", "cnn-small", "--train-subset", "64", "--test-subset", "16",
             "--batch-size", "32", "--steps", "1", "--eval-examples", "0", "--epochs", "2", "--warmup", "2"]
    assert cli.main(["train", "--out", str(out), *flags]) == 0
    capsys.readouterr()
    code = cli.main(["train", "--out", str(out), "--resume", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"part-fast train: error: --epochs 1: this run warms up for 2 epochs (its config.json); "
                                 "a resumed run's --epochs must be at least 2\n")


# ------------------------------------------------------------------------------------ eval, show-cam
def test_eval_writes_table_and_json(run_dir, capsys, tmp_path):
    path = tmp_path / "e.json"
    assert cli.main(["eval", str(run_dir / "last.pt"), "--attacks", "natural,pgd20", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| natural |" in printed and "| PGD-20 |" in printed
    assert "AutoAttack check" not in printed  # no AutoAttack, no checks
    result = json.loads(path.read_text())
    assert result["examples"] == 32 and 0 <= result["pgd20"] <= result["natural"] <= 100
    assert result["step_size"] == 2 / 255
    assert cli.main(["eval", str(run_dir / "last.pt"), "--attacks", "natural,fgsm"]) == 2


def test_eval_labels_the_release_autoattack_and_checks_the_model_first(run_dir, capsys, tmp_path):
    path = tmp_path / "e.json"
    assert cli.main(["eval", str(run_dir / "last.pt"), "--attacks", "natural,aa-release", "--test-subset", "8",
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


def test_show_cam_writes_a_png(run_dir, tmp_path):
    png = tmp_path / "cams.png"
    assert cli.main(["show-cam", str(run_dir / "last.pt"), "--out", str(png), "--n", "5"]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


# --------------------------------------------------------------------------------------------- demo
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


# ----------------------------------------------------------------------------- TensorBoard and plot
def test_tensorboard_scalars_equal_the_metrics(run_dir):
    if not _has_tensorboard():
        pytest.skip("tensorboard is not installed: pip install 'part_fast[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    numeric = sorted(k for k, v in records[0].items() if k != "epoch" and isinstance(v, (int, float)))
    assert {"train_loss", "test_nat_acc", "test_pgd20_acc", "attack_seconds", "epoch_seconds"} <= set(numeric)
    assert sorted(acc.Tags()["scalars"]) == numeric
    for tag in numeric:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[tag] for r in records], rel=1e-6), tag


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` sees when it is missing
    code = cli.main(["train", "--out", str(tmp_path / "r"), *TINY, "--tensorboard"])
    err = one_line_error(capsys, code, "part-fast train")
    assert err == ('part-fast train: error: tensorboard needs the tensorboard package, which is not installed: '
                   'pip install "part_fast[tensorboard]"')
    assert not (tmp_path / "r").exists()


@pytest.fixture
def fake_curves(monkeypatch):
    """Stands in for plots.training_curves_png (tests/test_plots.py tests the drawing): records its arguments,
    writes a file."""
    calls = []

    def training_curves_png(records, path, title):
        calls.append((records, Path(path), title))
        Path(path).write_bytes(b"\x89PNG fake")
        return Path(path)

    monkeypatch.setattr(plots, "training_curves_png", training_curves_png)
    return calls


def test_plot_draws_the_metrics_of_a_run(run_dir, tmp_path, capsys, fake_curves):
    assert cli.main(["plot", str(run_dir), "--out", str(tmp_path / "figs" / "c.png")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'figs' / 'c.png'}\n"
    (records, path, title), = fake_curves
    assert records == [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert path == tmp_path / "figs" / "c.png" and path.is_file()
    assert title == "part, shapes, cnn-small, eps 8/255 (0.0314)"
    assert cli.main(["plot", str(run_dir)]) == 0  # default: RUN_DIR/curves.png
    assert fake_curves[-1][1] == run_dir / "curves.png"
    (run_dir / "curves.png").unlink()


def test_plot_with_the_real_drawing(run_dir, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert cli.main(["plot", str(run_dir), "--out", str(png)]) == 0
    assert capsys.readouterr().out == f"wrote {png}\n"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:  # three panels stacked: taller than wide, and not blank
        assert image.height > image.width and len(set(image.convert("L").getdata())) > 10


def _copy_run(run_dir, where: Path, metrics: str | None) -> Path:
    where.mkdir()
    shutil.copy(run_dir / "config.json", where / "config.json")
    if metrics is not None:
        (where / "metrics.jsonl").write_text(metrics)
    return where


@pytest.mark.parametrize("case, message", [
    ("no run dir", "part-fast plot: error: run directory {run} does not exist"),
    ("no config", "part-fast plot: error: {run} holds no part_fast run (no config.json)"),
    ("no metrics", "part-fast plot: error: {run}/metrics.jsonl does not exist: no epoch of this run has finished yet"),
    ("empty", "part-fast plot: error: {run}/metrics.jsonl is empty: no epoch of this run has finished yet"),
    ("damaged", "part-fast plot: error: {run}/metrics.jsonl line 2 is damaged (Expecting ',' delimiter); every "
                "line is one epoch's JSON record"),
    ("not a record", "part-fast plot: error: {run}/metrics.jsonl line 1 is damaged (not a JSON object); every line "
                     "is one epoch's JSON record"),
])
def test_plot_errors_are_one_line(run_dir, tmp_path, capsys, fake_curves, case, message):
    first = (run_dir / "metrics.jsonl").read_text().splitlines()[0]
    run = tmp_path / "run"
    if case == "no config":
        run.mkdir()
        (run / "metrics.jsonl").write_text(first + "\n")
    elif case != "no run dir":
        metrics = {"no metrics": None, "empty": "", "damaged": first + "\n" + first[:40] + "\n",
                   "not a record": "[1, 2]\n"}[case]
        _copy_run(run_dir, run, metrics)
    err = one_line_error(capsys, cli.main(["plot", str(run)]), "part-fast plot")
    assert err == message.format(run=run)
    assert not fake_curves and not (run / "curves.png").exists()
