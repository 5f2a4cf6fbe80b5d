"""The dataset names and `build_datasets`, which builds any of them; cifar10 and svhn from torchvision's files.

cifar10 and svhn are held in memory as uint8 (no per-item PIL round trip); the folder datasets are in
folders.py, the generated one in shapes.py.
"""
from __future__ import annotations

import operator
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError
from ..extras import require
from . import folders
from .containers import DataInfo, InMemoryImageDataset
from .shapes import SHAPES_DEFAULT_SIZES, ShapesDataset

DATASETS = ("cifar10", "svhn", "tinyimagenet", "imagefolder", "shapes")


def _torchvision_arrays(name: str, data_dir, download: bool):
    """Load one of torchvision's file-backed sets; turn its 'not found' RuntimeError into a message that
    says where the files are expected and how to fetch them."""
    tvd = require("torchvision.datasets", f"the {name} dataset")  # its classes looked up now: tests substitute them
    if data_dir is None:
        raise ConfigError(f"dataset {name!r} needs data_dir (--data-dir): the directory that holds (or will "
                          f"hold, with --download) its files")
    root = Path(data_dir)
    try:
        if name == "cifar10":
            expected = f"the folder {root / 'cifar-10-batches-py'} (python version)"
            return (tvd.CIFAR10(str(root), train=True, download=download),
                    tvd.CIFAR10(str(root), train=False, download=download))
        expected = f"{root / 'train_32x32.mat'} and {root / 'test_32x32.mat'}"
        return (tvd.SVHN(str(root), split="train", download=download),
                tvd.SVHN(str(root), split="test", download=download))
    except RuntimeError as error:
        if download:
            raise
        raise FileNotFoundError(f"{name} files not found (or corrupted): expected {expected}. Pass --download "
                                f"(download=True) to fetch them into {root}.") from error


def _cifar10(data_dir, download):
    train, test = _torchvision_arrays("cifar10", data_dir, download)

    def wrap(ds):  # CIFAR's .data is (N, H, W, C)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
        return InMemoryImageDataset(images, torch.as_tensor(ds.targets), ds.classes)

    return wrap(train), wrap(test)


def _svhn(data_dir, download):
    train, test = _torchvision_arrays("svhn", data_dir, download)
    classes = tuple(str(d) for d in range(10))  # torchvision already maps the files' label 10 to digit 0

    def wrap(ds):  # SVHN's .data is already (N, C, H, W)
        images = torch.from_numpy(np.ascontiguousarray(ds.data))
        return InMemoryImageDataset(images, torch.as_tensor(ds.labels), classes)

    return wrap(train), wrap(test)


def _subset_size(argument: str, value, available: int, split: str, name: str) -> int | None:
    if value is None:
        return None
    value = operator.index(value)
    if not 1 <= value <= available:
        raise ConfigError(f"{argument}={value} must be between 1 and the {available} examples of the {name} "
                          f"{split} split")
    return value


def build_datasets(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
                   train_subset: int | None = None, test_subset: int | None = None,
                   seed: int = 0) -> tuple[Dataset, Dataset, DataInfo]:
    """(train, test, info). Items are (x float32 (3, H, W) in [0, 1], y int), never augmented (see
    `augment_batch`). `train_subset` / `test_subset` keep the first N items (a Subset over range(N)).
    `seed` only matters for "shapes" (which ignores data_dir and download); `download` only for cifar10/svhn."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if download and name in ("tinyimagenet", "imagefolder"):
        raise ConfigError(f"download is only available for cifar10 and svhn, not {name!r}")
    if name == "shapes":
        # Item i depends only on (seed, split, i): generating just the first N equals cutting N from the full set.
        n_train = _subset_size("train_subset", train_subset, SHAPES_DEFAULT_SIZES["train"], "train", name)
        n_test = _subset_size("test_subset", test_subset, SHAPES_DEFAULT_SIZES["test"], "test", name)
        train = ShapesDataset(n_train or SHAPES_DEFAULT_SIZES["train"], seed, "train")
        test = ShapesDataset(n_test or SHAPES_DEFAULT_SIZES["test"], seed, "test")
    else:
        builders = {"cifar10": lambda: _cifar10(data_dir, download), "svhn": lambda: _svhn(data_dir, download),
                    "tinyimagenet": lambda: folders.tinyimagenet(data_dir),
                    "imagefolder": lambda: folders.imagefolder(data_dir)}
        train, test = builders[name]()
        n_train = _subset_size("train_subset", train_subset, len(train), "train", name)
        n_test = _subset_size("test_subset", test_subset, len(test), "test", name)
    info = DataInfo(name=name, num_classes=len(train.classes), image_size=tuple(train.image_size),
                    classes=tuple(train.classes))
    if n_train is not None:
        train = Subset(train, range(n_train))
    if n_test is not None:
        test = Subset(test, range(n_test))
    return train, test, info
