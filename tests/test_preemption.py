"""Stopping and continuing one process: SIGTERM / SIGINT, SIGKILL, step-level checkpoints, --auto-resume, and
resuming from the run's own config.json. The runs end equal to conftest's mid_run (helpers.MID, trained once
in the test process)."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from helpers import (MID, MID_FLAGS, MID_STEPS, assert_same_weights, cli_train, env, metric_lines, step_lines,
                     tiny, wait_for_steps, weights, without_timings)
from part_fast import cli
from part_fast.errors import Interrupted
from part_fast.train import load_checkpoint, loop, train
from part_fast.train.rundir import RunDirError


def _signal_during_step(monkeypatch, k: int, *signums: int):
    """Send `signums` to this process at the start of optimiser step k (1-based), as a scheduler would."""
    real = loop.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            for s in signums:
                os.kill(os.getpid(), s)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_writes_an_exact_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, mid_run,
                                                                                 one_thread, signum):
    ref, ref_history, _ = mid_run
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _signal_during_step(monkeypatch, 11, signum)  # epoch 2, step 3
    out = tmp_path / "cut"
    with pytest.raises(Interrupted) as stopped:
        train(tiny(out, **MID))
    err = stopped.value
    assert (err.signum, err.exit_code, err.global_step) == (signum, 128 + signum, 11)
    assert f"stopped by {signal.Signals(signum).name} after step 11 (epoch 2, step 3/8)" in str(err)
    assert err.checkpoint == str(out / "last.pt")
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 3, 11)
    assert len(ckpt["epoch_progress"]) == 1 and ckpt["epoch_progress"][0]["steps"] == 3  # one rank, 3 steps summed
    assert len(step_lines(out)) == 11 and len(metric_lines(out)) == 1
    assert {s: signal.getsignal(s) for s in before} == before, "the caller's signal handlers are restored"

    monkeypatch.undo()
    resumed = train(tiny(out, **MID), resume=True)
    assert_same_weights(weights(ref), weights(out))
    assert without_timings(resumed) == without_timings(ref_history)
    assert [s["loss"] for s in step_lines(out)] == [s["loss"] for s in step_lines(ref)]


@pytest.mark.parametrize("signums", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM),
                                     (signal.SIGTERM, signal.SIGINT)])
def test_a_repeated_or_forwarded_signal_is_the_same_request(tmp_path, monkeypatch, one_thread, signums):
    """Under torchrun, Ctrl-C reaches a worker twice (from the terminal and forwarded by torchrun): still
    one request, and the checkpoint is written."""
    _signal_during_step(monkeypatch, 5, *signums)
    with pytest.raises(Interrupted, match=rf"stopped by {signal.Signals(signums[0]).name} after step 5 "):
        train(tiny(tmp_path / "run", **MID))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["global_step"] == 5


def test_ctrl_c_pressed_again_stops_at_once_without_saving(tmp_path, monkeypatch, one_thread):
    from part_fast.train import preemption

    before = signal.getsignal(signal.SIGINT)
    now = {"t": 0.0}
    monkeypatch.setattr(preemption, "_clock", lambda: now["t"])
    real = loop.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            now["t"] += preemption.REPEAT_WINDOW + 0.5  # a person pressing Ctrl-C again
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(out, **MID))
    assert not (out / "last.pt").exists(), "no checkpoint of an interrupted step"
    assert signal.getsignal(signal.SIGINT) is before


def test_signal_during_the_epoch_end_evaluation_stops_after_the_epoch_checkpoint(tmp_path, monkeypatch, one_thread):
    real = loop.evaluate

    def signalled_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", signalled_evaluate)
    with pytest.raises(Interrupted, match=r"after step 8 \(after epoch 1\)"):
        train(tiny(tmp_path / "run", **MID, eval_examples=16))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 0, 8)
    assert ckpt["metrics"][0]["test_examples"] == 16, "the evaluation finished and is in the checkpoint"


def _saved_positions(monkeypatch) -> list[tuple[int, int, int]]:
    saved = []
    real = loop.checkpoint.save

    def spy(path, ckpt, **kw):
        saved.append((ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]))
        return real(path, ckpt, **kw)

    monkeypatch.setattr(loop.checkpoint, "save", spy)
    return saved


def test_save_every_steps(mid_run):
    saved = mid_run[2]  # --save-every-steps 3, --save-every-minutes 0
    # Every 3 steps, and at each epoch's end (a step save falling on the end is not written twice).
    assert [g for _, _, g in saved] == [3, 6, 8, 9, 12, 15, 16]
    assert saved[1] == (0, 6, 6) and saved[2] == (1, 0, 8)


def test_save_every_minutes_by_rank_0s_clock(tmp_path, monkeypatch, one_thread):
    saved = _saved_positions(monkeypatch)
    now = {"t": 1000.0}
    monkeypatch.setattr(loop, "_clock", lambda: now["t"])
    real = loop.train_step

    def step_taking_25_s(*args, **kwargs):
        now["t"] += 25.0
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_taking_25_s)
    train(tiny(tmp_path / "run", **MID, save_every_minutes=1))
    # Due once 60 s passed since the last checkpoint (75 s = 3 steps); the epoch's checkpoint restarts the clock.
    assert [g for _, _, g in saved] == [3, 6, 8, 11, 14, 16]


def test_cli_sigterm_in_a_real_process_then_resume_with_only_out(tmp_path, mid_run, one_thread, capsys):
    """SIGTERM to a real `part-fast train` process: exit 143, two lines on stderr and an exact checkpoint;
    `part-fast train --out RUN --resume` then ends equal to the uninterrupted run."""
    ref = mid_run[0]
    out = tmp_path / "cut"
    proc = subprocess.Popen(cli_train(out, *MID_FLAGS), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert lines[0] == "part-fast: SIGTERM received: stopping after this step and writing a checkpoint"
    assert lines[-1].startswith("part-fast train: stopped by SIGTERM after step ")
    assert lines[-1].endswith(f"; checkpoint {out / 'last.pt'}; resume with: part-fast train --out {out} --resume")
    assert "Traceback" not in stderr and len(lines) == 2
    ckpt = load_checkpoint(out / "last.pt")
    assert 3 <= ckpt["global_step"] < MID_STEPS and ckpt["global_step"] == len(step_lines(out))

    assert cli.main(["train", "--out", str(out), "--resume"]) == 0  # in this process: the resume is not the point
    assert f"resumed {out} at step {ckpt['global_step']}" in capsys.readouterr().out
    assert_same_weights(weights(ref), weights(out))
    assert [s["loss"] for s in step_lines(out)] == [s["loss"] for s in step_lines(ref)]
    assert [m["epoch"] for m in metric_lines(out)] == [1, 2]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, mid_run, one_thread):
    """SIGKILL the training process at three points (before the first checkpoint, in the middle of epoch 1,
    in the middle of epoch 2), resume each time with only --out: the final weights, every step's loss and the
    metrics equal the uninterrupted run's, and at most 2 steps (--save-every-steps 2) are redone."""
    ref = mid_run[0]
    out = tmp_path / "killed"
    positions = []
    for kill_after in (1, 7, 13):  # global steps; 8 per epoch
        args = cli_train(out, "--resume") if out.exists() else cli_train(out, *MID_FLAGS, "--save-every-steps", "2")
        proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_steps(out, kill_after, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever was on disk is whole: the checkpoint (if any) loads, the metrics parse.
        if (out / "last.pt").exists():
            ckpt = load_checkpoint(out / "last.pt")
            positions.append((ckpt["epoch"], ckpt["step_in_epoch"]))
            metrics = out / "metrics.jsonl"  # written at the first epoch's end
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            assert len(lines) in (ckpt["epoch"] - 1, ckpt["epoch"])  # killed between the two writes at worst
            assert len(step_lines(out)) - ckpt["global_step"] <= 3  # one torn or unsaved step beyond the cadence
    assert any(0 < step < 8 for _, step in positions), f"no kill landed mid-epoch: {positions}"
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0  # in this process: the resume is not the point
    assert_same_weights(weights(ref), weights(out))
    assert (out / "metrics.jsonl").read_text().count("\n") == 2
    assert [s["loss"] for s in step_lines(out)] == [s["loss"] for s in step_lines(ref)]
    assert [s["global_step"] for s in step_lines(out)] == list(range(1, MID_STEPS + 1))
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


# ------------------------------------------------------------------------------------ auto-resume
def test_auto_resume_starts_fresh_then_continues(tmp_path, one_thread, logged):
    straight = train(tiny(tmp_path / "straight", epochs=2))
    out = tmp_path / "auto"
    first = train(tiny(out, epochs=1), resume="auto")  # nothing there: a new run
    assert len(first) == 1
    logged.clear()
    again = train(tiny(out, epochs=2), resume="auto")  # a run there: continue it
    lines = logged.messages
    assert lines[0].startswith("part-fast train: device cpu")  # said first, before the set-up
    assert lines[1] == f"resumed {out} at step 3, after epoch 1"
    assert without_timings(again) == without_timings(straight)
    assert_same_weights(weights(tmp_path / "straight"), weights(out))
    # Re-running a finished run (a scheduler's requeue after completion) does nothing, and says so.
    logged.clear()
    assert without_timings(train(tiny(out, epochs=2), resume="auto")) == without_timings(straight)
    assert logged.messages[-1] == f"{out} has already trained 2/2 epochs; nothing to do"


def test_auto_resume_refuses_a_folder_that_holds_something_else(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty but holds no part_fast run"):
        train(tiny(out), resume="auto")
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------- resume from the run's config
TRAIN = ["train", "--dataset", "shapes", "--arch", "cnn-small", "--epochs", "1", "--warmup", "0", "--batch-size", "32",
         "--steps", "1", "--train-subset", "64", "--test-subset", "32", "--eval-examples", "0", "--lr", "0.05",
         "--eps-low", "6/255", "--seed", "4"]


def test_resume_takes_the_saved_config_and_only_safe_changes(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert cli.main(TRAIN + ["--out", str(out)]) == 0
    # --epochs may change; everything else comes from config.json (eps_low 6/255 included).
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert [m["epoch"] for m in metric_lines(out)] == [1, 2]
    saved = json.loads((out / "config.json").read_text())
    assert saved["eps_low"] == 6 / 255 and saved["epochs"] == 2, "config.json follows the safe change"
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "3", "--eps-low", "5/255", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "--eps-low: 0.023529411764705882 -> 0.0196078431372549" in err and "--steps: 1 -> 2" in err
    assert "only --epochs, --device" in err
    # Repeating the original flags is not a change.
    assert cli.main(TRAIN + ["--out", str(out), "--resume", "--epochs", "2"]) == 0


def test_resume_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"part-fast train: error: --resume: run directory {tmp_path / 'none'} does not exist"
