"""Two nodes on one machine: two torchrun agents meeting through a c10d rendezvous on loopback, one gloo worker
each, launched with the command line a user gives every node of a SLURM job. Every run must end equal to a
`torchrun --standalone --nproc_per_node=2` run of the same settings (conftest's uninterrupted_pair)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import (ELASTIC_STEPS, assert_equals_uninterrupted, env, step_lines, torchrun,
                     wait_for_steps, worker_pids)

# A surviving agent waits this long for its lost peer in the next rendezvous round, then gives up.
JOIN_TIMEOUT_S = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoNodes:
    """The same torchrun command started twice, as SLURM starts it on each of two nodes."""

    def __init__(self, tmp_path: Path, out: Path, elastic: list[str], *train_flags: str, max_restarts: int = 2):
        self.tmp_path, self.out, self.port = tmp_path, out, _free_port()
        self.command = torchrun(
            "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{self.port}",
            f"--rdzv-id={uuid.uuid4().hex}", f"--rdzv-conf=join_timeout={JOIN_TIMEOUT_S}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.1",
            "-m", "part_fast", "train", *elastic, "--out", str(out), *train_flags)
        self.agents: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.launches = 0

    def start(self) -> "TwoNodes":
        """Start node 0, wait until it serves the rendezvous store, then node 1: node 0 hosts the store."""
        self.launches += 1
        self.agents, self.logs = [], []
        for node in range(2):
            log = self.tmp_path / f"launch{self.launches}-node{node}.log"
            with open(log, "w") as f:
                self.agents.append(subprocess.Popen(self.command, env=env(), stdout=f, stderr=subprocess.STDOUT))
            self.logs.append(log)
            if node == 0:
                self._wait_for_store()
        return self

    def _wait_for_store(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.agents[0].poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"node 0 serves no rendezvous store on port {self.port}\n{self.log()}")

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs)

    def node_of_rank(self, rank: int) -> int:
        """Which agent runs the worker of `rank` (the rendezvous numbers the nodes in the order they join)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for node, agent in enumerate(self.agents):
                if worker_pids(agent.pid, rank):
                    return node
            time.sleep(0.01)
        raise AssertionError(f"no worker of rank {rank}\n{self.log()}")

    def wait(self, timeout: float) -> list[int]:
        try:
            return [agent.wait(timeout=timeout) for agent in self.agents]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the agents did not exit within {timeout} s\n{self.log()}") from None

    def kill(self) -> None:
        for agent in self.agents:
            for pid in worker_pids(agent.pid, 0) + worker_pids(agent.pid, 1):
                _kill(pid)
            _kill(agent.pid)
            agent.wait()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def nodes(tmp_path, elastic):
    started: list[TwoNodes] = []

    def make(*train_flags, **kw) -> TwoNodes:
        started.append(TwoNodes(tmp_path, tmp_path / "run", elastic, *train_flags, **kw))
        return started[-1]

    yield make
    for job in started:  # a failed test leaves no process behind
        job.kill()


@pytest.mark.slow
def test_a_worker_killed_on_one_node_restarts_both_and_ends_equal(nodes, uninterrupted_pair):
    """Two nodes train what one node trains, also when a worker dies: SIGKILL the worker of node 2 mid-epoch,
    both agents restart their workers (the first without counting a restart of its own), which meet under
    fresh keys, resume from the last step checkpoint and finish; both agents exit 0, rank 0 alone printed the
    last epoch's metrics, and the run equals the uninterrupted one. (The steps before the kill, and the
    finish, are those of a run without a fault.)"""
    job = nodes("--auto-resume", "--save-every-steps", "2").start()
    victim_node = job.node_of_rank(1)
    wait_for_steps(job.out, 5, job.agents[victim_node])
    (victim,) = worker_pids(job.agents[victim_node].pid, rank=1)
    os.kill(victim, signal.SIGKILL)
    killed_at = len(step_lines(job.out))
    assert job.wait(timeout=120) == [0, 0], job.log()
    assert killed_at < ELASTIC_STEPS, "the kill landed before the end"
    assert job.log().count(f"resumed {job.out} at step ") == 1, "the restarted job resumed once, from a checkpoint"
    assert sum(log.read_text().count("epoch 2/2") for log in job.logs) == 1, "rank 0 alone prints the metrics"
    assert_equals_uninterrupted(job.out, uninterrupted_pair)


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["store host", "other node"])
def test_a_lost_node_fails_the_job_in_bounded_time_and_a_relaunch_resumes(nodes, uninterrupted_pair, lost):
    """A whole node dies mid-epoch (its agent and worker SIGKILLed), either the one hosting the rendezvous
    store (the first agent started) or the other: the surviving agent gives up within the join timeout (no
    hang), and the same command started again on both nodes (SLURM --requeue) resumes from the last
    checkpoint and ends equal to the uninterrupted run."""
    job = nodes("--auto-resume", "--save-every-steps", "2")
    job.start()
    dead = 0 if lost == "store host" else 1
    wait_for_steps(job.out, 5, job.agents[0])
    for pid in worker_pids(job.agents[dead].pid, 0) + worker_pids(job.agents[dead].pid, 1) + [job.agents[dead].pid]:
        _kill(pid)
    killed = time.monotonic()
    killed_at = len(step_lines(job.out))
    survivor = job.agents[1 - dead]
    code = survivor.wait(timeout=JOIN_TIMEOUT_S + 60)
    took = time.monotonic() - killed
    assert code != 0, job.log()
    assert took < JOIN_TIMEOUT_S + 45, f"the surviving agent took {took:.0f} s to give up"
    assert not worker_pids(survivor.pid, 0) + worker_pids(survivor.pid, 1)
    assert killed_at < ELASTIC_STEPS, "the kill landed before the end"

    job.start()  # the scheduler's requeue: the same command on both nodes
    assert job.wait(timeout=120) == [0, 0], job.log()
    assert job.log().count(f"resumed {job.out} at step ") == 1, job.log()
    assert_equals_uninterrupted(job.out, uninterrupted_pair)
