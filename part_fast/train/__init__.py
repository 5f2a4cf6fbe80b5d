"""The PART trainer as a library: AT, TRADES, MART and their PART versions (PART, PART-T, PART-M).

    config.py        TrainConfig: every setting, its default and help (the CLI is built from it)
    methods.py       one Method record per training method: base, inner attack per phase, outer loss
    step.py          one optimiser step: augment -> budget -> attack -> outer loss -> update
    loop.py          train(): epochs, evaluation, metrics, checkpoints, resume, preemption
    loaders.py       each rank's training and evaluation loaders
    progress.py      the epoch in progress (EpochProgress): its sums, as a checkpoint keeps and regroups them
    averaging.py     WeightAverage: the EMA of the weights and BatchNorm statistics (--ema-decay)
    awp.py           WeightPerturbation: adversarial weight perturbation (--awp-gamma)
    checkpoint.py    checked, atomic checkpoints (last.pt + previous.pt), what they hold, load_model
    rundir.py        the run directory: new, resumed, auto-resumed; its metrics and TensorBoard logs
    distributed.py   torchrun / DDP: collectives and a clean process-group teardown
    preemption.py    SIGTERM / SIGINT: stop after the step, checkpoint, exit
    sampler.py       the data order, resumable mid-epoch
"""
from ..errors import CheckpointError, Interrupted, TrainingDiverged
from .config import AMP_DTYPES, AT_PART_STARTS, DATASET_DEFAULTS, RESUMABLE_CHANGES, TrainConfig
from .distributed import Distributed
from .methods import METHOD, METHODS, Method
from .averaging import WeightAverage
from .checkpoint import WEIGHTS, load_checkpoint, load_model, model_from
from .loop import train
from .step import (PURPOSE_ATTACK, PURPOSE_AUGMENT, PURPOSE_MODEL, STAT_NAMES, RunState, StepRandomness, StepResult,
                   build_model, build_state, derived_seed, lr_factor, inner_attack, train_step)

__all__ = [
    "AMP_DTYPES", "DATASET_DEFAULTS", "METHOD", "METHODS", "Method", "RESUMABLE_CHANGES", "AT_PART_STARTS",
    "CheckpointError", "Distributed", "Interrupted", "PURPOSE_ATTACK", "PURPOSE_AUGMENT", "PURPOSE_MODEL", "RunState", "STAT_NAMES",
    "StepRandomness", "StepResult", "TrainConfig", "TrainingDiverged", "build_model", "build_state", "derived_seed",
    "WEIGHTS", "WeightAverage", "load_checkpoint", "load_model", "lr_factor", "inner_attack", "model_from", "train",
    "train_step",
]
