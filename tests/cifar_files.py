"""CIFAR test sets in torchvision's own file format ("python version" pickles), written from given images.

torchvision checks its files against the md5 sums of the real archives; `trust_cifar_files` makes it accept
these (the format is the real one, only the contents differ), for torchvision itself and every reader that
goes through it (part_fast and RobustBench alike)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar(root, x: torch.Tensor, y: torch.Tensor, dataset: str = "cifar10") -> Path:
    """Write x (N, 3, 32, 32) float in [0, 1] (stored as uint8 = round(255 x)) and labels y as the test
    split of `dataset` under root (a one-image train split beside it); returns root."""
    root = Path(root)
    folder = root / FOLDERS[dataset]
    folder.mkdir(parents=True, exist_ok=True)
    data = (x * 255).round().clamp(0, 255).to(torch.uint8).flatten(1).numpy()  # rows of R, G, B planes
    labels = [int(v) for v in y]
    if dataset == "cifar10":
        _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
        _dump(folder / "test_batch", {"data": data, "labels": labels})
        for i in range(1, 6):
            _dump(folder / f"data_batch_{i}", {"data": data[:1], "labels": labels[:1]})
    else:
        _dump(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)]})
        _dump(folder / "test", {"data": data, "fine_labels": labels})
        _dump(folder / "train", {"data": data[:1], "fine_labels": labels[:1]})
    return root


def stored(x: torch.Tensor) -> torch.Tensor:
    """x as the files hold it and a reader gives it back: uint8 / 255."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8).to(torch.float32).div(255)


def trust_cifar_files(monkeypatch) -> None:
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)  # CIFAR100 inherits it
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # the meta file's check


__all__ = ["FOLDERS", "stored", "trust_cifar_files", "write_cifar"]
