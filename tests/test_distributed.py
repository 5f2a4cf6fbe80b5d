"""DDP under torchrun: two CPU processes with the gloo backend."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from part_fast import data as data_mod
from part_fast import train as train_mod
from part_fast.train import Distributed, TrainConfig, load_checkpoint

ARGS = ["--dataset", "shapes", "--arch", "cnn-small", "--method", "part", "--epochs", "2", "--warmup", "0",
        "--lr", "0.05", "--batch-size", "32", "--steps", "2", "--train-subset", "96", "--test-subset", "40",
        "--eval-examples", "40", "--seed", "5", "--log-steps"]


def _torchrun():
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _first_step_loss_per_rank(config: TrainConfig, world: int) -> list[float]:
    """What each rank computes in its first step, rebuilt in this single process: the same initial weights,
    rank r's shard of the first global batch, rank r's augmentation and attack generators."""
    cfg = config.resolved()
    train_set, _, info = data_mod.build_datasets(cfg.dataset, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                                                 seed=cfg.seed)
    losses = []
    for rank in range(world):
        state = train_mod.build_state(cfg, info.num_classes, torch.device("cpu"), Distributed(0, 1, 0))
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(0)
        x, y = next(iter(DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler)))
        aug = torch.Generator().manual_seed(train_mod.derived_seed(cfg.seed, train_mod._PURPOSE_AUGMENT, 0, rank))
        atk = torch.Generator().manual_seed(train_mod.derived_seed(cfg.seed, train_mod._PURPOSE_ATTACK, 0, rank))
        r = train_mod.train_step(state, x, y, part_phase=True, attack=train_mod.make_attack(state, part_phase=True), attack_gen=atk,
                                 augment_gen=aug)
        losses.append(r.loss)
    return losses


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = _torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "part_fast", "train", *ARGS, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Only rank 0 wrote files, once.
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "metrics.jsonl", "steps.jsonl"]
    assert done.stdout.count("epoch 2/2") == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    # Metrics are reduced over both ranks: all 96 training examples (3 global batches of 32), all 40 test ones.
    assert all(m["train_examples"] == 96 and m["test_examples"] == 40 for m in metrics)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(s["epoch"], s["step"]) for s in steps] == [(e, k) for e in (1, 2) for k in (1, 2, 3)]

    # The first step's loss is the mean over the global batch of what each rank computed on its half
    # (plain BatchNorm normalises each rank's half with its own statistics, as DDP does).
    config = TrainConfig(out=str(tmp_path / "unused"), dataset="shapes", arch="cnn-small", method="part", epochs=2,
                         warmup=0, lr=0.05, batch_size=32, steps=2, train_subset=96, test_subset=40, seed=5)
    per_rank = _first_step_loss_per_rank(config, world=2)
    assert steps[0]["loss"] == pytest.approx(sum(per_rank) / 2, rel=1e-5, abs=1e-6)
    # ... and differs from a rank's half alone (the comparison is not vacuous).
    assert abs(per_rank[0] - per_rank[1]) > 1e-4

    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["rng"]["data_order"]["world"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"]), "the checkpoint holds the plain model's weights"


@pytest.mark.slow
def test_torchrun_resume_equals_uninterrupted(tmp_path):
    """Two processes, 2 epochs straight vs 1 epoch + --resume: the same weights (BatchNorm statistics of
    every rank included, which is why rank 0's are broadcast before each checkpoint)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = lambda out, *extra: subprocess.run(  # noqa: E731
        _torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "part_fast", "train", *ARGS, "--out", str(out), *extra],
        env=env, capture_output=True, text=True, timeout=600)
    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    epochs_at = ARGS.index("--epochs") + 1
    one = list(ARGS)
    one[epochs_at] = "1"
    first = subprocess.run(_torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "part_fast", "train", *one,
                                          "--out", str(tmp_path / "cut")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "full" / "last.pt")["model"], load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
