"""part_fast.data: the generated shapes set, the batch augmentation, the file-backed datasets and their errors."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Subset

from part_fast.data import (DATASETS, SHAPE_CLASSES, DataInfo, InMemoryImageDataset, ShapesDataset, augment_batch,
                            build_datasets, object_mask_of)

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def pil_pixels(path) -> torch.Tensor:
    """The oracle for file-backed items: PIL's RGB decoding, HWC -> CHW, / 255 in float32."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def save_image(path: Path, size=(6, 5), mode="RGB", seed=0):
    """A small random image file (size = (W, H) as PIL takes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


# ---------------------------------------------------------------------------------------------------------
# shapes

@pytest.fixture(scope="module")
def shapes_train():
    return ShapesDataset(1000, seed=0, split="train")


def test_shapes_is_deterministic_bit_for_bit():
    a, b = ShapesDataset(40, seed=3), ShapesDataset(40, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.masks, b.masks)


def test_shapes_seeds_and_splits_differ(shapes_train):
    first = shapes_train.images[:40]
    other_seed = ShapesDataset(40, seed=1, split="train")
    test_split = ShapesDataset(40, seed=0, split="test")
    # every single image differs, not just some
    assert all(not torch.equal(first[i], other_seed.images[i]) for i in range(40))
    assert all(not torch.equal(first[i], test_split.images[i]) for i in range(40))
    assert not torch.equal(shapes_train.masks[:40], test_split.masks)


def test_shapes_smaller_set_is_a_prefix(shapes_train):
    # 300 crosses the 256-image rendering chunk at a different place than 1000 does
    small = ShapesDataset(300, seed=0, split="train")
    assert torch.equal(small.images, shapes_train.images[:300])
    assert torch.equal(small.labels, shapes_train.labels[:300])
    assert torch.equal(small.masks, shapes_train.masks[:300])


def test_shapes_items_are_independent(shapes_train):
    # each item has its own random stream: no image shares its background with another (a stream per
    # rendering chunk or per block of labels would repeat backgrounds 256 or 10 items apart)
    images = shapes_train.images
    for shift in (1, 10, 256, 512):
        same = (images[:-shift] == images[shift:]).float().mean((1, 2, 3))
        assert same.max() < 0.2, shift


def test_build_shapes_subsets_are_prefixes_with_masks(shapes_train):
    train, test, info = build_datasets("shapes", train_subset=300, test_subset=20, seed=0)
    assert isinstance(train, Subset) and list(train.indices) == list(range(300))
    assert len(train) == 300 and len(test) == 20
    assert info == DataInfo("shapes", 10, (32, 32), SHAPE_CLASSES)
    for i in (0, 137, 299):
        x, y = train[i]
        assert torch.equal(x, shapes_train.images[i].float() / 255) and y == int(shapes_train.labels[i])
    assert torch.equal(object_mask_of(train), shapes_train.masks[:300])
    assert torch.equal(object_mask_of(test), ShapesDataset(20, seed=0, split="test").masks)
    # the seed argument reaches the generator
    other, _, _ = build_datasets("shapes", train_subset=5, test_subset=1, seed=1)
    assert not torch.equal(other[0][0], train[0][0])


def test_build_shapes_default_sizes():
    train, test, info = build_datasets("shapes")
    assert (len(train), len(test)) == (5000, 1000)
    assert info.num_classes == 10 and info.classes == SHAPE_CLASSES


def test_shapes_items_and_balance(shapes_train):
    x, y = shapes_train[7]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and type(y) is int
    values = shapes_train.images
    assert values.min() < 20  # uses the dark end of the range ...
    assert values.max() > 235  # ... and the bright end
    all_x = torch.stack([shapes_train[i][0] for i in range(0, 1000, 37)])
    assert all_x.min() >= 0 and all_x.max() <= 1
    counts = torch.bincount(shapes_train.labels, minlength=10)
    assert counts.tolist() == [100] * 10  # one permutation of the classes per block of 10
    counts_odd = torch.bincount(shapes_train.labels[:995], minlength=10)
    assert counts_odd.min() >= 99
    # not a fixed cycle: the class order changes from block to block
    assert not torch.equal(shapes_train.labels[:10], shapes_train.labels[10:20])


def test_shapes_masks_mark_a_visible_object(shapes_train):
    masks = shapes_train.masks
    assert masks.shape == (1000, 32, 32) and masks.dtype == torch.bool
    area = masks.float().mean((1, 2))
    assert area.min() > 0.02 and area.max() < 0.5  # never empty, never the whole image
    assert torch.equal(shapes_train.object_mask(5), masks[5])
    # object colour vs the background just around it (a 2-pixel band): a visible, but varied, contrast
    x = shapes_train.images.float() / 255
    band = F.max_pool2d(masks[:, None].float(), 5, 1, 2)[:, 0].bool() & ~masks
    obj_mean = (x * masks[:, None]).sum((2, 3)) / masks[:, None].sum((2, 3))
    band_mean = (x * band[:, None]).sum((2, 3)) / band[:, None].sum((2, 3))
    contrast = (obj_mean - band_mean).norm(dim=1)
    assert contrast.mean() > 0.3
    assert contrast.min() > 0.05
    assert contrast.std() > 0.05  # not a constant: the contrast itself is random


def _max_class_deviation_of_background_mean(images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor):
    """Largest |per-class mean of background pixels - overall mean|, over classes and colour channels."""
    background = (~masks)[:, None].float()
    per_image = (images * background).sum((2, 3)) / background.sum((2, 3))  # (N, 3)
    per_class = torch.stack([per_image[labels == k].mean(0) for k in range(10)])
    return (per_class - per_image.mean(0)).abs().max().item()


def test_shapes_class_not_in_background_statistics(shapes_train):
    x, masks, labels = shapes_train.images.float() / 255, shapes_train.masks, shapes_train.labels
    # per-image background means spread by ~0.04, so a class mean over 100 images has a standard error ~0.004
    assert _max_class_deviation_of_background_mean(x, masks, labels) < 0.02
    # ... and the check does see a class-dependent tint of that size
    tinted = x.clone()
    tinted[labels == 3] += 0.03 * (~masks[labels == 3])[:, None]
    assert _max_class_deviation_of_background_mean(tinted, masks, labels) > 0.02
    # the background's spread does not tell the class either
    background = ~masks[:, None].expand_as(x)
    per_image_std = torch.stack([x[i][background[i]].std() for i in range(len(x))])
    per_class_std = torch.stack([per_image_std[labels == k].mean() for k in range(10)])
    assert (per_class_std - per_image_std.mean()).abs().max() < 0.01


def test_shapes_other_image_size_and_arguments():
    ds = ShapesDataset(12, seed=2, image_size=48)
    assert ds.images.shape == (12, 3, 48, 48) and ds.masks.shape == (12, 48, 48)
    assert ds.masks.float().mean((1, 2)).min() > 0.02
    assert len(ShapesDataset(0)) == 0
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(4, split="val")
    with pytest.raises(ValueError, match="n must be"):
        ShapesDataset(-1)


def test_object_mask_of_other_datasets_is_none():
    plain = InMemoryImageDataset(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4), ("a",))
    assert object_mask_of(plain) is None and object_mask_of(Subset(plain, range(2))) is None
    shapes = ShapesDataset(20, seed=0)
    nested = Subset(Subset(shapes, [5, 3, 9, 1]), [2, 0])
    assert torch.equal(object_mask_of(nested), shapes.masks[[9, 5]])


# ---------------------------------------------------------------------------------------------------------
# augment_batch

def generator(seed):
    return torch.Generator().manual_seed(seed)


def test_augment_matches_per_image_torchvision_oracle():
    b, padding = 16, 3
    x = torch.rand(b, 3, 12, 20, generator=generator(1))
    out = augment_batch(x, generator(7), padding=padding)
    # the documented draw order, replayed from the same seed
    g = generator(7)
    top = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    assert 0 < flip.sum() < b and len(set(top.tolist())) > 2  # the case exercises both branches and offsets
    for i in range(b):
        expected = TF.crop(TF.pad(x[i], [padding], fill=0), int(top[i]), int(left[i]), 12, 20)
        if flip[i]:
            expected = TF.hflip(expected)
        assert torch.equal(out[i], expected), i


def test_augment_hand_computed_offsets():
    # a 1x1x2x3 image, padding 1: the padded image is 4x5; find a seed whose draws are known, then check by hand
    x = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])
    seed = next(s for s in range(1000) if _draws(s) == (0, 2, False))
    out = augment_batch(x, generator(seed), padding=1)
    # window rows [0, 2) and columns [2, 5) of [[0,0,0,0,0],[0,1,2,3,0],[0,4,5,6,0],[0,0,0,0,0]]
    assert out.tolist() == [[[[0.0, 0.0, 0.0], [2.0, 3.0, 0.0]]]]
    seed = next(s for s in range(1000) if _draws(s) == (2, 0, True))
    out = augment_batch(x, generator(seed), padding=1)
    # window rows [2, 4), columns [0, 3): [[0,4,5],[0,0,0]], mirrored
    assert out.tolist() == [[[[5.0, 4.0, 0.0], [0.0, 0.0, 0.0]]]]


def _draws(seed):
    g = generator(seed)
    top = int(torch.randint(0, 3, (1,), generator=g))
    left = int(torch.randint(0, 3, (1,), generator=g))
    return top, left, bool(torch.rand(1, generator=g) < 0.5)


def test_augment_is_a_function_of_the_generator_state_only():
    x = torch.rand(32, 3, 8, 8, generator=generator(0))
    torch.manual_seed(0)
    a = augment_batch(x, generator(5))
    torch.manual_seed(12345)
    torch.rand(100)
    b = augment_batch(x, generator(5))
    assert torch.equal(a, b)
    g = generator(5)
    first, second = augment_batch(x, g), augment_batch(x, g)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances
    state = generator(9).get_state()
    g1, g2 = torch.Generator(), torch.Generator()
    g1.set_state(state)
    g2.set_state(state)
    assert torch.equal(augment_batch(x, g1), augment_batch(x, g2))  # resuming from a saved state replays
    assert torch.equal(g1.get_state(), g2.get_state())


def test_augment_without_padding_only_flips():
    x = torch.rand(64, 3, 5, 7, generator=generator(2))
    out = augment_batch(x, generator(3), padding=0)
    assert out.shape == x.shape and out.dtype == x.dtype
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 10 < sum(flipped) < 54 and 10 < sum(same) < 54


def test_augment_zero_pads_ones():
    x = torch.ones(64, 3, 16, 16)
    out = augment_batch(x, generator(4), padding=4)
    assert out.shape == x.shape
    assert set(out.unique().tolist()) == {0.0, 1.0}
    zero_count = (out == 0).flatten(1).sum(1)
    assert (zero_count > 0).sum() > 32  # only an offset of exactly (4, 4) shows no border: 1/81 of images
    assert (out[:, :, 4:12, 4:12] == 1).all()  # a shift of at most 4 never reaches the centre
    # each image's ones form one rectangle: rows and columns that contain a 1 are all-ones
    for image in out[:, 0]:
        rows, cols = image.any(1), image.any(0)
        assert torch.equal(image.bool(), rows[:, None] & cols[None, :])


def test_augment_other_dtypes_and_errors():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.uint8).reshape(2, 1, 3, 4)
    out = augment_batch(x, generator(0), padding=1)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert augment_batch(torch.zeros(0, 3, 4, 4), generator(0)).shape == (0, 3, 4, 4)
    with pytest.raises(ValueError, match="B, C, H, W"):
        augment_batch(torch.zeros(3, 4, 4), generator(0))
    with pytest.raises(ValueError, match="padding"):
        augment_batch(torch.zeros(1, 3, 4, 4), generator(0), padding=-1)


# ---------------------------------------------------------------------------------------------------------
# errors

def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as error:
        build_datasets("mnist")
    assert "mnist" in str(error.value) and all(name in str(error.value) for name in DATASETS)


@pytest.mark.parametrize("argument, value", [("train_subset", 5001), ("test_subset", 1001), ("train_subset", 0),
                                             ("test_subset", -3)])
def test_subset_out_of_range(argument, value):
    with pytest.raises(ValueError, match=argument):
        build_datasets("shapes", **{argument: value})


@pytest.mark.parametrize("name", ["imagefolder", "tinyimagenet"])
def test_missing_data_dir(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_datasets(name, missing)
    with pytest.raises(ValueError, match="data_dir"):
        build_datasets(name, None)


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_torchvision_files_missing_without_download(tmp_path, name):
    with pytest.raises(FileNotFoundError) as error:
        build_datasets(name, tmp_path)
    message = str(error.value)
    assert "--download" in message and str(tmp_path) in message
    with pytest.raises(ValueError, match="data_dir"):
        build_datasets(name, None)


def test_download_only_for_torchvision_sets(tmp_path):
    with pytest.raises(ValueError, match="download"):
        build_datasets("imagefolder", tmp_path, download=True)


def make_imagefolder(root: Path, train_classes, test_classes, test_name="test", size=(6, 5)):
    for split, classes in (("train", train_classes), (test_name, test_classes)):
        for k, cls in enumerate(classes):
            for j in range(2):
                save_image(root / split / cls / f"{j}.png", size=size, seed=10 * k + j)


def test_imagefolder_class_mismatch(tmp_path):
    make_imagefolder(tmp_path, ["cat", "dog"], ["cat", "emu"])
    with pytest.raises(ValueError, match="emu"):
        build_datasets("imagefolder", tmp_path)


def test_imagefolder_layout_errors_and_val_split(tmp_path):
    save_image(tmp_path / "train" / "a" / "0.png")
    with pytest.raises(FileNotFoundError, match="test"):
        build_datasets("imagefolder", tmp_path)
    save_image(tmp_path / "val" / "a" / "0.png", seed=1)
    train, test, info = build_datasets("imagefolder", tmp_path)
    assert info == DataInfo("imagefolder", 1, (5, 6), ("a",))
    assert torch.equal(test[0][0], pil_pixels(tmp_path / "val" / "a" / "0.png"))


def test_imagefolder_size_checks(tmp_path):
    make_imagefolder(tmp_path, ["a", "b"], ["a", "b"])
    save_image(tmp_path / "train" / "b" / "9.png", size=(7, 5))  # a later training image of another size
    train, test, info = build_datasets("imagefolder", tmp_path)
    assert info.image_size == (5, 6) and len(train) == 5
    with pytest.raises(ValueError, match="9.png"):
        train[4]
    other = tmp_path / "other"
    make_imagefolder(other, ["a"], ["a"])
    for path in (other / "test" / "a").iterdir():
        save_image(path, size=(4, 4))
    with pytest.raises(ValueError, match="one size"):
        build_datasets("imagefolder", other)


def make_tinyimagenet(root: Path):
    """The TinyImageNet-200 layout with 3 classes, 64x64 JPEGs (one grayscale), wnids.txt unsorted."""
    wnids = ["n03", "n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, wnid in enumerate(wnids):
        for j in range(2):
            mode = "L" if (wnid, j) == ("n02", 1) else "RGB"
            save_image(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", size=(64, 64), mode=mode, seed=k * 2 + j)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    annotations = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n03"), ("val_2.JPEG", "n01"), ("val_3.JPEG", "n02")]
    for j, (name, _) in enumerate(annotations):
        save_image(root / "val" / "images" / name, size=(64, 64), mode="L" if j == 3 else "RGB", seed=100 + j)
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnid}\t0\t0\t63\t63\n" for name, wnid in annotations))
    return annotations


def test_tinyimagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    annotations = make_tinyimagenet(root)
    for data_dir in (root, tmp_path):  # the extracted folder itself, or the folder the archive was extracted in
        train, test, info = build_datasets("tinyimagenet", data_dir)
        assert info == DataInfo("tinyimagenet", 3, (64, 64), ("n01", "n02", "n03"))
        assert len(train) == 6 and len(test) == 4
    assert [train[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]  # classes round robin: prefixes hold every class
    assert [test[i][1] for i in range(4)] == [{"n01": 0, "n02": 1, "n03": 2}[w] for _, w in annotations]
    gray, label = train[4]  # n02_1, stored grayscale
    assert label == 1 and gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(gray, pil_pixels(root / "train" / "n02" / "images" / "n02_1.JPEG"))
    assert torch.equal(test[1][0], pil_pixels(root / "val" / "images" / "val_1.JPEG"))
    assert test[3][0].shape == (3, 64, 64)


def test_tinyimagenet_missing_parts(tmp_path):
    root = tmp_path / "tiny"
    make_tinyimagenet(root)
    annotations = root / "val" / "val_annotations.txt"
    text = annotations.read_text()
    annotations.write_text(text + "val_9.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="n99"):
        build_datasets("tinyimagenet", root)
    annotations.unlink()
    with pytest.raises(FileNotFoundError, match="val_annotations.txt"):
        build_datasets("tinyimagenet", root)
    (root / "val" / "val_annotations.txt").write_text(text)
    (root / "wnids.txt").write_text("n01\nn02\nn03\nn04\n")
    with pytest.raises(FileNotFoundError, match="n04"):
        build_datasets("tinyimagenet", root)


# ---------------------------------------------------------------------------------------------------------
# the real CIFAR-10 subset, as an image folder

def test_cifar10_subset_imagefolder(cifar_subset_dir):
    train, test, info = build_datasets("imagefolder", cifar_subset_dir)
    assert (len(train), len(test)) == (10000, 2000)
    assert info == DataInfo("imagefolder", 10, (32, 32), CIFAR_CLASSES)
    # Classes interleaved (round robin over the ImageFolder classes, files sorted within a class), so that
    # the first N examples (--train-subset N) cover every class: item 10 * i + k is class k's i-th file.
    for k in (0, 3, 9):
        x, y = test[10 * 17 + k]
        assert y == k
        path = cifar_subset_dir / "test" / CIFAR_CLASSES[k] / "0017.jpg"
        assert x.dtype == torch.float32 and torch.equal(x, pil_pixels(path))
    x, y = train[10 * 432 + 5]
    assert y == 5 and torch.equal(x, pil_pixels(cifar_subset_dir / "train" / "dog" / "0432.jpg"))
    sub_train, sub_test, _ = build_datasets("imagefolder", cifar_subset_dir, train_subset=100, test_subset=10)
    assert (len(sub_train), len(sub_test)) == (100, 10) and object_mask_of(sub_train) is None
    assert sorted(sub_train[i][1] for i in range(100)) == sorted(list(range(10)) * 10)  # balanced prefix
    assert [sub_test[i][1] for i in range(10)] == list(range(10))
    with pytest.raises(ValueError, match="train_subset"):
        build_datasets("imagefolder", cifar_subset_dir, train_subset=10001)


# ---------------------------------------------------------------------------------------------------------
# cifar10 / svhn: the wrappers around torchvision's arrays (torchvision replaced by stubs: no files needed)

class StubCIFAR10:
    calls = []

    def __init__(self, root, train=True, download=False):
        StubCIFAR10.calls.append((root, train, download))
        n = 6 if train else 3
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, (n, 5, 7, 3), dtype=np.uint8)  # NHWC, H != W to catch a transposition
        self.targets = rng.integers(0, 10, n).tolist()
        self.classes = list(CIFAR_CLASSES)


class StubSVHN:
    calls = []

    def __init__(self, root, split="train", download=False):
        StubSVHN.calls.append((root, split, download))
        n = 4 if split == "train" else 2
        rng = np.random.default_rng(7 if split == "train" else 8)
        self.data = rng.integers(0, 256, (n, 3, 5, 7), dtype=np.uint8)  # NCHW
        self.labels = rng.integers(0, 10, n).astype(np.int64)


def test_cifar10_wrapper_layout(monkeypatch, tmp_path):
    StubCIFAR10.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", StubCIFAR10)
    train, test, info = build_datasets("cifar10", tmp_path, download=True)
    assert StubCIFAR10.calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert info == DataInfo("cifar10", 10, (5, 7), CIFAR_CLASSES)
    assert (len(train), len(test)) == (6, 3)
    reference = StubCIFAR10(str(tmp_path), train=True)
    for i in range(6):
        x, y = train[i]
        assert x.dtype == torch.float32 and x.shape == (3, 5, 7)
        for c, h, w in ((0, 0, 0), (2, 4, 6), (1, 3, 2), (2, 0, 5)):
            assert x[c, h, w].item() == np.float32(reference.data[i, h, w, c]) / np.float32(255)
        assert y == reference.targets[i] and type(y) is int


def test_svhn_wrapper_layout(monkeypatch, tmp_path):
    StubSVHN.calls = []
    monkeypatch.setattr(torchvision.datasets, "SVHN", StubSVHN)
    train, test, info = build_datasets("svhn", tmp_path, test_subset=1)
    assert StubSVHN.calls == [(str(tmp_path), "train", False), (str(tmp_path), "test", False)]
    assert info == DataInfo("svhn", 10, (5, 7), tuple("0123456789"))
    assert (len(train), len(test)) == (4, 1)
    reference = StubSVHN(str(tmp_path), split="train")
    for i in range(4):
        x, y = train[i]
        expected = torch.from_numpy(reference.data[i].astype(np.float32) / np.float32(255))
        assert torch.equal(x, expected) and y == int(reference.labels[i]) and type(y) is int
