"""The folder datasets: TinyImageNet-200 as extracted and an image-folder tree, listed as image files.

- tinyimagenet: `wnids.txt`, `train/<wnid>/images/`, `val/images/` + `val/val_annotations.txt`; the test
  split is val.
- imagefolder: `DIR/train/<class>/*` and `DIR/test/<class>/*` (or `DIR/val/`), any one image size.

Both list their training classes round robin (`classes_interleaved`), so a prefix (`train_subset=N`) holds
every class. The files are decoded on access (containers.ImageFileDataset).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, DataError
from ..extras import require
from .containers import ImageFileDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _require_data_dir(name: str, data_dir) -> Path:
    if data_dir is None:
        raise ConfigError(f"dataset {name!r} needs data_dir (--data-dir)")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory for {name!r} not found: {root}")
    return root


def classes_interleaved(samples):
    """The samples in round-robin class order (each class keeps its file order): a folder tree lists one
    class after another, so without this the "first N examples" of --train-subset would be one class."""
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    queues = [by_class[k] for k in sorted(by_class)]
    out = []
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def _image_files(directory: Path):
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def tinyimagenet(data_dir) -> tuple[ImageFileDataset, ImageFileDataset]:
    """(train, test) of the TinyImageNet-200 tree under `data_dir` (or its tiny-imagenet-200/ folder); test = val."""
    root = _require_data_dir("tinyimagenet", data_dir)
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"  # accept the folder the archive extracts into
    for required in (root / "train", root / "val" / "images", root / "val" / "val_annotations.txt"):
        if not required.exists():
            raise FileNotFoundError(f"TinyImageNet-200 layout incomplete: {required} is missing (expected "
                                    f"wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
                                    f"val/val_annotations.txt under {root})")
    wnids_file = root / "wnids.txt"
    if wnids_file.is_file():
        wnids = sorted({line.strip() for line in wnids_file.read_text().splitlines() if line.strip()})
    else:
        wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    label_of = {wnid: k for k, wnid in enumerate(wnids)}
    train = []
    for wnid in wnids:
        images_dir = root / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise FileNotFoundError(f"TinyImageNet-200 layout incomplete: {images_dir} is missing")
        train += [(path, label_of[wnid]) for path in _image_files(images_dir)]
    test = []
    annotations = root / "val" / "val_annotations.txt"
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DataError(f"{annotations}:{line_no}: expected 'filename<TAB>wnid...' with a wnid of the "
                            f"training classes, got {line!r}")
        test.append((root / "val" / "images" / fields[0], label_of[fields[1]]))
    if not train or not test:
        raise FileNotFoundError(f"TinyImageNet-200 under {root}: no {'training' if not train else 'validation'} images")
    return ImageFileDataset(classes_interleaved(train), wnids), ImageFileDataset(test, wnids)


def imagefolder(data_dir) -> tuple[ImageFileDataset, ImageFileDataset]:
    """(train, test) of the `data_dir`/train and `data_dir`/test (or val) trees of class folders."""
    ImageFolder = require("torchvision.datasets", "the imagefolder dataset").ImageFolder
    root = _require_data_dir("imagefolder", data_dir)
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    for directory in (train_dir, test_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f"imagefolder layout: {directory} is missing (expected "
                                    f"{root}/train/<class>/* and {root}/test/<class>/* or {root}/val/<class>/*)")
    # ImageFolder only scans the tree here (classes = sorted sub-folder names); decoding is ours
    train, test = ImageFolder(str(train_dir)), ImageFolder(str(test_dir))
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(f"imagefolder: the classes of {test_dir} differ from those of {train_dir} "
                        f"(only in train: {only_train}, only in {test_dir.name}: {only_test})")
    train_ds = ImageFileDataset(classes_interleaved(train.samples), train.classes)
    test_ds = ImageFileDataset(classes_interleaved(test.samples), test.classes)
    if train_ds.image_size != test_ds.image_size:
        raise DataError(f"imagefolder: {test_ds.samples[0][0]} is {test_ds.image_size} but "
                        f"{train_ds.samples[0][0]} is {train_ds.image_size} (HxW); all images must share one size")
    return train_ds, test_ds
