"""One process per device under torchrun: who we are, the few collectives the trainer needs, and a
session that starts the process group and tears it down so that every rank exits cleanly.

Why the teardown is careful. A gloo process group runs worker threads that finish each collective and then
drop their references to its tensors; dropping a reference to a tensor Python can see takes the GIL. If
the interpreter is already finalizing when a worker asks for the GIL, CPython ends that thread from inside
a C++ destructor and the process dies with `terminate called without an active exception` (SIGABRT),
after a run that succeeded. The workers only stop when the group's backend is destroyed, which
`destroy_process_group()` does only once nothing else references the group. Two things kept it alive:
DistributedDataParallel (freed only by the garbage collector) and `torch._dynamo`, which DDP imports: when
that first import happens after `init_process_group`, it keeps references to the default group for the
life of the process. So the session imports `torch._dynamo` before creating the group, and at the end
frees what still refers to it (collects garbage, clears the frames of a propagating exception), waits for
every rank (barrier), and destroys the group while the interpreter is fully alive: its destructor joins the
worker threads, and nothing is left to race the exit.
"""
from __future__ import annotations

import contextlib
import gc
import os
import secrets
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ..devices import resolve_device
from ..errors import USER_ERRORS, Interrupted, TrainingDiverged

# Stops every rank reaches at the same point, having agreed on them in a collective: the peers are alive and
# idle, so the ranks can wait for each other and tear the group down in order.
AGREED_STOPS = (Interrupted, TrainingDiverged)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live
    # A gloo group for `agree`, when the default group's collectives run on the GPU (NCCL); None: the default
    # group is gloo already.
    host_group: object = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def all_sum(self, values, device=None) -> list[float]:
        """Element-wise sum over ranks (float64), returned as Python floats."""
        values = [float(v) for v in values]
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device or self.device)
        dist.all_reduce(t)
        return t.tolist()

    def agree(self, values) -> list[float]:
        """Element-wise sum over ranks of host numbers (votes, flags) without touching the training device:
        reading an NCCL result would make the host wait for every kernel queued before it, each step."""
        values = [float(v) for v in values]
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.host_group)
        return t.tolist()

    def all_gather(self, values) -> list[list[float]]:
        """Every rank's vector (float64, same length on every rank), in rank order."""
        values = [float(v) for v in values]
        if not self.enabled:
            return [values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def all_gather_tensors(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every rank's copy of `tensors` (same shapes and dtypes on every rank), on the CPU, in rank order:
        one collective per dtype."""
        if not self.enabled:
            return [[t.detach().cpu().clone() for t in tensors]]
        per_rank: list[list[torch.Tensor | None]] = [[None] * len(tensors) for _ in range(self.world)]
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).to(self.device)
            gathered = [torch.empty_like(flat) for _ in range(self.world)]
            dist.all_gather(gathered, flat)
            for rank, g in enumerate(gathered):
                pieces = g.cpu().split([tensors[i].numel() for i in idx])
                for i, piece in zip(idx, pieces):
                    per_rank[rank][i] = piece.reshape(tensors[i].shape).clone()
        return per_rank  # type: ignore[return-value]

    def raise_together(self, error: BaseException | None, elsewhere) -> None:
        """Every rank learns whether any failed: one that did raises its own `error`, the others
        `elsewhere(number_failed)`, so no rank is left waiting in a collective the failed one never joins."""
        (failed,) = self.all_sum([0.0 if error is None else 1.0])
        if error is not None:
            raise error
        if failed:
            raise elsewhere(int(failed))

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite every rank's tensors (same shapes and dtype on every rank) with their mean over the ranks,
        in place: one all-reduce."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(piece.view_as(t))

    def broadcast_(self, tensors) -> None:
        """Overwrite every rank's tensors with rank 0's, in place."""
        if self.enabled:
            for t in tensors:
                dist.broadcast(t, 0)


def _device_for(name: str, ranks: Distributed) -> torch.device:
    """The device this rank trains on: part_fast.devices' reading of `name` ('auto' is the GPU when there is
    one), and under torchrun a CUDA device is this process's own GPU, cuda:LOCAL_RANK."""
    device = resolve_device(name)
    if device.type == "cuda":
        if ranks.enabled:
            device = torch.device("cuda", ranks.local_rank)  # one GPU per process
        if device.index is not None:
            torch.cuda.set_device(device)  # Triton launches, pinned copies and NCCL follow the current device
    return device


@contextlib.contextmanager
def session(device_name: str, timeout_minutes: float | None = None) -> Iterator[Distributed]:
    """The process group for the life of a run (none when WORLD_SIZE is 1).

    Args:
        device_name: 'auto', 'cpu', 'cuda' or 'cuda:N', resolved here (under torchrun 'cuda' is cuda:LOCAL_RANK).
        timeout_minutes: how long a collective, and the start-up, waits for the other ranks before it fails;
            None: torch's default (10 minutes with NCCL, 30 with gloo).

    Returns:
        (yields) this rank's Distributed, whose .device is the device to train on."""
    ranks = Distributed.from_env()
    device = _device_for(device_name, ranks)
    ranks.device = device
    if not ranks.enabled or dist.is_initialized():
        yield ranks  # alone, or inside a group the caller owns (and tears down)
        return
    import torch._dynamo  # noqa: F401 - before init_process_group, or it pins the group (see the module doc)

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    _init_process_group(backend, timeout)
    if backend != "gloo":  # destroy_process_group() destroys it with the rest
        ranks.host_group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        yield ranks
    except AGREED_STOPS as err:
        _teardown(err, wait_for_peers=True)
        raise
    except USER_ERRORS as err:
        # Raised between collectives, maybe on this rank alone: a peer may never reach a barrier, but this
        # rank's own collectives are complete, so destroying a gloo group (which joins its threads) cannot
        # block. NCCL's teardown may wait for peers: left to the exit.
        if dist.get_backend() == "gloo":
            _teardown(err, wait_for_peers=False)
        raise
    else:
        _teardown(None, wait_for_peers=True)
    # Any other exception: a peer may be gone or mid-collective, and waiting for it could hang the exit.


def _init_process_group(backend: str, timeout: timedelta | None) -> None:
    """init_process_group under a key prefix that only this attempt of the job uses (see attempt_prefix)."""
    wait = timeout or default_pg_timeout
    store, rank, world = next(dist.rendezvous("env://", timeout=wait))
    prefix = attempt_prefix(store, rank, world, wait)
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world,
                            timeout=timeout)


