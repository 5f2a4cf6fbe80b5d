"""The dataset containers every builder returns, and the object masks of the ones that have them.

Items are `(x, y)`: x a float32 (3, H, W) tensor in [0, 1], y a Python int.

- InMemoryImageDataset: uint8 images held as one tensor (cifar10, svhn, shapes).
- ImageFileDataset: image files decoded on access (tinyimagenet, imagefolder).
- DataInfo: a dataset's name, class count, image size and class names.
- object_mask_of: the object masks aligned with a dataset's items, where it has them (shapes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..errors import DataError
from ..extras import require


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    image_size: tuple[int, int]  # (H, W)
    classes: tuple[str, ...]


class InMemoryImageDataset(Dataset):
    """uint8 images (N, 3, H, W) and int64 labels (N,) held as tensors; items are converted to float / 255
    one at a time, so memory stays at one byte per value."""

    def __init__(self, images: Tensor, labels: Tensor, classes):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].float() / 255, int(self.labels[index])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])


class ImageFileDataset(Dataset):
    """(path, label) samples decoded with PIL on access and converted to RGB. All images must have the size
    of the first one (read at construction): a batch of mixed sizes would fail far from the cause, so a
    different size raises a ValueError naming the file."""

    def __init__(self, samples, classes):
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.classes = tuple(classes)
        if not self.samples:
            raise DataError("no images")
        self.image_size = None
        self.image_size = tuple(self[0][0].shape[-2:])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        Image = require("PIL.Image", "decoding image files (datasets tinyimagenet, imagefolder)")

        path, label = self.samples[index]
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))  # a writable copy: torch warns on read-only arrays
        if self.image_size is not None and pixels.shape[:2] != self.image_size:
            raise DataError(f"{path}: image is {pixels.shape[0]}x{pixels.shape[1]} (HxW), but the first image "
                            f"of this split, {self.samples[0][0]}, is {self.image_size[0]}x{self.image_size[1]}")
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).contiguous(), label


def object_mask_of(dataset) -> Tensor | None:
    """(N, H, W) bool object masks aligned with `dataset`'s items, if it is (a Subset of) a dataset that has
    them (ShapesDataset); else None."""
    if isinstance(dataset, Subset):
        masks = object_mask_of(dataset.dataset)
        return None if masks is None else masks[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    masks = getattr(dataset, "masks", None)
    return masks if isinstance(masks, Tensor) else None
