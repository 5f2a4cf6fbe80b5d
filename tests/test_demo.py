"""part_fast.demo without training: the timing notes under its table, the per-epoch CPU bookkeeping, and how
run_demo takes its device. (The one test that runs the real demo, small, is in test_cli.py.)"""
from __future__ import annotations

import types

import pytest
import torch

from part_fast import cpu_load, demo
from part_fast.devices import describe_device
from part_fast.errors import ConfigError
from part_fast.train.loop import _summary_line


def _results(at_seconds, part_seconds, at_others=None, part_others=None, *, threads=2, device="cpu"):
    """A summary_table input shaped like run_demo's results, with the given epoch times."""
    def method(seconds, others):
        return {"natural": 70.0, "pgd20": 40.0, "epoch_seconds": seconds,
                "median_epoch_seconds": demo.statistics.median(seconds),
                "other_processes_cores": others if others is not None else [0.0] * len(seconds),
                "time_share": {"budget": 0.0, "attack": 0.7, "update": 0.29, "data": 0.01}}

    return {"device": device, "threads": threads, "cpu_count": 2,
            "at": method(at_seconds, at_others), "part": method(part_seconds, part_others)}


def test_the_table_reports_the_median_epoch_and_no_note_without_an_outlier():
    table = demo.summary_table(_results([6.0, 9.0, 7.0, 6.5], [7.0, 7.5, 8.0]))
    lines = table.splitlines()
    assert lines[0] == "| method | natural acc | PGD-20 acc | s / epoch (median) | budget | attack | update | data |"
    assert lines[2] == "| AT | 70.0% | 40.0% | 6.8 | 0.0% | 70.0% | 29.0% | 1.0% |"  # median of 6, 6.5, 7, 9
    assert lines[3].startswith("| PART | 70.0% | 40.0% | 7.5 |")
    assert len(lines) == 4  # no notes


@pytest.mark.parametrize("slow, noted", [(13.0, False), (13.01, True), (30.0, True)])
def test_an_epoch_is_noted_exactly_when_over_twice_the_median(slow, noted):
    table = demo.summary_table(_results([6.5, 6.5, slow, 6.5, 6.5], [7.0] * 4))
    assert (f"AT epoch 3 took {slow:.1f} s against a median of 6.5 s" in table) == noted
    assert ("summary.json keeps every epoch's time" in table) == noted
    assert "PART epoch" not in table


def test_the_note_names_other_processes_when_they_were_busy():
    results = _results([111.0, 111.0, 111.0, 6.6, 6.6, 6.6, 6.6, 6.6, 6.6, 6.6], [7.0] * 10,
                       at_others=[1.4, 1.6, 1.5] + [0.0] * 7)
    notes = demo.timing_notes(results)
    assert notes[:3] == [f"AT epoch {e} took 111.0 s against a median of 6.6 s: other processes kept {c} of the 2 "
                         "cores busy meanwhile." for e, c in ((1, "1.4"), (2, "1.6"), (3, "1.5"))]
    assert notes[3].startswith("On shared cores torch's threads wait for each other at every operation")
    assert "OMP_NUM_THREADS=1" in notes[3]
    assert notes[4] == "s / epoch is each method's median epoch; summary.json keeps every epoch's time."
    assert len(notes) == 5
    # The thread advice is for a CPU run with several threads only.
    assert not any("OMP_NUM_THREADS" in n for n in demo.timing_notes({**results, "threads": 1}))
    assert not any("OMP_NUM_THREADS" in n for n in demo.timing_notes({**results, "device": "cuda"}))


def test_a_median_from_shared_cores_is_called_so():
    # As measured here: most AT epochs ran while other processes used ~1 core, and so did the median.
    at = [130.4, 78.2, 87.9, 153.9, 51.5, 17.4, 14.4, 58.1, 41.5, 10.6]
    others = [1.25, 1.22, 1.34, 1.05, 0.85, 0.35, 0.23, 0.93, 0.89, 0.02]
    notes = demo.timing_notes(_results(at, [12.5] * 10, at_others=others))
    assert notes[:3] == [
        "AT epoch 1 took 130.4 s against a median of 54.8 s: other processes kept 1.2 of the 2 cores busy meanwhile.",
        "AT epoch 4 took 153.9 s against a median of 54.8 s: other processes kept 1.1 of the 2 cores busy meanwhile.",
        "AT: 7 of its 10 epochs shared the cores with other processes, so its median measures the machine's load "
        "too; its fastest epoch took 10.6 s."]
    assert "OMP_NUM_THREADS=1" in notes[3] and len(notes) == 5
    # 4 of 10 busy epochs: the median is a quiet one, and no outlier either: no note at all.
    assert demo.timing_notes(_results([10.0] * 10, [12.5] * 10, at_others=[1.0] * 4 + [0.0] * 6)) == []


