"""Extra (e.g. generated) training images from an `.npz` file, memory-mapped, as DM-AT mixes them in.

The format, written by `np.savez(path, images=images, labels=labels)` (not `savez_compressed`: a
compressed member cannot be memory-mapped):

    images   uint8, (N, H, W, 3): RGB pixels, channels last, the training set's image size
    labels   any integer dtype, (N,): class indices in [0, number of classes)

DM-AT's files name the same arrays `image` and `label`; those names are read too.

Nothing of `images` is read into memory until an item is asked for: the file's member is mapped where it
lies inside the (uncompressed) zip archive, so a file of many GB costs no RAM. The labels are read once
to check their range.
"""
from __future__ import annotations

import os
import struct
import zipfile

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip member's local file header (30 bytes)
_LOCAL_SIGNATURE = 0x04034B50


def _member_array(path: str, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """The .npy member `name` (or DM-AT's singular name) of the archive at `path`, memory-mapped (read-only)."""
    members = set(archive.namelist())
    found = next((m for m in (name + ".npy", name.removesuffix("s") + ".npy") if m in members), None)
    if found is None:
        raise DataError(f"{path} has no array {name!r} (it holds {sorted(n.removesuffix('.npy') for n in members)}); "
                        "write it with np.savez(path, images=..., labels=...)")
    info = archive.getinfo(found)
    if info.compress_type != zipfile.ZIP_STORED:
        raise DataError(f"{path}: the array {name!r} is compressed (np.savez_compressed), which cannot be "
                        "memory-mapped; write the file with np.savez")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_SIGNATURE:
            raise DataError(f"{path} is damaged: the zip entry of {name!r} has no local header")
        f.seek(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])
        try:
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if header is None:
                raise ValueError(f"npy format version {version}")
            shape, fortran_order, dtype = header(f)
        except ValueError as err:
            raise DataError(f"{path}: the array {name!r} is not a readable .npy member ({err})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: the array {name!r} holds Python objects, expected numbers")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


class ExtraImages(Dataset):
    """The images and labels of an extra-data `.npz` (module doc), checked, memory-mapped.

    Args:
        path: the .npz file.
        image_size: (H, W) the images must have (the training set's).
        num_classes: labels must lie in [0, num_classes).

    Items are `(x, y)` as every dataset here: x float32 (3, H, W) in [0, 1], y a Python int.

    Raises:
        DataError: a missing or unreadable file, a compressed member, or images / labels of the wrong
            dtype, shape or range (the message names which).
    """

    def __init__(self, path: str | os.PathLike, image_size: tuple[int, int], num_classes: int):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"no extra-data file at {path}")
        try:
            with zipfile.ZipFile(path) as archive:
                images = _member_array(path, archive, "images")
                labels = _member_array(path, archive, "labels")
        except zipfile.BadZipFile:
            raise DataError(f"{path} is not an .npz archive (np.savez writes one)") from None
        h, w = image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise DataError(f"{path}: images must be uint8 of shape (N, {h}, {w}, 3) (RGB, channels last, the "
                            f"training set's size), got {images.dtype} {images.shape}")
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (images.shape[0],):
            raise DataError(f"{path}: labels must be integers of shape ({images.shape[0]},), got {labels.dtype} "
                            f"{labels.shape}")
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise DataError(f"{path}: labels must lie in [0, {num_classes}), got {int(labels.min())} .. "
                            f"{int(labels.max())}")
        self.path, self.images, self.labels = path, images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        pixels = torch.from_numpy(np.array(self.images[index]))  # one image read from the file
        return pixels.permute(2, 0, 1).float() / 255, int(self.labels[index])
