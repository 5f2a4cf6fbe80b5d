"""DDP under torchrun: two CPU processes with the gloo backend."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from part_fast import data as data_mod
from part_fast import train as train_mod
from part_fast.train import Distributed, TrainConfig, load_checkpoint
from part_fast.train.sampler import ResumableDistributedSampler
from helpers import (assert_equals_uninterrupted, env, metric_lines, step_lines, torchrun, wait_for_steps,
                     worker_pids)
from part_fast import cli

ARGS = ["--dataset", "shapes", "--arch", "cnn-small", "--method", "part", "--epochs", "2", "--warmup", "0",
        "--lr", "0.05", "--batch-size", "32", "--steps", "2", "--train-subset", "96", "--test-subset", "40",
        "--eval-examples", "40", "--seed", "5", "--log-steps", "--ema-decay", "0.5", "--awp-gamma", "0.005",
        "--awp-warmup", "1"]  # AWP from epoch 2: the first step's loss is checked against one process below


def _pair_train(*args) -> list[str]:
    """`torchrun --standalone --nproc_per_node=2 -m part_fast train ARGS`."""
    return torchrun("--standalone", "--nproc_per_node=2", "-m", "part_fast", "train", *args)


def _first_step_loss_per_rank(config: TrainConfig, world: int) -> list[float]:
    """What each rank computes in its first step, rebuilt in this single process: the same initial weights,
    rank r's shard of the first global batch, rank r's augmentation and attack generators."""
    config = config.resolved()
    train_set, _, info = data_mod.build_datasets(config.dataset, train_subset=config.train_subset, test_subset=config.test_subset,
                                                 seed=config.seed)
    losses = []
    for rank in range(world):
        state = train_mod.build_state(config, info.num_classes, torch.device("cpu"), Distributed(0, 1, 0))
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=True)
        sampler.set_epoch(0)
        x, y = next(iter(DataLoader(train_set, batch_size=config.batch_size // world, sampler=sampler)))
        rng = train_mod.StepRandomness(config.seed, rank, torch.device("cpu"), augment=True)
        with rng.at(0, 0):
            r = train_mod.train_step(state, x, y, part_phase=True, attack=train_mod.inner_attack(state, part_phase=True),
                                     attack_gen=rng.attack, augment_gen=rng.augment)
        losses.append(r.loss)
    return losses


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """ARGS trained by two processes under torchrun: (RUN_DIR, the finished process)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = subprocess.run(_pair_train(*ARGS, "--out", str(out)), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, ddp_run):
    out, done = ddp_run
    # Only rank 0 wrote files, once.
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "metrics.jsonl", "previous.pt",
                                                     "steps.jsonl"]
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
    assert ckpt["epoch"] == 2 and ckpt["world"] == 2 and ckpt["global_step"] == 6
    assert not any(k.startswith("module.") for k in ckpt["model"]), "the checkpoint holds the plain model's weights"


