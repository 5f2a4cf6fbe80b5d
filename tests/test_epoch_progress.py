"""The epoch in progress as a mid-epoch checkpoint keeps it (part_fast/train/progress.py): one dict per rank,
read back exactly; the positional vectors of the checkpoints written before the dict form (format 2 too)
still resume exactly; and the regrouping when a checkpoint continues on another number of processes."""
import shutil

import pytest
import torch

from part_fast.errors import CheckpointError
from part_fast.train import checkpoint, load_checkpoint, train
from part_fast.train.progress import FIELDS, LEGACY_FIELDS, SAVED_STATS, EpochProgress, regrouped, restored
from helpers import MID, assert_same_weights, metric_lines, step_lines, tiny, weights, without_timings

CPU = torch.device("cpu")
SUMMED = (*SAVED_STATS, "steps")


def _state(scale: int) -> dict:
    """A state_dict() whose values all differ."""
    return {**{k: float(scale * (i + 1)) for i, k in enumerate(FIELDS)}, "steps": 3 * scale}


def _vector(state: dict) -> list[float]:
    """The same values as the checkpoints before the dict form held them (no AWP stage then)."""
    return [float(state[k]) for k in LEGACY_FIELDS]


def _before_awp(state: dict) -> dict:
    return {**state, "awp_seconds": 0.0}


def test_state_dict_round_trip():
    progress = EpochProgress(CPU)
    progress.load_state_dict(_state(2))
    assert progress.state_dict() == _state(2)
    assert progress.sums()["non_finite"] == 0.0 and progress.first_non_finite_step() is None


def test_a_positional_vector_reads_as_its_dict_and_a_malformed_one_is_a_checkpoint_error():
    assert restored([_vector(_state(1))], 0, 1, 1, CPU).state_dict() == _before_awp(_state(1))
    # A dict saved before the AWP stage: its time is 0.
    saved = {k: v for k, v in _state(1).items() if k != "awp_seconds"}
    assert restored([saved], 0, 1, 1, CPU).state_dict() == _before_awp(_state(1))
    with pytest.raises(CheckpointError, match=rf"epoch progress has 3 values, expected {len(LEGACY_FIELDS)}"):
        restored([[1.0, 2.0, 3.0]], 0, 1, 1, CPU)
    with pytest.raises(CheckpointError, match=r"epoch progress: missing \[.*\], unexpected \['other'\]"):
        restored([{"steps": 1, "other": 2}], 0, 1, 1, CPU)


def test_regrouped_rank_0_carries_every_rank_s_sums_the_others_start_from_zero():
    states = [_state(1), _state(2), _state(5)]
    assert regrouped(states, 0) == {k: sum(s[k] for s in states) if k in SUMMED else states[0][k] for k in FIELDS}
    for rank in (1, 3):
        assert regrouped(states, rank) == {k: 0 if k in SUMMED else states[0][k] for k in FIELDS}
    for rank in range(4):  # 3 saved ranks continue on 4: both forms regroup alike
        assert (restored([_vector(s) for s in states], rank, 3, 4, CPU).state_dict()
                == restored([_before_awp(s) for s in states], rank, 3, 4, CPU).state_dict())


def test_a_checkpoint_with_positional_progress_resumes_exactly(tmp_path, mid_run, one_thread):
    # conftest's mid_run: 8 steps per epoch, a checkpoint every 3 steps: previous.pt holds step 15 (epoch 2,
    # step 7 of 8). Its copy loses last.pt, and previous.pt is rewritten with the old positional vectors.
    ref = mid_run[0]
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    (cut / checkpoint.LAST).unlink()
    ckpt = load_checkpoint(cut / checkpoint.PREVIOUS)
    assert (ckpt["global_step"], ckpt["format"], list(ckpt["epoch_progress"][0])) == (15, 2, list(FIELDS))
    ckpt["epoch_progress"] = [_vector(state) for state in ckpt["epoch_progress"]]
    checkpoint.save(cut / checkpoint.PREVIOUS, ckpt, keep_previous=False)

    train(tiny(cut, **MID, save_every_steps=3, save_every_minutes=0), resume=True)
    assert_same_weights(weights(ref), weights(cut))
    assert without_timings(metric_lines(cut)) == without_timings(metric_lines(ref))
    assert [s["loss"] for s in step_lines(cut)] == [s["loss"] for s in step_lines(ref)]
