"""Datasets for the trainer, and the release's train augmentation as a pure batch function.

Every dataset yields `(x, y)`: x a float32 (3, H, W) tensor in [0, 1] (no normalisation: PART's models take
raw pixels), y a Python int. Datasets never augment; the trainer calls `augment_batch` with its own
generator, so an interrupted run resumes with the same random crops and flips.

- cifar10, svhn: torchvision's files, held in memory as uint8 (no per-item PIL round trip).
- tinyimagenet: the TinyImageNet-200 archive as extracted (`wnids.txt`, `train/<wnid>/images/`,
  `val/images/` + `val/val_annotations.txt`); test split = val. Decoded lazily, one file per item.
- imagefolder: `DIR/train/<class>/*` and `DIR/test/<class>/*` (or `DIR/val/`), any one image size.
  Folder datasets list their classes round robin, so a prefix (`train_subset=N`) holds every class.
- shapes: generated, no files. 10 silhouettes (`SHAPE_CLASSES`) whose colour, size, position and rotation
  are drawn independently of the class, drawn over cluttered backgrounds whose statistics do not depend on
  the class either. The class is therefore only in the object's pixels, and `ShapesDataset.masks` says
  exactly which pixels those are. That is what the dataset is for: with the important pixels known, one can
  measure whether PART's CAM budget gives the full eps to the object and eps_low to the background (e.g. the
  fraction of eps-pixels inside `object_mask_of(dataset)`), which no natural-image dataset can tell. It also
  serves as the offline default (the package ships no third-party data) and learns quickly on a CPU.

    datasets.py      DATASETS and build_datasets(); cifar10 and svhn from torchvision's files
    containers.py    the dataset classes (in memory, image files), DataInfo, object_mask_of
    shapes.py        the generated shapes: silhouettes, renderer, ShapesDataset
    folders.py       tinyimagenet and imagefolder layouts, listed as image files in round-robin class order
    augment.py       augment_batch: random crop + horizontal flip from an explicit generator
    extra.py         ExtraImages: extra (e.g. generated) training images from a memory-mapped .npz
"""
from .augment import augment_batch
from .containers import DataInfo, ImageFileDataset, InMemoryImageDataset, object_mask_of
from .datasets import DATASETS, build_datasets
from .extra import ExtraImages
from .shapes import SHAPE_CLASSES, SHAPES_DEFAULT_SIZES, ShapesDataset

__all__ = [
    "DATASETS", "SHAPE_CLASSES", "SHAPES_DEFAULT_SIZES", "DataInfo", "ExtraImages", "ImageFileDataset", "InMemoryImageDataset",
    "ShapesDataset", "augment_batch", "build_datasets", "object_mask_of",
]
