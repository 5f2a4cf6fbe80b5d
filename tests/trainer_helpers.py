"""Helpers for the trainer tests: tiny runs, their weights, and running the CLI / torchrun as a user would."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from part_fast.train import TrainConfig, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny(out, **kw) -> TrainConfig:
    """A run that takes a few seconds: 96 shapes images, batches of 32, PGD-1, cnn-small."""
    base = dict(out=str(out), dataset="shapes", arch="cnn-small", method="part", epochs=3, warmup=1, lr=0.05,
                batch_size=32, steps=1, train_subset=96, test_subset=32, eval_examples=0, seed=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def quiet(*_args):
    pass


def weights(run_dir, name="last.pt") -> dict:
    return load_checkpoint(Path(run_dir) / name)["model"]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in history]


def env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def cli_train(out, *flags) -> list[str]:
    return [sys.executable, "-m", "part_fast", "train", "--out", str(out), *flags]


def torchrun(*args) -> list[str]:
    exe = shutil.which("torchrun")
    return ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + list(args)


def step_lines(run_dir) -> list[dict]:
    path = Path(run_dir) / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metric_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for_steps(run_dir, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll RUN_DIR/steps.jsonl until it holds n complete lines; fail if the process ends first."""
    path = Path(run_dir) / "steps.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {n}")
        time.sleep(0.005)
    raise AssertionError(f"no step {n} within {timeout} s")


def worker_pids(launcher_pid: int, rank: int) -> list[int]:
    """The torchrun workers of `launcher_pid` (its child processes) that run `rank`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    return found


# The fault-tolerance runs: 8 steps per epoch (batches of 16 split over 2 ranks), PGD-5 so that a step
# takes a while, 2 epochs of which the first is the warm-up.
ELASTIC = ["--dataset", "shapes", "--arch", "cnn-small", "--method", "part", "--epochs", "2", "--warmup", "1",
           "--lr", "0.05", "--batch-size", "16", "--steps", "5", "--train-subset", "128", "--test-subset", "32",
           "--eval-examples", "32", "--seed", "6", "--log-steps"]
ELASTIC_STEPS = 16


def run_uninterrupted_pair(out) -> Path:
    """A 2-process run of ELASTIC with no interruption (and no step checkpoints), as `torchrun --standalone`:
    what every faulted run must equal."""
    done = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", "-m", "part_fast", "train", *ELASTIC,
                                   "--out", str(out)), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(out)


def assert_equals_uninterrupted(out, ref) -> None:
    """RUN_DIR `out` ends as the uninterrupted run `ref`: the same weights, one metrics line per epoch with the
    same values, every step logged once with the same loss."""
    assert_same_weights(weights(ref), weights(out))
    assert [m["epoch"] for m in metric_lines(out)] == [1, 2], "one metrics line per epoch, none lost or doubled"
    assert without_timings(metric_lines(out)) == without_timings(metric_lines(ref))
    assert [s["global_step"] for s in step_lines(out)] == list(range(1, ELASTIC_STEPS + 1))
    assert [s["loss"] for s in step_lines(out)] == [s["loss"] for s in step_lines(ref)]
