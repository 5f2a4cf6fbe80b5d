"""Extra training data (--extra-data, --extra-fraction; part_fast/data/extra.py): the .npz reader, memory-
mapped and checked; the share of every batch; the budget of the mixed batch; exact resume mid-epoch."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from part_fast.budget import PixelBudget
from part_fast.data import ExtraImages
from part_fast.errors import ConfigError, DataError
from part_fast.train import checkpoint, load_checkpoint, train
from part_fast.train.distributed import Distributed
from part_fast.train.loaders import data_loaders

from helpers import assert_same_weights, tiny, weights, without_timings

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, n=200, size=32, classes=4, **overrides):
    """n extra images whose pixels are all the value (index mod 251): each image says which it is."""
    images = np.broadcast_to((np.arange(n) % 251).astype(np.uint8)[:, None, None, None], (n, size, size, 3)).copy()
    arrays = {"images": images, "labels": np.arange(n) % classes, **overrides}
    np.savez(path, **arrays)
    return path


def test_reader_maps_the_file_and_gives_every_item(tmp_path):
    path = _write(tmp_path / "extra.npz", n=30)
    ds = ExtraImages(path, (32, 32), 4)
    assert isinstance(ds.images, np.memmap) and len(ds) == 30  # mapped, not read
    for i in (0, 7, 29):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == i % 4
        assert torch.equal(x, torch.full((3, 32, 32), float(i)) / 255)


@pytest.mark.parametrize("overrides, match", [
    ({"images": np.zeros((4, 32, 32, 3), np.float32), "labels": np.zeros(4, int)}, r"images must be uint8 of shape \(N, 32, 32, 3\)"),
    ({"images": np.zeros((4, 3, 32, 32), np.uint8), "labels": np.zeros(4, int)}, r"channels last.*got uint8 \(4, 3, 32, 32\)"),
    ({"images": np.zeros((4, 64, 64, 3), np.uint8), "labels": np.zeros(4, int)}, r"training set's size\), got uint8 \(4, 64, 64, 3\)"),
    ({"images": np.zeros((4, 32, 32, 3), np.uint8), "labels": np.zeros(4, np.float32)}, r"labels must be integers of shape \(4,\)"),
    ({"images": np.zeros((4, 32, 32, 3), np.uint8), "labels": np.zeros(5, int)}, r"labels must be integers of shape \(4,\)"),
    ({"images": np.zeros((4, 32, 32, 3), np.uint8), "labels": np.array([0, 1, 2, 4])}, r"labels must lie in \[0, 4\), got 0 \.\. 4"),
    ({"images": np.zeros((4, 32, 32, 3), np.uint8), "labels": np.array([0, -1, 2, 3])}, r"labels must lie in \[0, 4\), got -1 \.\. 3"),
    ({"images": np.zeros((4, 32, 32, 3), np.uint8)}, r"has no array 'labels'"),
])
def test_a_wrong_file_is_a_clear_error(tmp_path, overrides, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **overrides)
    with pytest.raises(DataError, match=match):
        ExtraImages(path, (32, 32), 4)


def test_compressed_or_missing_or_not_an_archive(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, int))
    with pytest.raises(DataError, match="compressed \\(np.savez_compressed\\), which cannot be memory-mapped"):
        ExtraImages(tmp_path / "c.npz", (32, 32), 4)
    np.savez(tmp_path / "dm-at.npz", image=np.full((2, 32, 32, 3), 9, np.uint8), label=np.array([3, 1]))  # DM-AT's names
    assert ExtraImages(tmp_path / "dm-at.npz", (32, 32), 4)[1][1] == 1
    with pytest.raises(DataError, match="no extra-data file at"):
        ExtraImages(tmp_path / "none.npz", (32, 32), 4)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match="is not an .npz archive"):
        ExtraImages(tmp_path / "text.npz", (32, 32), 4)


def _is_extra(x: torch.Tensor) -> torch.Tensor:
    """Per image of a batch: all its pixels equal (the extra images are constant, the shapes never)."""
    flat = x.reshape(x.shape[0], -1)
    return (flat == flat[:, :1]).all(1)


@pytest.mark.parametrize("fraction, extra_per_batch", [(0.5, 16), (0.7, 22), (0.25, 8)])
def test_every_batch_holds_the_fraction_of_extra_images(tmp_path, fraction, extra_per_batch):
    path = _write(tmp_path / "extra.npz", n=250)
    config = tiny(tmp_path / "run", extra_data=str(path), extra_fraction=fraction).resolved()
    loaders = data_loaders(config, Distributed())
    assert loaders.info.num_classes == 10
    loaders.set_epoch(0, 0)
    batches = list(loaders.batches())
    assert len(batches) == 96 // (32 - extra_per_batch) and all(x.shape[0] == 32 for x, _ in batches)
    seen = []
    for x, y in batches:
        extra = _is_extra(x)
        assert extra.tolist() == [False] * (32 - extra_per_batch) + [True] * extra_per_batch
        ids = (x[extra, 0, 0, 0] * 255).round().long()
        assert torch.equal(y[extra], ids % 4)  # each extra image comes with its own label
        seen += ids.tolist()
    assert len(set(seen)) == len(seen)  # no extra image twice in an epoch
    loaders.set_epoch(1, 0)
    assert [i for x, _ in loaders.batches() for i in (x[_is_extra(x), 0, 0, 0] * 255).round().long().tolist()] != seen


def test_too_few_extra_images_or_a_fraction_out_of_range(tmp_path):
    path = _write(tmp_path / "extra.npz", n=40)
    with pytest.raises(ConfigError, match=r"has 40 images; an epoch of 6 steps takes 96 at extra_fraction 0.5"):
        data_loaders(tiny(tmp_path / "run", extra_data=str(path), extra_fraction=0.5).resolved(), Distributed())
    with pytest.raises(ConfigError, match=r"extra_fraction must be in \(0, 1\), got 1.0"):
        tiny(tmp_path / "run", extra_data=str(path), extra_fraction=1.0).resolved()
    with pytest.raises(ConfigError, match="choose a fraction that leaves at least one image of each kind"):
        data_loaders(tiny(tmp_path / "run", extra_data=str(path), extra_fraction=0.01).resolved(), Distributed())


def test_the_budget_covers_the_extra_images_and_a_mid_epoch_resume_is_exact(tmp_path, monkeypatch):
    path = _write(tmp_path / "extra.npz", n=250, classes=10)
    budgeted = []
    real = PixelBudget.with_logits

    def recording(self, model, x):
        budgeted.append(int(_is_extra(x).sum()))
        return real(self, model, x)

    monkeypatch.setattr(PixelBudget, "with_logits", recording)
    options = dict(extra_data=str(path), extra_fraction=0.5, epochs=2, warmup=1, save_every_steps=4, augment=False,
                   save_every_minutes=0)
    full = train(tiny(tmp_path / "full", **options))
    assert budgeted == [16] * 6  # the PART epoch: every step's budget is of the mixed batch (not augmented here)
    assert all(r["train_examples"] == 192 for r in full)  # 6 steps of 16 + 16
    # The checkpoint before last.pt is from step 8 (epoch 2, step 2 of 6): resume there.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    (cut / checkpoint.LAST).unlink()
    assert load_checkpoint(cut / checkpoint.PREVIOUS)["global_step"] == 8
    resumed = train(tiny(cut, **options), resume=True)
    assert_same_weights(weights(tmp_path / "full"), weights(cut))
    assert without_timings(resumed) == without_timings(full)  # (the history the checkpoint held, then epoch 2)