@pytest.mark.slow
def test_torchrun_resume_equals_uninterrupted(tmp_path, ddp_run):
    """Two processes, 2 epochs straight vs 1 epoch + --resume: the same weights (BatchNorm statistics of
    every rank included, which is why rank 0's are broadcast before each checkpoint)."""
    full, _ = ddp_run  # the same ARGS: 2 epochs straight
    epochs_at = ARGS.index("--epochs") + 1
    one = list(ARGS)
    one[epochs_at] = "1"
    first = subprocess.run(_pair_train(*one, "--out", str(tmp_path / "cut")), env=env(), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run(_pair_train(*ARGS, "--out", str(tmp_path / "cut"), "--resume"), env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ fault tolerance
TEARDOWN_PROBE = """
import os, sys, torch
from torch import nn
from part_fast.errors import Interrupted, UserError
from part_fast.train import distributed

def threads():
    return len(os.listdir("/proc/self/task"))

def run(info):  # as the trainer does: what holds the group lives in the run, not beside the session
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
    for _ in range(3):
        ddp(torch.randn(2, 4)).sum().backward()
    info.all_sum([1.0])
    pair = [torch.full((2, 3), float(info.rank)), torch.tensor([4.0 * info.rank, 2.0])]
    info.average_(pair)  # (AWP's gradients): the mean over ranks, in place
    averaged.extend(torch.cat([t.reshape(-1) for t in pair]).tolist())
    counts.append(threads())
    if sys.argv[1] == "interrupted":
        raise Interrupted(15, "x", 3, "here")  # a stop agreed by every rank tears down the same way
    if sys.argv[1] == "user-error-on-rank-1" and info.rank == 1:
        raise UserError("rank 1 alone fails")  # rank 0 goes on to its barrier: neither may hang

counts, averaged = [threads()], []
try:
    with distributed.session("cpu") as info:
        run(info)
except (Interrupted, UserError):
    pass
with open(os.path.join(sys.argv[2], f"rank{info.rank}.txt"), "w") as f:
    f.write(" ".join(map(str, [info.rank, counts[0], counts[1], threads(), *averaged])))
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["done", "interrupted", "user-error-on-rank-1"])
def test_session_teardown_joins_the_process_group_threads(tmp_path, ending):
    """The cause of the SIGABRT at exit: gloo worker threads alive while the interpreter finalizes. After
    the session every rank is back to the threads it had before it (so nothing can race the exit); a rank
    that fails alone tears down without waiting for the others, and nobody hangs. (On the way, every rank
    checks Distributed.average_ on tensors that differ by rank.)"""
    probe = tmp_path / "probe.py"
    probe.write_text(TEARDOWN_PROBE)
    done = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", str(probe), ending, str(tmp_path)),
                          env=env(), capture_output=True, text=True, timeout=300)
    report = done.stdout[-2000:] + done.stderr[-3000:]
    counts = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1) if (tmp_path / f"rank{r}.txt").exists()]
    if ending == "user-error-on-rank-1":
        # Rank 0's barrier learns that rank 1 left (an error, not a hang); rank 1 exited cleanly.
        assert done.returncode != 0 and [c[0] for c in counts] == ["1"], report
    else:
        assert done.returncode == 0, report
        assert [c[0] for c in counts] == ["0", "1"], report
    for rank, before, during, after, *averaged in counts:
        assert int(during) > int(before), "the group's worker threads were running"
        assert after == before, f"rank {rank}: {int(after) - int(before)} threads outlived the session"
        assert [float(v) for v in averaged] == [0.5] * 6 + [2.0, 2.0], f"rank {rank}: Distributed.average_"


@pytest.mark.slow
def test_elastic_restart_after_a_worker_is_killed(tmp_path, elastic, uninterrupted_pair):
    """SIGKILL one worker mid-epoch under `torchrun --max-restarts=2 ... --auto-resume`: torchrun restarts
    the job, which resumes from its last step checkpoint and finishes by itself, exit 0, with the weights,
    metrics and step losses of the uninterrupted run."""
    out = tmp_path / "elastic"
    cmd = torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=2", "-m", "part_fast", "train", *elastic,
                   "--out", str(out), "--auto-resume", "--save-every-steps", "2")
    with open(tmp_path / "log.txt", "w") as log_file:
        proc = subprocess.Popen(cmd, env=env(), stdout=log_file, stderr=subprocess.STDOUT)
        wait_for_steps(out, 5, proc)
        (victim,) = worker_pids(proc.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        killed_at = len(step_lines(out))
        assert proc.wait(timeout=600) == 0, (tmp_path / "log.txt").read_text()[-4000:]
    log = (tmp_path / "log.txt").read_text()
    assert killed_at < 16, "the kill landed before the end"
    assert log.count(f"resumed {out} at step ") == 1, "the restarted job resumed once, from a checkpoint"
    assert_equals_uninterrupted(out, uninterrupted_pair)


@pytest.mark.slow
def test_torchrun_sigterm_checkpoints_the_exact_state(tmp_path, elastic, uninterrupted_pair):
    """SIGTERM to torchrun (what a scheduler sends): it forwards the signal, both workers finish the same
    step, write one checkpoint and exit 143; resuming with only --out ends equal to the uninterrupted run."""
    out = tmp_path / "term"
    run = _pair_train()
    proc = subprocess.Popen([*run, *elastic, "--out", str(out)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    ckpt = load_checkpoint(out / "last.pt")
    assert 3 <= ckpt["global_step"] < 16 and ckpt["global_step"] == len(step_lines(out))
    assert stderr.count("part-fast train: stopped by SIGTERM after step ") == 1, stderr[-3000:]  # rank 0 says it
    # The only traceback is torchrun's own, for the signal it got; the workers stopped cleanly.
    assert stderr.count("Traceback") == stderr.count("SignalException: Process "), stderr[-3000:]
    resumed = subprocess.run([*run, "--out", str(out), "--resume"], env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_equals_uninterrupted(out, uninterrupted_pair)


LAUNCH_WITH_OTHER_SETTINGS_ON_RANK_1 = """#!/bin/sh
if [ "$RANK" = "1" ]; then exec "$PYTHON" -m part_fast "$@" --eps-low 6/255; fi
exec "$PYTHON" -m part_fast "$@"
"""


@pytest.mark.slow
def test_ranks_started_with_other_settings_all_stop_with_one_line(tmp_path, elastic):
    """A rank launched with other flags: every rank refuses, at the same point, in one line, before any
    file is written (no rank is left waiting in a collective)."""
    launch = tmp_path / "launch.sh"
    launch.write_text(LAUNCH_WITH_OTHER_SETTINGS_ON_RANK_1)
    launch.chmod(0o755)
    out = tmp_path / "run"
    done = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", "--no-python", str(launch), "train", *elastic,
                                   "--out", str(out)), env={**env(), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("part-fast train: error:")]
    assert len(errors) == 2, done.stderr[-3000:]
    assert all("1 process(es) were started with other settings than rank 0" in e for e in errors)
    assert sum("(this one: eps_low)" in e for e in errors) == 1
    # The only traceback is torchrun's report that its workers failed.
    assert done.stderr.count("Traceback") == done.stderr.count("ChildFailedError:"), done.stderr[-3000:]
    assert not out.exists()


TIMEOUT_PROBE = """
import sys, time
from part_fast.train import distributed

with distributed.session("cpu", timeout_minutes=float(sys.argv[1]) / 60) as info:
    if info.rank == 1:
        time.sleep(120)  # a peer that neither answers nor closes its connections (a node lost to the network)
    started = time.monotonic()
    try:
        info.all_sum([1.0])
    except Exception as err:
        print(f"rank 0 gave up after {time.monotonic() - started:.1f} s: {type(err).__name__}", flush=True)
        raise
"""


@pytest.mark.slow
def test_collective_timeout_bounds_the_wait_for_a_silent_peer(tmp_path):
    """--collective-timeout reaches the process group: rank 0 waits for a silent peer that long, not torch's
    30 minutes, and fails; torchrun then stops the whole job."""
    probe = tmp_path / "probe.py"
    probe.write_text(TIMEOUT_PROBE)
    started = time.monotonic()
    done = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", str(probe), "3"), env=env(),
                          capture_output=True, text=True, timeout=200)
    took = time.monotonic() - started
    assert done.returncode != 0
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("rank 0 gave up after")]
    waited = float(line.split()[5])
    assert 2.5 <= waited < 20, line
    assert took < 90, f"the job took {took:.0f} s to end"


# ------------------------------------------------------------------------------- another process count
def test_every_global_batch_holds_the_same_examples_with_any_process_count():
    """What makes --allow-world-change keep the data order: rank r's k-th index is the permutation's
    (r + world * k)-th, so global step s is the permutation's [s * B, (s + 1) * B) on 1, 2 or 4 processes,
    also when the epoch starts part-way (a mid-epoch resume)."""
    data, batch = list(range(64)), 8

    def global_batches(world: int, start_step: int) -> list[set[int]]:
        per_rank = []
        for rank in range(world):
            sampler = ResumableDistributedSampler(data, num_replicas=world, rank=rank, seed=3)
            sampler.set_epoch(2, start=start_step * (batch // world))
            indices = list(sampler)
            per_rank.append([indices[i:i + batch // world] for i in range(0, len(indices), batch // world)])
        return [set().union(*parts) for parts in zip(*per_rank)]

    one = global_batches(1, 0)
    assert len(one) == 8 and set().union(*one) == set(data)
    for world in (2, 4):
        assert global_batches(world, 0) == one
        assert global_batches(world, 5) == one[5:]
    assert global_batches(2, 0) != global_batches(1, 0)[::-1], "the comparison is not vacuous"


def _tree(path) -> dict:
    return {p.relative_to(path).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_on_another_process_count_is_refused_before_any_write_unless_allowed(tmp_path, capsys, one_thread,
                                                                                   elastic):
    """A run of 2 processes whose newest checkpoint is from the middle of epoch 1 (step 6 of 8) resumed by 1
    (a node fewer): one line naming both counts and the flag, every file untouched; with
    --allow-world-change it goes on from step 6, and every epoch's metrics cover all 128 examples. (The one
    process resumes in this one: it is an ordinary `part-fast train`.)"""
    out = tmp_path / "run"
    epochs_at = elastic.index("--epochs") + 1
    one_epoch = [*elastic[:epochs_at], "1", *elastic[epochs_at + 1:]]
    first = subprocess.run(_pair_train(*one_epoch, "--out", str(out), "--save-every-steps", "3"),
                           env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "last.pt").unlink()  # the node died before the epoch's checkpoint: previous.pt holds step 6
    assert load_checkpoint(out / "previous.pt")["global_step"] == 6
    before = _tree(out)
    resume = ["train", "--out", str(out), "--resume", "--epochs", "2"]

    assert cli.main(resume) == 2
    refused = capsys.readouterr()
    errors = [line for line in refused.err.splitlines() if "error:" in line]
    assert errors == [f"part-fast train: error: {out / 'previous.pt'} was trained by 2 process(es) and would continue "
                      "with 1; each rank's data shard and random streams depend on the count, so resume with 2, or "
                      "pass --allow-world-change to continue with 1 (no longer bit-equal to an uninterrupted run)"]
    assert _tree(out) == before, "nothing in RUN_DIR was written, moved or removed"

    assert cli.main(resume + ["--allow-world-change"]) == 0
    allowed = capsys.readouterr()
    assert allowed.err.count("was trained by 2 process(es) and continues with 1 (--allow-world-change)") == 1
    assert "resumed" in allowed.out and "at step 6" in allowed.out, allowed.out
    metrics = metric_lines(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["train_examples"] for m in metrics] == [128, 128], "rank 0 carries the sums of both saved ranks"
    assert [s["global_step"] for s in step_lines(out)] == list(range(1, 17))
    assert load_checkpoint(out / "last.pt")["world"] == 1
