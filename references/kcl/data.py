"""Data of the training harness: datasets, seeded augmentations, the batch order and the loaders.

Three sources:
- split lists (`relative/path label` per line under an image root: ImageNet-LT, iNaturalist 2018,
  Places-LT), decoded with PIL;
- Fashion-MNIST made long-tailed (`fashion_mnist_lt`): IDX files (gzip or raw), exponential class
  sizes `n_c = floor(max_per_class * (1 / imbalance_factor) ** (c / (C - 1)))`, and the balanced
  test set;
- synthetic images (`synthetic`): seeded random pixels, for throughput measurements.

The pipeline stays in uint8 up to the device: workers decode, crop, resize and flip uint8 images,
the loader collates them into uint8 batches (in pinned memory on CUDA), the batch is copied
without blocking and `Normalize` converts it to normalised float32 on the device, where it is
four times smaller to copy and the arithmetic is free.

Every random choice of the input pipeline is a function of (seed, epoch, sample index, view): the
batch order comes from a generator seeded by (seed, epoch) and each augmentation from a generator
seeded by (seed, epoch, index, view). Nothing depends on the process's RNG state, the number of
loader workers or the number of processes, so a resumed run and a run split across processes see
exactly the images of an uninterrupted single-process run.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from errors import DataError, MissingFileError

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_SEARCH = ("data/fashion-mnist", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# iNaturalist 2018 statistics, as the official KCL code (BalFeat helper.get_transforms) uses them.
INAT2018_MEAN, INAT2018_STD = (0.466, 0.471, 0.380), (0.195, 0.194, 0.192)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 over the parts): stable across runs and hosts."""
    state = 0x243F6A8885A308D3
    for part in parts:
        state = (state + (int(part) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST-LT
# ----------------------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """An IDX array (the MNIST file format), from `path` or `path.gz`."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"read_idx: cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"read_idx: {path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"read_idx: {path} is truncated in its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"read_idx: {path} holds {len(raw) - header} data bytes, its header "
                         f"{list(shape)} of {dtype} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_fashion_mnist(root: str | None = None) -> str:
    """The folder with the Fashion-MNIST IDX files: `root`, or the first of FASHION_MNIST_SEARCH."""
    candidates = [root] if root else list(FASHION_MNIST_SEARCH)
    for folder in candidates:
        name = FASHION_MNIST_FILES["train"][0]
        if any(os.path.isfile(os.path.join(folder, name + ext)) for ext in ("", ".gz")):
            return folder
    raise MissingFileError(
        f"Fashion-MNIST IDX files ({FASHION_MNIST_FILES['train'][0]}[.gz], ...) not found in "
        f"{candidates}; run `make data` (references/kcl/get_data.py: copies or downloads them) or "
        f"set data.root")


def _idx_path(folder: str, name: str) -> str:
    for ext in ("", ".gz"):
        if os.path.isfile(os.path.join(folder, name + ext)):
            return os.path.join(folder, name + ext)
    raise MissingFileError(f"IDX file {name}[.gz] not found in {folder}")


def load_idx_split(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 [N, H, W]) and labels (int64 [N]) of an IDX split. Decoded once per
    process and file version (a study runs many trainings in one process); the tensors are
    shared between callers: index them, never write into them."""
    images_path, labels_path = (_idx_path(folder, name) for name in FASHION_MNIST_FILES[split])
    stamp = tuple((os.path.abspath(p), os.stat(p).st_mtime_ns, os.stat(p).st_size)
                  for p in (images_path, labels_path))
    return _load_idx_pair(stamp, split)


@functools.lru_cache(maxsize=4)
def _load_idx_pair(stamp, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    (images_path, *_), (labels_path, *_) = stamp
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{os.path.dirname(images_path)}: {split} images {list(images.shape)} "
                         f"and labels {list(labels.shape)} do not match (expected [N, H, W] "
                         f"and [N])")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def long_tailed_counts(num_classes: int, max_per_class: int, imbalance_factor: float) -> list[int]:
    """Exponential profile: class c keeps floor(max * (1/imbalance) ** (c / (C - 1))) images."""
    if imbalance_factor < 1:
        raise DataError(f"data.imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [max_per_class]
    return [int(math.floor(max_per_class * (1.0 / imbalance_factor) ** (c / (num_classes - 1))
                           + 1e-9)) for c in range(num_classes)]


def class_permutation(labels: torch.Tensor, c: int, seed: int) -> torch.Tensor:
    """The images of class c in a seeded random order (the order depends on (seed, c) only)."""
    members = torch.nonzero(labels == c).flatten()
    return members[torch.randperm(members.numel(), generator=_generator(seed, c))]


def make_long_tailed(labels: torch.Tensor, counts: list[int], seed: int) -> torch.Tensor:
    """Indices keeping counts[c] images of class c, drawn at random (seeded), sorted.

    Class c keeps the first counts[c] images of `class_permutation(labels, c, seed)`, so the
    subsets of one class under different counts are nested."""
    keep = []
    for c, n in enumerate(counts):
        order = class_permutation(labels, c, seed)
        if n > order.numel():
            raise DataError(f"class {c} has {order.numel()} images, {n} were asked for "
                            f"(lower data.max_per_class)")
        keep.append(order[:n])
    return torch.cat(keep).sort().values


def held_out_balanced(labels: torch.Tensor, per_class: int, seed: int,
                      used: list[int]) -> torch.Tensor:
    """Indices of `per_class` images of every class that a long-tailed subset drawn with the
    same seed does not use: the LAST `per_class` of each class's permutation, while the subset
    takes the first used[c]. Sorted. A class with fewer than used[c] + per_class images is an
    error: the two would overlap."""
    rows = []
    for c, n in enumerate(used):
        order = class_permutation(labels, c, seed)
        if n + per_class > order.numel():
            raise DataError(f"a balanced held-out split of {per_class} images per class needs "
                            f"{n + per_class} images of class {c} ({n} are in the training "
                            f"set), the source has {order.numel()}: lower "
                            f"data.balanced_per_class or data.max_per_class")
        rows.append(order[order.numel() - per_class:])
    return torch.cat(rows).sort().values


def counts_by_class(num_classes: int, max_per_class: int, imbalance_factor: float,
                    class_order=None, class_counts=None) -> list[int]:
    """The training-set size of each class: `class_counts` as given, or the exponential profile
    of `long_tailed_counts` with its r-th size going to class class_order[r] (class r when
    `class_order` is None)."""
    if class_counts is not None:
        if len(class_counts) != num_classes or min(class_counts) < 1:
            raise DataError(f"data.class_counts must list {num_classes} sizes >= 1, got "
                            f"{list(class_counts)}")
        return [int(n) for n in class_counts]
    by_rank = long_tailed_counts(num_classes, max_per_class, imbalance_factor)
    if class_order is None:
        return by_rank
    check_class_order(class_order, num_classes)
    counts = [0] * num_classes
    for rank, c in enumerate(class_order):
        counts[c] = by_rank[rank]
    return counts


def check_class_order(class_order, num_classes: int) -> None:
    """A class order must name every class 0..C-1 exactly once."""
    order = list(class_order)
    if sorted(order) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(order))
        repeated = sorted({c for c in order if order.count(c) > 1})
        outside = sorted(c for c in set(order) if not 0 <= c < num_classes)
        details = "; ".join(part for part in (
            f"missing {missing}" if missing else "", f"repeated {repeated}" if repeated else "",
            f"outside [0, {num_classes}): {outside}" if outside else "") if part)
        raise DataError(f"data.class_order must be a permutation of the {num_classes} classes "
                        f"0..{num_classes - 1} (class_order[r] gets the r-th largest size), "
                        f"got {order}: {details}")


class TensorImages(Dataset):
    """In-memory uint8 images [N, C, H, W] with int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(1)
        self.images, self.labels = images, labels

    def __len__(self):
        return self.labels.numel()

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


@dataclass
class FashionMnistLT:
    """The long-tailed training set, the balanced test set and, when asked for, a balanced
    held-out split of training images the long-tailed set does not use; `counts` by class."""

    train: TensorImages
    test: TensorImages
    balanced: TensorImages | None
    counts: list[int]


def fashion_mnist_lt(root: str | None = None, imbalance_factor: float = 100.0,
                     max_per_class: int = 6000, test_per_class: int | None = None,
                     seed: int = 0, class_order=None, class_counts=None,
                     balanced_per_class: int | None = None) -> FashionMnistLT:
    """Long-tailed Fashion-MNIST (sizes by `counts_by_class`), its balanced test set (1000 per
    class, or the first `test_per_class` of each class) and, with `balanced_per_class`, a
    balanced split held out from the unused training images (`held_out_balanced`)."""
    folder = find_fashion_mnist(root)
    images, labels = load_idx_split(folder, "train")
    counts = counts_by_class(10, max_per_class, imbalance_factor, class_order, class_counts)
    keep = make_long_tailed(labels, counts, seed)
    train = TensorImages(images[keep], labels[keep])
    balanced = None
    if balanced_per_class:
        rows = held_out_balanced(labels, balanced_per_class, seed, counts)
        balanced = TensorImages(images[rows], labels[rows])
    test_images, test_labels = load_idx_split(folder, "test")
    if test_per_class is not None:
        rows = torch.cat([torch.nonzero(test_labels == c).flatten()[:test_per_class]
                          for c in range(10)]).sort().values
        test_images, test_labels = test_images[rows], test_labels[rows]
    return FashionMnistLT(train, TensorImages(test_images, test_labels), balanced, counts)


# ----------------------------------------------------------------------------------------------
# Split lists
# ----------------------------------------------------------------------------------------------
def missing_image_hint(root: str, relative: str) -> str:
    """Why an image of a split list may be missing, when the layout suggests it."""
    if not os.path.isdir(root):
        return f" (data.image_root {root} is not a folder)"
    parts = relative.split("/")
    # ImageNet-LT's test list names ILSVRC2012 val images inside class folders
    # (val/n01440764/ILSVRC2012_val_00000293.JPEG); the archive unpacks them into one folder.
    if len(parts) == 3 and os.path.isfile(os.path.join(root, parts[0], parts[2])):
        return (f" ({parts[0]}/{parts[2]} exists: the {parts[0]}/ images must be sorted into "
                f"class folders, {parts[0]}/<class>/<image>, as the list names them)")
    if not os.path.isdir(os.path.join(root, parts[0])):
        return f" (there is no folder {parts[0]}/ under {root}: is data.image_root right?)"
    return ""


def parse_split_line(list_file: str, lineno: int, text: str) -> tuple[str, int]:
    parts = text.rsplit(maxsplit=1)
    if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
        raise DataError(f"{list_file}:{lineno}: expected '<relative/path> <label>' with a "
                        f"non-negative integer label, got {text!r}")
    return parts[0], int(parts[1])


def split_list_lines(list_file: str):
    """(line number, stripped text) of every non-blank line of a split list."""
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if text:
                yield lineno, text


def read_split_list(list_file: str, root: str, check_files: bool = True) -> list[tuple[str, int]]:
    """Lines `relative/path label`; blank lines are skipped. Errors name the file and line."""
    if not os.path.isfile(list_file):
        raise MissingFileError(f"split list {list_file} not found")
    entries = []
    for lineno, text in split_list_lines(list_file):
        relative, label = parse_split_line(list_file, lineno, text)
        path = os.path.join(root, relative)
        if check_files and not os.path.isfile(path):
            raise MissingFileError(f"{list_file}:{lineno}: image {relative!r} not found "
                                   f"under {root}{missing_image_hint(root, relative)}")
        entries.append((path, label))
    if not entries:
        raise DataError(f"{list_file}: no entries")
    return entries


def decode_image_file(path: str) -> torch.Tensor:
    """An image file as a uint8 RGB tensor [3, H, W] (PIL: libjpeg-turbo, libpng, ...)."""
    from PIL import Image, UnidentifiedImageError
    import torchvision.transforms.v2.functional as TF
    try:
        with Image.open(path) as img:
            return TF.pil_to_tensor(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from e


class SplitListImages(Dataset):
    """Images named by a split list, as uint8 RGB tensors [3, H, W]."""

    def __init__(self, list_file: str, root: str, check_files: bool = True):
        self.list_file = list_file
        self.entries = read_split_list(list_file, root, check_files)
        self.labels = torch.tensor([label for _, label in self.entries], dtype=torch.int64)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        path, label = self.entries[index]
        return decode_image_file(path), label


class SyntheticImages(Dataset):
    """`num_images` images of seeded random pixels (uint8 [channels, size, size]), labelled
    index % num_classes: the input pipeline's work without any file access or decoding."""

    def __init__(self, num_images: int, num_classes: int, size: int, channels: int = 3,
                 seed: int = 0):
        self.num_images, self.size, self.channels, self.seed = num_images, size, channels, seed
        self.labels = torch.arange(num_images, dtype=torch.int64) % num_classes

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        pixels = torch.randint(0, 256, (self.channels, self.size, self.size), dtype=torch.uint8,
                               generator=_generator(self.seed, index, 0x5F))
        return pixels, int(self.labels[index])


# ----------------------------------------------------------------------------------------------
# Seeded transforms on uint8 images: __call__(image, generator) -> uint8 tensor [C, H, W]
# ----------------------------------------------------------------------------------------------
def _as_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    import torchvision.transforms.v2.functional as TF
    return TF.pil_to_tensor(img)


class Normalize:
    """uint8 batch [N, C, H, W] -> float32 ((x / 255 - mean) / std), on the batch's device;
    channels_last: the result in channels-last memory format."""

    def __init__(self, mean, std, channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            raise TypeError(f"Normalize expects a uint8 batch, got {batch.dtype}")
        if batch.size(1) != self.mean.size(1):
            raise DataError(f"images have {batch.size(1)} channels, data.mean/data.std have "
                            f"{self.mean.size(1)} values")
        if self.mean.device != batch.device:
            self.mean, self.std = self.mean.to(batch.device), self.std.to(batch.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch.float().div_(255.0).sub_(self.mean).div_(self.std)


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) then a horizontal flip with probability 1/2, the
    recipe's augmentation, with torchvision's crop rule but every draw from `generator`."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def crop_box(self, height: int, width: int, generator: torch.Generator):
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        in_ratio = width / height  # fallback: the central crop, as torchvision does
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img, generator: torch.Generator) -> torch.Tensor:
        img = _as_tensor(img)
        top, left, h, w = self.crop_box(int(img.shape[-2]), int(img.shape[-1]), generator)
        img = resized_crop(img, top, left, h, w, self.size)
        if float(torch.rand((), generator=generator)) < 0.5:
            img = img.flip(-1)
        return img


# Where torchvision resizes uint8 images natively (bilinear, antialiased), the crop and resize are
# done here with the same kernel: bitwise the images of torchvision's resized_crop, at half its
# per-call cost, which on 28 px images is most of the augmentation's time (the Fashion-MNIST
# study trains 26 models on two cores).
_NATIVE_UINT8_RESIZE = None


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int,
                 size: int) -> torch.Tensor:
    """torchvision's `resized_crop(img, top, left, height, width, [size, size], antialias=True)`
    (bilinear) of a uint8 image [C, H, W] whose box lies inside the image."""
    global _NATIVE_UINT8_RESIZE
    if _NATIVE_UINT8_RESIZE is None:
        from torchvision.transforms.v2.functional._geometry import \
            _do_native_uint8_resize_on_cpu
        from torchvision.transforms.v2.functional import InterpolationMode
        _NATIVE_UINT8_RESIZE = _do_native_uint8_resize_on_cpu(InterpolationMode.BILINEAR)
    fits = 0 <= top and 0 <= left and top + height <= img.shape[-2] and \
        left + width <= img.shape[-1]
    if not (_NATIVE_UINT8_RESIZE and fits and img.dtype == torch.uint8 and img.dim() == 3
            and img.device.type == "cpu"):
        import torchvision.transforms.v2.functional as TF
        return TF.resized_crop(img, top, left, height, width, [size, size], antialias=True)
    crop = img[:, top:top + height, left:left + width]
    if (height, width) == (size, size):
        return crop
    return F.interpolate(crop.unsqueeze(0), size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)[0]


class ResizeCenterCrop:
    """Evaluation transform: resize the short side to size / crop_fraction, centre crop `size`
    (no resize at all when the image already has the size)."""

    def __init__(self, size: int, crop_fraction: float = 0.875):
        self.size, self.crop_fraction = int(size), crop_fraction

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        img = _as_tensor(img)
        if tuple(img.shape[-2:]) != (self.size, self.size):
            img = TF.resize(img, int(round(self.size / self.crop_fraction)), antialias=True)
            img = TF.center_crop(img, [self.size, self.size])
        return img


class SeededViews(Dataset):
    """`views` transformed copies of each image of `base`.

    View v of sample `index` in `epoch` is transformed with a generator seeded by
    (seed, epoch, index, v), so the images do not depend on which process or worker loads them.
    Items are (view_0, ..., view_{views-1}, label, index). The item key is `(epoch, index)` (as
    `BatchList` hands them out, so that persistent loader workers need no epoch state) or a
    plain index, for the epoch of the last `set_epoch`.
    """

    def __init__(self, base: Dataset, transform, views: int = 1, seed: int = 0):
        self.base, self.transform, self.views, self.seed = base, transform, views, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        img, label = self.base[index]
        out = [self.transform(img, _generator(self.seed, epoch, index, v))
               for v in range(self.views)]
        return (*out, label, index)


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------
class BatchList(torch.utils.data.Sampler):
    """A batch sampler whose batches are replaced before each pass, so that one DataLoader (and
    its persistent workers) serves every epoch. `set(batches, epoch)` makes the keys
    (epoch, index) pairs for `SeededViews`."""

    def __init__(self):
        self.batches: list = []

    def set(self, batches, epoch: int | None = None) -> "BatchList":
        self.batches = batches if epoch is None else [[(epoch, i) for i in b] for b in batches]
        return self

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def make_loader(dataset: Dataset, batches: BatchList, *, num_workers: int = 0,
                pin_memory: bool = False, prefetch_factor: int = 4, seed: int = 0):
    """A DataLoader over `batches`: persistent workers, pinned memory when asked (CUDA)."""
    # Its own generator: the loader then never draws from the process RNG (whose state a
    # checkpoint restores); the augmentations are seeded per sample anyway.
    kwargs = {"batch_sampler": batches, "num_workers": num_workers, "pin_memory": pin_memory,
              "generator": torch.Generator().manual_seed(derive_seed(seed, 0x10AD))}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return torch.utils.data.DataLoader(dataset, **kwargs)


class LoaderPool:
    """One DataLoader per named data set, reused across epochs (its workers persist);
    `close()` ends the workers of every loader (between stages)."""

    def __init__(self, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 4,
                 seed: int = 0):
        self.options = {"num_workers": num_workers, "pin_memory": pin_memory,
                        "prefetch_factor": prefetch_factor, "seed": seed}
        self.loaders: dict = {}

    def get(self, name: str, dataset: Dataset, batches, epoch: int | None = None):
        """The loader of `name` (made on first use for `dataset`), set to yield `batches` (keyed
        (epoch, index) when `epoch` is given)."""
        if name not in self.loaders or self.loaders[name][0].dataset is not dataset:
            sampler = BatchList()
            self.loaders[name] = (make_loader(dataset, sampler, **self.options), sampler)
        loader, sampler = self.loaders[name]
        sampler.set(batches, epoch)
        return loader

    def close(self) -> None:
        for loader, _ in self.loaders.values():
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None
        self.loaders.clear()


# ----------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------
def shuffled_batches(num_samples: int, batch_size: int, seed: int, epoch: int,
                     drop_last: bool = True) -> list[list[int]]:
    """The global batches of an epoch: a permutation seeded by (seed, epoch), cut in batches."""
    order = torch.randperm(num_samples, generator=_generator(seed, epoch, 0x5EED)).tolist()
    stop = num_samples - num_samples % batch_size if drop_last else num_samples
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def class_cycling_batches(labels: torch.Tensor, batch_size: int, seed: int, epoch: int,
                          samples_per_class: int = 4, num_samples: int | None = None,
                          drop_last: bool = True) -> list[list[int]]:
    """Class-balanced order of cRT's class-aware sampler: visit the classes in a shuffled cycle,
    take `samples_per_class` images of each from its own shuffled cycle, and repeat until
    `num_samples` (default: the dataset size) indices are drawn."""
    g = _generator(seed, epoch, 0xC1A55)
    classes = torch.unique(labels).tolist()
    members = {c: torch.nonzero(labels == c).flatten().tolist() for c in classes}
    queues = {c: [] for c in classes}
    total = labels.numel() if num_samples is None else num_samples
    order: list[int] = []
    class_queue: list[int] = []
    while len(order) < total:
        if not class_queue:
            class_queue = [classes[i] for i in torch.randperm(len(classes), generator=g).tolist()]
        c = class_queue.pop(0)
        for _ in range(samples_per_class):
            if not queues[c]:
                queues[c] = [members[c][i]
                             for i in torch.randperm(len(members[c]), generator=g).tolist()]
            order.append(queues[c].pop(0))
    order = order[:total]
    stop = total - total % batch_size if drop_last else total
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def local_part(batch: list[int], rank: int, world: int) -> list[int]:
    """The contiguous slice of a global batch that process `rank` loads."""
    if len(batch) % world:
        raise ValueError(f"a global batch of {len(batch)} does not split over {world} processes")
    per = len(batch) // world
    return batch[rank * per:(rank + 1) * per]
