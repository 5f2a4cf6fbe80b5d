"""The training loop: epochs of steps, per-epoch evaluation and metrics, checkpoints, resume, preemption.

Where a run stands is (epoch, step in epoch, global step), and every random draw of a step is a function
of (seed, epoch, rank, step) (step.StepRandomness), the data order of (seed, epoch) (sampler.py). A
checkpoint therefore holds all an interrupted run needs to continue exactly, at an epoch boundary or in
the middle of an epoch: the weights and optimiser state, the position, and the running sums of the epoch in
progress (per rank, with each rank's BatchNorm statistics under DDP; progress.py). The loaders are in
loaders.py, what a checkpoint holds in checkpoint.py.

Checkpoints are written at the end of every epoch, every `save_every_steps` steps, when
`save_every_minutes` have passed since the last one (rank 0's clock decides; the decision travels with the
step's collective), and on SIGTERM / SIGINT after the step in progress, which then raises `Interrupted`.

Scale: one process per device under torchrun (DDP). Each rank augments, budgets and attacks its own shard
of the global batch; the outer-loss forward/backward is the only DDP call; metrics are summed across ranks;
only rank 0 writes files.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..devices import describe_device
from ..errors import CheckpointWriteError, ConfigError, Interrupted, OutputWriteError, TrainingDiverged, UserError
from ..evaluation import evaluate
from ..extras import progress_bar
from . import checkpoint, distributed, preemption, rundir
from . import progress as epoch_progress
from .config import TrainConfig, flag_of
from .distributed import Distributed
from .loaders import data_loaders
from .progress import EpochProgress
from .step import STAT_NAMES, StepRandomness, build_state, inner_attack, restore_lr, train_step

logger = logging.getLogger(__name__)
_clock = time.monotonic  # what --save-every-minutes measures (a name of its own, so tests can drive it)


def train(config: TrainConfig, *, resume: bool | str = False) -> list[dict]:
    """Train as `config` says, writing RUN_DIR = config.out (see rundir.py); returns the per-epoch metrics.

    Rank 0 logs the run's lines (the device, one line per epoch, a resume) at INFO on this module's logger,
    warnings at WARNING (part_fast.logs: the command line prints them; a script configures logging).

    resume: False starts a new run (RUN_DIR must not hold one); True continues the run in RUN_DIR from its
    newest intact checkpoint; "auto" does the one that applies, so one command line can be re-run by a
    scheduler or `torchrun --max-restarts`. Raises Interrupted after a SIGTERM / SIGINT (checkpoint
    written), TrainingDiverged on a NaN / inf loss (the last good checkpoint kept).

    Args:
        config: the run's settings (TrainConfig); resolved (dataset defaults filled in) and validated here.
        resume: False, True or "auto", as above.

    Returns:
        One dict per epoch trained by this call (metrics.jsonl's records): losses, accuracies, timings.
    """
    if resume not in (False, True, "auto"):
        raise ConfigError(f"resume must be False, True or 'auto', got {resume!r}")
    config = config.resolved()
    with distributed.session(config.device, config.collective_timeout) as ranks:
        return _Trainer(config, ranks).run(resume)


# ------------------------------------------------------------------------------------------ the trainer
def _progress_enabled(config: TrainConfig, is_main: bool) -> bool:
    if not is_main:
        return False
    return sys.stderr.isatty() if config.progress is None else bool(config.progress)


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


class _Trainer:
    def __init__(self, config: TrainConfig, ranks: Distributed):
        self.config, self.ranks = config, ranks
        self.out = Path(config.out)
        self.show = _progress_enabled(config, ranks.is_main)
        self.history: list[dict] = []
        self.progress: EpochProgress | None = None  # restored mid-epoch sums, used by the next epoch
        self.last_save = _clock()
        # Rank 0 alone writes the logs; a failed write is kept here and told to every rank by the next
        # collective (the step's, or the epoch end's), so all stop together.
        self.write_failure: tuple[Path, OSError] | None = None
        self.tensorboard: rundir.TensorBoardLog | None = None  # rank 0, with config.tensorboard

    # -------------------------------------------------------------------------------------- set-up
    def run(self, resume) -> list[dict]:
        config, ranks = self.config, self.ranks
        config.validate_device(ranks.device.type)  # "auto" became a device only now
        self.log(f"part-fast train: device {describe_device(ranks.device)}")  # first, before minutes of set-up
        if config.tensorboard:
            rundir.summary_writer_class()  # every rank: a missing package stops them all, before any work
        # Data and model first: a missing dataset or an unknown architecture is reported before RUN_DIR
        # exists, so a corrected rerun needs no --resume.
        self.loaders = loaders = data_loaders(config, ranks)
        self.train_loader, data_info = loaders.train, loaders.info
        self.eval_loader, self.val_loader = loaders.evaluation, loaders.validation
        self.steps_per_epoch = len(self.train_loader)
        self.state = build_state(config, data_info.num_classes, ranks.device, ranks)
        self.rng = StepRandomness(config.seed, ranks.rank, ranks.device, config.augment)
        ckpt = rundir.prepare_on_all_ranks(config, ranks, resume, warn=self._warn)
        if ckpt is not None:
            self._restore(ckpt)
        elif resume:  # stopped before the first checkpoint: its steps are redone
            self._write(self.out / rundir.STEPS, lambda: rundir.trim_steps_log(self.out, 0))
        base_batch = self.train_loader.batch_size * ranks.world  # (the rest of a batch is extra data)
        unused = len(self.train_loader.dataset) - self.steps_per_epoch * base_batch
        if unused:
            self.log(f"part-fast train: {unused} of the {len(self.train_loader.dataset)} training examples are left "
                     f"out of each epoch: only whole batches of {base_batch} are trained (the last partial batch "
                     "is dropped), and which examples are left out changes with each epoch's shuffle")
        if self.state.epoch >= config.epochs:
            self._agree(None)
            self.log(f"{self.out} has already trained {self.state.epoch}/{config.epochs} epochs; nothing to do")
            return self.history
        steps_log = None
        if config.log_steps and ranks.is_main:
            steps_log = self._write(self.out / rundir.STEPS, lambda: open(self.out / rundir.STEPS, "a"))
        if config.tensorboard and ranks.is_main:
            self.tensorboard = self._write(self.out / rundir.TENSORBOARD,
                                           lambda: rundir.TensorBoardLog(self.out, self.history))
        try:
            with preemption.stop_requests(announce=ranks.is_main) as stop:
                self.last_save = _clock()
                epochs = progress_bar(range(self.state.epoch, config.epochs), desc=f"{config.method} epochs",
                                      disable=not self.show, initial=self.state.epoch, total=config.epochs)
                for epoch in epochs:
                    self._epoch(epoch, stop, steps_log)
        finally:
            if steps_log is not None:
                steps_log.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        return self.history

    def log(self, line: str) -> None:
        """One of the run's lines: rank 0's only (every rank would repeat it)."""
        if self.ranks.is_main:
            logger.info(line)

    @staticmethod
    def _warn(line: str) -> None:
        logger.warning(f"part-fast: {line}")

    def _write(self, path: Path, write):
        """Run rank 0's write of `path`; a failure is kept for the next agreement (see write_failure)."""
        if not self.ranks.is_main or self.write_failure is not None:
            return None
        try:
            return write()
        except OSError as err:
            self.write_failure = (path, err)
            return None

    def _write_error(self) -> OutputWriteError:
        if self.write_failure is None:
            return OutputWriteError(f"rank 0 could not write to {self.out}; see its error")
        path, err = self.write_failure
        return OutputWriteError(f"could not write {path}: {err.strerror or err}; the checkpoints in {self.out} "
                                "are intact")

    def _agree(self, stop: preemption.StopRequest | None) -> bool:
        """One collective between steps: every rank raises if rank 0 failed a write, and learns whether
        any rank was asked to stop."""
        stop_votes, write_votes = self.ranks.agree([stop is not None and stop.requested,
                                                   self.write_failure is not None])
        if write_votes:
            raise self._write_error()
        return bool(stop_votes)

    def _refuse_diverged(self, progress: EpochProgress) -> None:
        """TrainingDiverged on every rank if any rank had a non-finite loss in this epoch. Steps do not
        check (that would make the host wait for the device every step); this runs before every checkpoint,
        log line and epoch end, so nothing written ever comes from past a non-finite loss."""
        first = progress.first_non_finite_step()
        firsts = [int(f) for (f,) in self.ranks.all_gather([-1 if first is None else first]) if f >= 0]
        if firsts:
            config = self.config
            step = min(firsts)
            raise TrainingDiverged(f"the {config.method} loss became non-finite (nan or inf) at global step {step} "
                                   f"(epoch {self.state.epoch + 1}); the last checkpoint "
                                   f"({self.out / checkpoint.LAST}) holds the weights before it")

    def _refuse_non_finite(self, when: str) -> None:
        """TrainingDiverged on every rank if any holds a non-finite weight or BatchNorm statistic (a finite
        loss can still give an overflowing update); the last checkpoint is never one of them."""
        (non_finite,) = self.ranks.all_sum([0.0 if _all_finite(self.state.model) else 1.0])
        if non_finite:
            raise TrainingDiverged(f"the weights became non-finite {when}; the last checkpoint "
                                   f"({self.out / checkpoint.LAST}) holds finite weights")

    def _restore(self, ckpt: dict) -> None:
        state, ranks = self.state, self.ranks
        saved_world = ckpt.get("world", 1)  # another than ranks.world only with allow_world_change (rundir.prepare)
        if ckpt.get("steps_per_epoch") != self.steps_per_epoch:
            raise UserError(f"the run has {ckpt.get('steps_per_epoch')} steps per epoch but would continue with "
                            f"{self.steps_per_epoch}: the data or the batch size changed")
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        restore_lr(state.optimizer, state.scheduler)
        state.scaler.load_state_dict(ckpt["scaler"])
        if state.average is not None:
            state.average.load_state_dict(ckpt["average"])
        state.epoch, state.step_in_epoch, state.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self.history = list(ckpt.get("metrics", []))
        if ckpt.get("epoch_progress") is not None:
            self.progress = epoch_progress.restored(ckpt["epoch_progress"], ranks.rank, saved_world, ranks.world,
                                                    ranks.device)
        if ckpt.get("rank_buffers") is not None:
            saved = ckpt["rank_buffers"]
            with torch.no_grad():  # a rank the checkpoint did not have takes rank 0's BatchNorm statistics
                for buffer, value in zip(state.rank_buffers(), saved[ranks.rank if ranks.rank < len(saved) else 0],
                                         strict=True):
                    buffer.copy_(value)
        if saved_world != ranks.world:
            self._warn(f"warning: the run was trained by {saved_world} process(es) and continues with {ranks.world} "
                       f"({flag_of('allow_world_change')}): the same examples in every global batch, other random "
                       "streams and BatchNorm statistics, so no longer bit-equal to an uninterrupted run")
        self._write(self.out / rundir.METRICS, lambda: rundir.write_metrics(self.out, self.history))
        self._write(self.out / rundir.STEPS, lambda: rundir.trim_steps_log(self.out, state.global_step))
        self.log(f"resumed {self.out} at {checkpoint.describe(ckpt)}")

    # -------------------------------------------------------------------------------------- epochs
    def _epoch(self, epoch: int, stop: preemption.StopRequest, steps_log) -> None:
        config, state, ranks = self.config, self.state, self.ranks
        part_phase = config.is_part and epoch >= config.warmup
        attack = inner_attack(state, part_phase)
        perturb_weights = state.perturbation is not None and epoch >= config.awp_warmup
        first = state.step_in_epoch  # > 0 only right after a mid-epoch resume
        progress = self.progress or EpochProgress(ranks.device)
        self.progress = None
        self.loaders.set_epoch(epoch, first)
        lr = state.optimizer.param_groups[0]["lr"]
        started = time.perf_counter() - progress.elapsed
        batches = progress_bar(self.loaders.batches(), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not self.show,
                               leave=False, initial=first, total=self.steps_per_epoch)
        show_every = max(1, self.steps_per_epoch // 20)  # reading the bar's loss waits for the device: not every step
        for step, (x, y) in enumerate(batches, start=first):
            with self.rng.at(epoch, step):
                r = train_step(state, x, y, part_phase=part_phase, attack=attack, attack_gen=self.rng.attack,
                               augment_gen=self.rng.augment, perturb_weights=perturb_weights)
            state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
            progress.add(r, state.global_step)
            # Host numbers only (gloo, never the device): every rank stops, or saves, after the same step.
            stop_votes, save_votes, write_votes = ranks.agree([stop.requested, ranks.is_main and self._minutes_due(),
                                                              self.write_failure is not None])
            if write_votes:  # a log line of an earlier step could not be written
                raise self._write_error()
            progress.elapsed = time.perf_counter() - started
            if config.log_steps:  # (every rank: a collective)
                loss_sum, examples, non_finite = ranks.all_sum(
                    [r.value("loss_sum"), r.value("examples"), r.value("non_finite")])
                if non_finite:
                    self._refuse_diverged(progress)
                line = (f'{{"epoch": {epoch + 1}, "step": {step + 1}, "global_step": {state.global_step}, '
                        f'"loss": {loss_sum / examples!r}, "lr": {lr!r}}}\n')
                if steps_log is not None:
                    self._write(self.out / rundir.STEPS, lambda: (steps_log.write(line), steps_log.flush()))
            if self.show and step % show_every == 0:
                batches.set_postfix(loss=f"{r.loss:.3f}")  # rank 0's own batch
            if stop_votes:
                self._save(progress)
                raise self._interrupted(stop)
            # On the epoch's last step the epoch's checkpoint follows, at once when there is no evaluation.
            skip = step + 1 == self.steps_per_epoch and self.eval_loader is None and self.val_loader is None
            if not skip and (save_votes or (config.save_every_steps and state.global_step % config.save_every_steps == 0)):
                self._save(progress)
        state.sync()  # the host ran ahead of the device: the epoch ends when the device is done
        progress.elapsed = time.perf_counter() - started
        self._end_epoch(epoch, part_phase, lr, progress, stop)

    def _minutes_due(self) -> bool:
        minutes = self.config.save_every_minutes
        return minutes > 0 and _clock() - self.last_save >= 60 * minutes

    def _end_epoch(self, epoch: int, part_phase: bool, lr: float, progress: EpochProgress,
                   stop: preemption.StopRequest) -> None:
        config, state, ranks = self.config, self.state, self.ranks
        # A signal after the last step's collective: stop now rather than after the evaluation.
        if self._agree(stop):
            self._save(progress)
            raise self._interrupted(stop)
        self._refuse_diverged(progress)
        state.scheduler.step()
        sums = dict(zip(STAT_NAMES, ranks.all_sum(list(progress.sums().values()))))
        n = sums["examples"]
        (steps,) = ranks.all_sum([progress.steps])
        # Every rank gets rank 0's BatchNorm statistics: they are what the checkpoint holds, and the ranks
        # evaluate their shards of the test set with one model.
        ranks.broadcast_(state.rank_buffers())
        self._refuse_non_finite(f"in epoch {epoch + 1}")  # before the evaluation, and for the epoch's checkpoint
        record = {
            "epoch": epoch + 1,
            "phase": ("part" if part_phase else "warmup") if config.is_part else config.method,
            "lr": lr,
            "train_loss": sums["loss_sum"] / n,
            "train_adv_acc": 100 * sums["correct_adv"] / n,
            "train_nat_acc": 100 * sums["correct_nat"] / n if config.training_method.natural_logits else None,
            "train_examples": int(n),
            "eps_high_fraction": sums["eps_high"] / steps,
            "epoch_seconds": progress.elapsed,
        }
        if state.average is not None:
            record["evaluated_weights"] = "average"
        if config.time_stages:
            record.update({f"{k}_seconds": v for k, v in progress.seconds.items()
                           if k != "awp" or state.perturbation is not None})
        if self.eval_loader is not None:
            record.update(self._evaluate(self.eval_loader, "test"))
        best = False
        if self.val_loader is not None:
            record.update(self._evaluate(self.val_loader, "val"))
            best = _is_best(record, self.history)
            record["best_epoch"] = record["epoch"] if best else self.history[-1]["best_epoch"]
        state.epoch, state.step_in_epoch = epoch + 1, 0
        self.history.append(record)
        self._save(None, best=best)  # first the checkpoint(s), then the log that cites them
        self._write(self.out / rundir.METRICS, lambda: rundir.write_metrics(self.out, self.history))
        if self.tensorboard is not None:
            self._write(self.out / rundir.TENSORBOARD, lambda: self.tensorboard.add(record))
        self.log(_summary_line(record, config))
        # A signal that came during the evaluation: the epoch's checkpoint is already written.
        if self._agree(stop):
            raise self._interrupted(stop)

    def _evaluate(self, loader, split: str) -> dict:
        """Natural and PGD-20 accuracy of the evaluated model (the weight average when there is one) on every
        rank's shard of `loader`, summed over ranks; keys "<split>_nat_acc", "<split>_pgd20_acc", "<split>_examples"."""
        config, state, ranks = self.config, self.state, self.ranks
        res = evaluate(state.evaluated_model, loader, attacks=("natural", "pgd20"), eps=config.eps,
                       alpha=config.step_size, device=state.device, seed=config.seed, progress=False)
        n = res["examples"]
        nat, pgd, total = ranks.all_sum([res["natural"] * n / 100, res["pgd20"] * n / 100, n])
        return {f"{split}_nat_acc": 100 * nat / total, f"{split}_pgd20_acc": 100 * pgd / total,
                f"{split}_examples": int(total)}

    # ---------------------------------------------------------------------------------- checkpoints
    def _save(self, progress: EpochProgress | None, best: bool = False) -> None:
        """Every rank calls it (it gathers their state); rank 0 writes; all learn whether that worked. With
        `best` (an epoch's end), the same checkpoint is written to best.pt first: a stop between the two
        writes redoes the epoch from the older last.pt, which writes the same best.pt again."""
        state, ranks = self.state, self.ranks
        mid_epoch = progress is not None
        if mid_epoch:  # (the epoch's own checkpoint follows the epoch end's checks)
            self._refuse_diverged(progress)
            self._refuse_non_finite(f"by step {state.global_step}")
        per_rank_progress = epoch_progress.gathered(progress, ranks) if mid_epoch else None
        # Between epochs every rank holds rank 0's BatchNorm statistics; in the middle of one each rank has
        # its own, and resuming exactly needs them all.
        rank_buffers = ranks.all_gather_tensors(state.rank_buffers()) if mid_epoch and ranks.enabled else None
        error = None
        if ranks.is_main:
            try:
                contents = checkpoint.contents(
                    state, config=self.config, steps_per_epoch=self.steps_per_epoch, world=ranks.world,
                    metrics=self.history, epoch_progress=per_rank_progress, rank_buffers=rank_buffers)
                if best:
                    checkpoint.save(self.out / checkpoint.BEST, contents, keep_previous=False)
                checkpoint.save(self.out / checkpoint.LAST, contents)
            except CheckpointWriteError as err:
                error = err
        ranks.raise_together(error, lambda _: CheckpointWriteError(
            f"rank 0 could not write the checkpoint in {self.out}; see its error"))
        self.last_save = _clock()

    def _interrupted(self, stop: preemption.StopRequest) -> Interrupted:
        state = self.state
        if 0 < state.step_in_epoch < self.steps_per_epoch:
            where = f"epoch {state.epoch + 1}, step {state.step_in_epoch}/{self.steps_per_epoch}"
        else:
            where = f"after epoch {state.epoch + (1 if state.step_in_epoch else 0)}"
        # A rank that was not signalled itself stops because another was: report it as SIGTERM.
        signum = stop.signum if stop.signum is not None else 15
        return Interrupted(signum, str(self.out / checkpoint.LAST), state.global_step, where)


def _is_best(record: dict, history: list[dict]) -> bool:
    """Whether the epoch of `record` has the highest validation PGD-20 accuracy so far (ties: the earlier
    epoch stays best)."""
    return all(record["val_pgd20_acc"] > r["val_pgd20_acc"] for r in history)


def _summary_line(r: dict, config: TrainConfig) -> str:
    parts = [f"epoch {r['epoch']}/{config.epochs} [{r['phase']}]", f"loss {r['train_loss']:.4f}",
             f"train adv {r['train_adv_acc']:.1f}%"]
    if "test_nat_acc" in r:
        parts.append(f"test nat {r['test_nat_acc']:.1f}% pgd20 {r['test_pgd20_acc']:.1f}%")
    if "val_nat_acc" in r:
        best = " (best.pt)" if r["best_epoch"] == r["epoch"] else ""
        parts.append(f"val nat {r['val_nat_acc']:.1f}% pgd20 {r['val_pgd20_acc']:.1f}%{best}")
    timed = f"{r['epoch_seconds']:.1f}s"
    if "attack_seconds" in r:
        awp = f" awp {r['awp_seconds']:.1f}" if "awp_seconds" in r else ""
        timed += (f" (budget {r['budget_seconds']:.1f} attack {r['attack_seconds']:.1f}{awp} "
                  f"update {r['update_seconds']:.1f})")
    parts.append(timed)
    return " | ".join(parts)
