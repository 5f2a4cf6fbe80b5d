"""Checkpoint integrity: atomic writes that keep the previous checkpoint, checks on load, falling back to
the previous checkpoint, a full disk, and one-line errors for damaged files."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import zipfile

import pytest
import torch

from part_fast import cli, files
from part_fast.errors import CheckpointError, CheckpointWriteError
from part_fast.train import checkpoint, load_checkpoint, train
from helpers import MID, assert_same_weights, quiet, tiny, weights, without_timings

# Small models: one intra-op thread is as fast, and never waits for a busy core (conftest's one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _ckpt(step: int) -> dict:
    """The smallest dict that is a part_fast checkpoint, with a tensor large enough to damage."""
    return {"format": checkpoint.FORMAT, "model": {"w": torch.arange(4096, dtype=torch.float32) + step},
            "optimizer": {}, "scheduler": {}, "epoch": step, "step_in_epoch": 0, "global_step": step, "config": {}}


def _flip_a_byte_of_the_weights(path):
    """Flip one byte in the middle of the stored tensor: the archive stays well-formed; only the CRC can tell."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_keeps_the_previous_checkpoint(tmp_path):
    last = tmp_path / "last.pt"
    checkpoint.save(last, _ckpt(1))
    assert not (tmp_path / "previous.pt").exists()
    checkpoint.save(last, _ckpt(2))
    checkpoint.save(last, _ckpt(3))
    assert load_checkpoint(last)["global_step"] == 3
    assert load_checkpoint(tmp_path / "previous.pt")["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"], "no temporary file is left"


def test_a_flipped_byte_is_caught_though_torch_load_would_read_it(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, _ckpt(1))
    _flip_a_byte_of_the_weights(path)
    damaged = torch.load(path, weights_only=True)["model"]["w"]  # torch.load alone does not notice
    assert not torch.equal(damaged, _ckpt(1)["model"]["w"])
    with pytest.raises(CheckpointError, match=r"last\.pt is damaged: its record .*data/0 fails its CRC-32 check"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_a_truncated_file_is_caught(tmp_path, keep):
    path = tmp_path / "last.pt"
    checkpoint.save(path, _ckpt(1))
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"last\.pt is damaged: not a whole checkpoint archive"):
        load_checkpoint(path)


def test_files_that_are_not_part_fast_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt is not a part_fast checkpoint of format 2 \(found none\)"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({**_ckpt(1), "format": 1}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"of format 2 \(found 1\)"):
        load_checkpoint(tmp_path / "old.pt")
    broken = _ckpt(1)
    del broken["global_step"]
    torch.save(broken, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing \['global_step'\]"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.pt")


class _NotPlainData:
    pass


def test_a_pickled_object_is_refused_not_executed(tmp_path):
    """Checkpoints load with weights_only=True: a file carrying arbitrary pickled objects is refused."""
    torch.save({**_ckpt(1), "extra": _NotPlainData()}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="is not a readable part_fast checkpoint"):
        load_checkpoint(tmp_path / "last.pt")


def test_newest_intact_falls_back_to_previous_with_one_warning(tmp_path):
    checkpoint.save(tmp_path / "last.pt", _ckpt(1))
    checkpoint.save(tmp_path / "last.pt", _ckpt(2))
    _flip_a_byte_of_the_weights(tmp_path / "last.pt")
    warnings = []
    ckpt, path = checkpoint.newest_intact(tmp_path, warnings.append)
    assert path == tmp_path / "previous.pt" and ckpt["global_step"] == 1
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {tmp_path / 'last.pt'} is damaged")
    assert warnings[0].endswith(f"moved it to last.pt.damaged and resuming from {path} (step 1, after epoch 1)")
    # The damaged file is kept for inspection, out of the way of the next save (which must not make it
    # the previous checkpoint).
    assert (tmp_path / "last.pt.damaged").exists() and not (tmp_path / "last.pt").exists()
    checkpoint.save(tmp_path / "last.pt", _ckpt(3))
    assert load_checkpoint(tmp_path / "previous.pt")["global_step"] == 1


