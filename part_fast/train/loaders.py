"""The trainer's data loaders: each rank's shard of the training set in the resumable order of sampler.py,
its shard of the evaluation examples, and of the validation examples held out of the training set."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .. import data as data_mod
from ..data.extra import ExtraImages
from ..errors import ConfigError, UserError
from . import preemption
from .config import TrainConfig
from .distributed import Distributed
from .sampler import ResumableDistributedSampler
from .step import derived_seed

# The streams that draw the validation split and the extra data's order (step.derived_seed(seed, purpose)).
PURPOSE_VALIDATION, PURPOSE_EXTRA = 4, 5


@dataclass
class Loaders:
    """One rank's loaders: training (with its sampler), evaluation (config.eval_examples test examples),
    validation (config.val_examples held out of the training set) and the extra data's share of each batch
    (config.extra_data, with its sampler); None where there is none."""

    train: DataLoader
    sampler: ResumableDistributedSampler
    evaluation: DataLoader | None
    validation: DataLoader | None
    info: data_mod.DataInfo
    extra: DataLoader | None = None
    extra_sampler: ResumableDistributedSampler | None = None

    def set_epoch(self, epoch: int, step: int) -> None:
        """Both samplers at `step` of `epoch` (the batches an uninterrupted epoch yields from there on)."""
        self.sampler.set_epoch(epoch, start=step * self.train.batch_size)
        if self.extra_sampler is not None:
            self.extra_sampler.set_epoch(epoch, start=step * self.extra.batch_size)

    def batches(self):
        """This rank's batches of the epoch set by set_epoch: (x, y), the extra images after the training ones."""
        if self.extra is None:
            yield from self.train
            return
        for (x, y), (x_extra, y_extra) in zip(self.train, self.extra):
            yield torch.cat([x, x_extra]), torch.cat([y, y_extra])


def validation_split(train_set: Dataset, n: int, seed: int) -> tuple[Subset, Subset]:
    """(training, validation): `n` examples of `train_set` held out, drawn by `seed` alone (the same for every
    run with that seed and training set), each part in index order.

    Args:
        train_set: the full training set (after --train-subset).
        n: examples to hold out, 1 <= n < len(train_set).
        seed: the run's seed.

    Returns:
        Two disjoint Subsets of train_set that together cover it."""
    if not 1 <= n < len(train_set):
        raise ConfigError(f"val_examples must be between 1 and the training set's size - 1 ({len(train_set) - 1}), got {n}")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(derived_seed(seed, PURPOSE_VALIDATION)))
    held_out = order[:n].sort().values.tolist()
    kept = order[n:].sort().values.tolist()
    return Subset(train_set, kept), Subset(train_set, held_out)


def _sharded(dataset: Dataset, n: int, what: str, flag: str, ranks: Distributed, batch_size: int, config: TrainConfig,
             pin: bool) -> DataLoader:
    """This rank's share (every world-th example) of the first n examples of `dataset`, in batches."""
    if n < ranks.world:
        raise ConfigError(f"{flag} ({n} available) must be at least the number of processes ({ranks.world}): each "
                          f"process evaluates its share of the {what}")
    shard = Subset(dataset, range(ranks.rank, n, ranks.world))
    return DataLoader(shard, batch_size=max(batch_size, 1), num_workers=config.workers, pin_memory=pin,
                      worker_init_fn=preemption.ignore_stop_signals)


def data_loaders(config: TrainConfig, ranks: Distributed) -> Loaders:
    """This rank's Loaders.

    The training loader yields this rank's share of each global batch of config.batch_size (which must split
    evenly over the processes), whole batches only; the evaluation loader this rank's share of the first
    config.eval_examples test examples; the validation loader its share of the config.val_examples held out
    of the training set (validation_split). With config.download under torchrun, rank 0 downloads alone first."""
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
    val_set = None
    if config.val_examples:
        train_set, val_set = validation_split(train_set, config.val_examples, config.seed)
    local_batch = config.batch_size // ranks.world
    extra_set, extra_per_rank = None, 0
    if config.extra_data:
        extra_set = ExtraImages(config.extra_data, data_info.image_size, data_info.num_classes)
        extra_per_rank = round(local_batch * config.extra_fraction)
        if not 1 <= extra_per_rank < local_batch:
            raise ConfigError(f"extra_fraction {config.extra_fraction} of a batch of {local_batch} per process gives "
                              f"{extra_per_rank} extra images per batch: choose a fraction that leaves at least one "
                              "image of each kind")
    base_batch = (local_batch - extra_per_rank) * ranks.world  # the training set's share of a global batch
    if len(train_set) < base_batch:
        held = f" once the {config.val_examples} validation examples are held out" if val_set is not None else ""
        raise ConfigError(f"the training set has {len(train_set)} examples{held}, fewer than one batch of "
                          f"{base_batch}")
    sampler = ResumableDistributedSampler(train_set, num_replicas=ranks.world, rank=ranks.rank, seed=config.seed)
    pin = ranks.device.type == "cuda"
    # The loader gets its own generator (it only seeds worker processes, whose datasets draw nothing) so it
    # never consumes the caller's global one.
    train_loader = DataLoader(train_set, batch_size=local_batch - extra_per_rank, sampler=sampler,
                              num_workers=config.workers, pin_memory=pin, drop_last=True,
                              persistent_workers=config.workers > 0, worker_init_fn=preemption.ignore_stop_signals,
                              generator=torch.Generator().manual_seed(config.seed))
    extra_loader = extra_sampler = None
    if extra_set is not None:
        # Its own order per epoch, from (seed, epoch) as the training set's; an epoch is one pass over the
        # training set, and takes its share of every batch from the extra images it has not used yet.
        extra_sampler = ResumableDistributedSampler(extra_set, num_replicas=ranks.world, rank=ranks.rank,
                                                    seed=derived_seed(config.seed, PURPOSE_EXTRA))
        needed = len(train_loader) * extra_per_rank * ranks.world
        if extra_sampler.num_samples * ranks.world < needed:
            raise ConfigError(f"{config.extra_data} has {len(extra_set)} images; an epoch of {len(train_loader)} steps "
                              f"takes {needed} at extra_fraction {config.extra_fraction}: give more images or a "
                              "smaller fraction")
        extra_loader = DataLoader(extra_set, batch_size=extra_per_rank, sampler=extra_sampler,
                                  num_workers=config.workers, pin_memory=pin, drop_last=True,
                                  persistent_workers=config.workers > 0, worker_init_fn=preemption.ignore_stop_signals,
                                  generator=torch.Generator().manual_seed(config.seed))
    eval_loader = val_loader = None
    if config.eval_examples:
        eval_loader = _sharded(test_set, min(config.eval_examples, len(test_set)), "test examples", "eval_examples",
                               ranks, local_batch, config, pin)
    if val_set is not None:
        val_loader = _sharded(val_set, len(val_set), "validation examples", "val_examples", ranks, local_batch, config,
                              pin)
    return Loaders(train_loader, sampler, eval_loader, val_loader, data_info, extra_loader, extra_sampler)