def attempt_prefix(store, rank: int, world: int, timeout: timedelta = default_pg_timeout) -> str:
    """A store key prefix that every rank of this attempt of the job agrees on and no earlier attempt used.

    Why. torchrun's agents keep one store for the whole job (TORCH_DISABLE_SHARE_RDZV_TCP_STORE unset, the
    default): after `--max-restarts` restarts the workers, the new ones meet where the keys of the previous
    attempt are still set, read the dead ranks' addresses and fail ("connectFullMesh ... Connection refused")
    or hang. Nothing the workers are told names the attempt for the whole job: TORCHELASTIC_RESTART_COUNT
    counts each agent's own restarts, and with several nodes the agents whose workers did not fail restart
    them without counting, so the counts differ from node to node.

    How. Rank 0 draws a random name; every other rank publishes a random token of its own and waits for
    rank 0's answer under a key made of that token, which no earlier attempt can have set; rank 0 answers
    every token it sees until each rank has confirmed under the new name. A stale token (an earlier
    attempt's, read before its rank wrote the new one) only gets an answer nobody reads. The ranks of
    earlier attempts are gone: an agent stops all its workers before it joins the next round.

    Args:
        store: the store every rank of the job reaches (torch.distributed.rendezvous's).
        rank, world: this process's rank and the number of processes.
        timeout: how long to wait for the other ranks.

    Returns:
        "part_fast/<32 hex digits>/", the same on every rank.
    """
    if world == 1:
        return "part_fast/single/"
    if rank != 0:
        token = secrets.token_hex(16)
        store.set(f"part_fast/hello/{rank}", token)
        answer = f"part_fast/answer/{token}"
        store.wait([answer], timeout)
        name = store.get(answer).decode()
        store.set(f"part_fast/{name}/ready/{rank}", "1")
        return f"part_fast/{name}/"
    name = secrets.token_hex(16)
    answered: dict[int, bytes] = {}
    waiting = set(range(1, world))
    deadline = time.monotonic() + timeout.total_seconds()
    while waiting:
        for peer in sorted(waiting):
            hello = f"part_fast/hello/{peer}"
            if store.check([hello]):
                token = store.get(hello)
                if answered.get(peer) != token:
                    store.set(f"part_fast/answer/{token.decode()}", name)
                    answered[peer] = token
            if store.check([f"part_fast/{name}/ready/{peer}"]):
                waiting.discard(peer)
        if waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank(s) {sorted(waiting)} did not join this attempt of the job within "
                                   f"{timeout}")
            time.sleep(0.01)
    return f"part_fast/{name}/"


def _teardown(err: BaseException | None, wait_for_peers: bool) -> None:
    if err is not None:
        # The frames the exception passes through hold the run's locals: the DDP model among them.
        traceback.clear_frames(err.__traceback__)
    gc.collect()  # DDP sits in reference cycles; collect it while the interpreter is whole
    if wait_for_peers:
        dist.barrier()  # no rank destroys the group while another still writes or communicates
    dist.destroy_process_group()
    gc.collect()