def test_the_note_says_when_other_processes_were_idle_or_not_measured():
    idle = demo.timing_notes(_results([6.0] * 4, [30.0, 7.0, 7.0, 7.0], part_others=[0.1, 0.0, 0.0, 0.0]))
    assert idle[0] == ("PART epoch 1 took 30.0 s against a median of 7.0 s: other processes used only 0.1 of the "
                       "2 cores meanwhile, so the cause is probably inside this process.")
    assert not any("OMP_NUM_THREADS" in n for n in idle)
    unknown = demo.timing_notes(_results([6.0] * 4, [30.0, 7.0, 7.0, 7.0], part_others=[None] * 4))
    assert unknown[0].endswith("7.0 s: other processes' CPU use could not be measured here.")


def _fake_clocks(monkeypatch, samples):
    """Make EpochLoad's samples (wall, own CPU, machine busy) come from `samples`, in order."""
    it = iter(samples)
    monkeypatch.setattr(demo.EpochLoad, "_sample", staticmethod(lambda: next(it)))


def test_epoch_load_counts_the_cpu_other_processes_used_per_epoch(monkeypatch):
    _fake_clocks(monkeypatch, [(0.0, 0.0, 100.0), (10.0, 9.0, 124.0), (20.0, 19.0, 135.0)])
    load = demo.EpochLoad()
    config = types.SimpleNamespace(epochs=10)  # _summary_line reads only the epoch count
    record = {"epoch": 1, "phase": "at", "train_loss": 2.3, "train_adv_acc": 10.0, "epoch_seconds": 9.9,
              "attack_seconds": 6.0, "budget_seconds": 0.0, "update_seconds": 3.0}
    load.observe("part-fast train: device cpu (2 threads)")  # not an epoch line: no sample taken
    load.observe(_summary_line(record, config))  # the trainer's real epoch line
    load.observe(_summary_line({**record, "epoch": 2}, config))
    # epoch 1: 24 busy core-seconds in 10 s, 9 of them ours -> 1.5 cores; epoch 2: 11 - 10 = 1 in 10 s
    assert load.other_cores == {1: pytest.approx(1.5), 2: pytest.approx(0.1)}


def test_epoch_load_without_proc_stat_is_none(monkeypatch):
    monkeypatch.setattr(cpu_load, "machine_busy_seconds", lambda: None)
    load = demo.EpochLoad()
    load.observe("epoch 1/2 [at] | loss 2.3 | train adv 10.0% | 1.0s")
    assert load.other_cores == {1: None}
    assert demo.busy_elsewhere(0.01) is None


def test_machine_busy_seconds_reads_proc_stat():
    import os

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this system: machine_busy_seconds returns None there (tested above)")
    first = cpu_load.machine_busy_seconds()
    sum(i * i for i in range(2_000_000))  # keep a core busy for a moment
    assert isinstance(first, float) and cpu_load.machine_busy_seconds() > first


class _Stop(Exception):
    pass


def test_run_demo_says_its_device_and_trains_there(tmp_path, monkeypatch, logged):
    seen = []

    def fake_train(config):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "busy_elsewhere", lambda seconds=0.5: 0.0)
    with pytest.raises(_Stop):
        demo.run_demo(tmp_path / "d", demo.DemoSettings(train_size=20, test_size=10), device="cpu")
    lines = logged.messages
    assert lines[0] == f"demo: device {describe_device(torch.device('cpu'))}"
    assert lines[1] == "demo: training AT (10 epochs, 20 shapes images, PGD-3)"
    assert seen[0].device == "cpu" and seen[0].method == "at" and seen[0].time_stages


def test_run_demo_warns_at_once_when_the_cores_are_busy(tmp_path, monkeypatch, logged):
    monkeypatch.setattr(demo, "train", lambda config: (_ for _ in ()).throw(_Stop()))
    monkeypatch.setattr(demo, "busy_elsewhere", lambda seconds=0.5: 1.3)
    with pytest.raises(_Stop):
        demo.run_demo(tmp_path / "d", demo.DemoSettings(train_size=20, test_size=10), device="cpu")
    assert logged.messages[1].startswith(f"demo: other processes are using 1.3 of the {demo.os.cpu_count()} cores; the epochs "
                                         "will be slow while they do (torch's threads wait for each other")


@pytest.mark.parametrize("device, message", [
    ("gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    pytest.param("cuda", "device 'cuda' requested but CUDA is not available here; use --device cpu or auto",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_run_demo_refuses_a_bad_device_before_writing_anything(tmp_path, device, message):
    with pytest.raises(ConfigError) as err:
        demo.run_demo(tmp_path / "d", device=device)
    assert str(err.value) == message
    assert not (tmp_path / "d").exists()
