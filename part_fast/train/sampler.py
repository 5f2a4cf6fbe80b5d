"""The data order: one sampler for one process or many, resumable part-way through an epoch."""
from __future__ import annotations

import itertools
import operator

from torch.utils.data.distributed import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled, drop_last) whose epoch can start part-way.

    The permutation of epoch e depends only on (seed, e); rank r takes every world-th index of it, so the
    ranks together see the batches of a single-process run. `set_epoch(e, start=k)` skips the first k
    indices of this rank's share: with k a multiple of the batch size, the batches that follow are exactly
    those an uninterrupted epoch would have yielded from there on."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        start = operator.index(start)
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be between 0 and the {self.num_samples} indices of this rank, got {start}")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start