def test_no_intact_checkpoint_is_an_error_naming_each_file(tmp_path):
    checkpoint.save(tmp_path / "last.pt", _ckpt(1))
    checkpoint.save(tmp_path / "last.pt", _ckpt(2))
    _flip_a_byte_of_the_weights(tmp_path / "last.pt")
    (tmp_path / "previous.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        checkpoint.newest_intact(tmp_path, quiet)
    assert str(tmp_path / "last.pt") in str(err.value) and str(tmp_path / "previous.pt") in str(err.value)
    assert checkpoint.newest_intact(tmp_path / "empty-dir-that-is-not-there", quiet) is None


def _disk_full_after(monkeypatch, written_bytes: int, on_call: int = 1):
    """torch.save whose `on_call`-th call writes `written_bytes` and then fails as a full disk does."""
    real = torch.save
    calls = {"n": 0}

    def full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != on_call:
            return real(obj, f, *args, **kwargs)
        f.write(b"\0" * written_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)


def test_a_full_disk_leaves_both_checkpoints_intact(tmp_path, monkeypatch):
    checkpoint.save(tmp_path / "last.pt", _ckpt(1))
    checkpoint.save(tmp_path / "last.pt", _ckpt(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _disk_full_after(monkeypatch, 5000)
    with pytest.raises(CheckpointWriteError) as err:
        checkpoint.save(tmp_path / "last.pt", _ckpt(3))
    assert str(err.value) == (f"could not write the checkpoint {tmp_path / 'last.pt'}: No space left on device; "
                              f"{tmp_path / 'last.pt'} is the previous checkpoint, intact")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "nothing changed, no temporary file left"


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    files.atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == [False, True]


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / ".last.pt.tmp-999999999"  # no such pid
    alive = tmp_path / f".last.pt.tmp-{os.getppid()}"  # a live process, maybe writing right now
    for p in (dead, alive):
        p.write_bytes(b"half")
    assert files.remove_stale_temp_files(tmp_path) == [dead]
    assert alive.exists() and not dead.exists()


# ---------------------------------------------------------------------------------- through the trainer
def test_resume_falls_back_to_the_previous_checkpoint_and_ends_exact(tmp_path, logged, mid_run, one_thread):
    ref, ref_history, _ = mid_run
    out = tmp_path / "run"
    shutil.copytree(ref, out)  # last.pt: the end (step 16); previous.pt: step 15 (epoch 2, step 7 of 8)
    _flip_a_byte_of_the_weights(out / "last.pt")
    resumed = train(tiny(out, **MID, save_every_steps=3, save_every_minutes=0), resume=True)
    err = [r.getMessage() for r in logged.records if r.levelno >= logging.WARNING]
    assert len(err) == 1 and err[0].startswith(f"part-fast: warning: {out / 'last.pt'} is damaged")
    assert "resuming from" in err[0] and "(step 15, epoch 2 step 7/8)" in err[0]
    assert without_timings(resumed) == without_timings(ref_history)
    assert_same_weights(weights(ref), weights(out))


TRAIN = ["train", "--dataset", "shapes", "--arch", "cnn-small", "--epochs", "2", "--warmup", "1", "--batch-size", "32",
         "--steps", "1", "--train-subset", "64", "--test-subset", "32", "--eval-examples", "0"]


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys,
                                                                               one_thread):
    _disk_full_after(monkeypatch, 1000, on_call=2)  # epoch 2's checkpoint
    out = tmp_path / "run"
    assert cli.main(TRAIN + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"part-fast train: error: could not write the checkpoint {out / 'last.pt'}: No space left on "
                   f"device; {out / 'last.pt'} is the previous checkpoint, intact")
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not list(out.glob(".*tmp*"))


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged") / "run"
    assert cli.main(TRAIN + ["--out", str(out)]) == 0
    _flip_a_byte_of_the_weights(out / "last.pt")
    truncated = out.parent / "truncated.pt"
    truncated.write_bytes((out / "previous.pt").read_bytes()[:1000])
    return out, truncated


@pytest.mark.parametrize("command", [["eval", "{path}", "--attacks", "natural"], ["show-cam", "{path}", "--out", "{png}"]])
@pytest.mark.parametrize("which", ["crc", "truncated"])
def test_eval_and_show_cam_on_a_damaged_checkpoint_are_one_line_exit_2(damaged_run, tmp_path, capsys, command, which):
    out, truncated = damaged_run
    path = out / "last.pt" if which == "crc" else truncated
    args = [a.format(path=path, png=tmp_path / "c.png") for a in command]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"part-fast {command[0]}: error: {path} is damaged: ")
    assert not (tmp_path / "c.png").exists()


def test_resume_with_no_intact_checkpoint_is_one_line_exit_2(damaged_run, tmp_path, capsys):
    out, _ = damaged_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "last.pt"):
        (copy / name).write_bytes((out / name).read_bytes())
    (copy / "previous.pt").write_bytes(b"PK")
    assert cli.main(["train", "--out", str(copy), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("part-fast train: error: no intact checkpoint to resume from: ")
    assert str(copy / "last.pt") in err and str(copy / "previous.pt") in err


@pytest.mark.parametrize("flag_bit", [0x01, 0x20, 0x40])
def test_a_flipped_flag_bit_is_damage_too(tmp_path, flag_bit):
    """zipfile raises RuntimeError / NotImplementedError (not BadZipFile) for a record whose flags say
    "encrypted" or "patched": still one CheckpointError, and the fallback to previous.pt still works."""
    checkpoint.save(tmp_path / "last.pt", _ckpt(1))
    checkpoint.save(tmp_path / "last.pt", _ckpt(2))
    data = bytearray((tmp_path / "last.pt").read_bytes())
    central = data.rindex(b"PK\x01\x02")  # the last central-directory entry
    data[central + 8] ^= flag_bit  # its general-purpose flags
    (tmp_path / "last.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(tmp_path / "last.pt")
    (tmp_path / "last.pt.damaged").write_bytes(b"an earlier damaged file")
    ckpt, path = checkpoint.newest_intact(tmp_path, quiet)
    assert ckpt["global_step"] == 1 and path.name == "previous.pt"
    assert (tmp_path / "last.pt.damaged").read_bytes() == b"an earlier damaged file", "never replaced"
    assert (tmp_path / "last.pt.damaged.1").exists()


def test_a_full_disk_while_writing_the_metrics_is_one_line_exit_2(tmp_path, monkeypatch, capsys, one_thread):
    from part_fast.train import rundir

    real = rundir.write_metrics

    def full_at_epoch_2(out, history):
        if len(history) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(out, history)

    monkeypatch.setattr(rundir, "write_metrics", full_at_epoch_2)
    out = tmp_path / "run"
    assert cli.main(TRAIN + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"part-fast train: error: could not write {out / 'metrics.jsonl'}: No space left on device; "
                   f"the checkpoints in {out} are intact")
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and load_checkpoint(out / "previous.pt")["epoch"] == 1


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch, one_thread):
    """A finite loss can still give an overflowing update: the step checkpoint after it is refused, and the
    last checkpoint keeps the weights before it."""
    from part_fast.train import TrainingDiverged, loop

    real = loop.train_step
    calls = {"n": 0}

    def overflowing(state, *args, **kwargs):
        r = real(state, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(state.model.parameters()).view(-1)[0] = float("inf")
        return r

    monkeypatch.setattr(loop, "train_step", overflowing)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="non-finite by step 3"):
        train(tiny(out, save_every_steps=1, batch_size=16, train_subset=64))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
