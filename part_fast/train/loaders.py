"""The trainer's data loaders: each rank's shard of the training set in the resumable order of sampler.py,
and its shard of the evaluation examples."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from .. import data as data_mod
from ..errors import ConfigError, UserError
from . import preemption
from .config import TrainConfig
from .distributed import Distributed
from .sampler import ResumableDistributedSampler


def data_loaders(config: TrainConfig, ranks: Distributed):
    """(train loader, its sampler, evaluation loader or None, DataInfo) of this rank.

    The training loader yields this rank's share of each global batch of config.batch_size (which must split
    evenly over the processes), whole batches only; the evaluation loader this rank's share of the first
    config.eval_examples test examples. With config.download under torchrun, rank 0 downloads alone first."""
    def build(download):
        return data_mod.build_datasets(config.dataset, config.data_dir, download=download,
                                       train_subset=config.train_subset, test_subset=config.test_subset, seed=config.seed)

    if config.download and ranks.enabled:
        # Rank 0 downloads alone; the others read what it fetched (one writer per folder).
        error = None
        if ranks.is_main:
            try:
                build(True)
            except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
                error = err
        ranks.raise_together(error, lambda _: UserError("rank 0 could not download the dataset; see its error"))
    if config.batch_size % ranks.world:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {ranks.world} processes "
                          "(it is the global batch, split evenly)")
    train_set, test_set, data_info = build(config.download and not ranks.enabled)
    local_batch = config.batch_size // ranks.world
    if len(train_set) < config.batch_size:
        raise ConfigError(f"the training set has {len(train_set)} examples, fewer than one batch of {config.batch_size}")
    sampler = ResumableDistributedSampler(train_set, num_replicas=ranks.world, rank=ranks.rank, seed=config.seed)
    pin = ranks.device.type == "cuda"
    # The loader gets its own generator (it only seeds worker processes, whose datasets draw nothing) so it
    # never consumes the caller's global one.
    train_loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=config.workers,
                              pin_memory=pin, drop_last=True, persistent_workers=config.workers > 0,
                              worker_init_fn=preemption.ignore_stop_signals,
                              generator=torch.Generator().manual_seed(config.seed))
    eval_loader = None
    if config.eval_examples:
        n = min(config.eval_examples, len(test_set))
        if n < ranks.world:
            raise ConfigError(f"eval_examples ({n} available) must be at least the number of processes ({ranks.world})")
        shard = Subset(test_set, range(ranks.rank, n, ranks.world))
        eval_loader = DataLoader(shard, batch_size=max(local_batch, 1), num_workers=config.workers, pin_memory=pin,
                                 worker_init_fn=preemption.ignore_stop_signals)
    return train_loader, sampler, eval_loader, data_info
