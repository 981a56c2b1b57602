"""Data of the training harness: datasets, seeded augmentations and the batch order.

Two sources:
- split lists (`relative/path label` per line under an image root: ImageNet-LT, iNaturalist 2018,
  Places-LT), read with PIL;
- Fashion-MNIST made long-tailed (`fashion_mnist_lt`): IDX files (gzip or raw), exponential class
  sizes `n_c = floor(max_per_class * (1 / imbalance_factor) ** (c / (C - 1)))`, and the balanced
  test set.

Every random choice of the input pipeline is a function of (seed, epoch, sample index, view): the
batch order comes from a generator seeded by (seed, epoch) and each augmentation from a generator
seeded by (seed, epoch, index, view). Nothing depends on the process's RNG state, the number of
loader workers or the number of processes, so a resumed run and a run split across processes see
exactly the images of an uninterrupted single-process run.
"""
from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_SEARCH = ("data/fashion-mnist", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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
        raise ValueError(f"read_idx: cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"read_idx: {path} is truncated in its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"read_idx: {path} holds {len(raw) - header} data bytes, its header "
                         f"{list(shape)} of {dtype} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_fashion_mnist(root: str | None = None) -> str:
    """The folder with the Fashion-MNIST IDX files: `root`, or the first of FASHION_MNIST_SEARCH."""
    candidates = [root] if root else list(FASHION_MNIST_SEARCH)
    for folder in candidates:
        name = FASHION_MNIST_FILES["train"][0]
        if any(os.path.isfile(os.path.join(folder, name + ext)) for ext in ("", ".gz")):
            return folder
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({FASHION_MNIST_FILES['train'][0]}[.gz], ...) not found in "
        f"{candidates}; run `make data` (installs the Debian package dataset-fashion-mnist) or "
        f"set data.root")


def _idx_path(folder: str, name: str) -> str:
    for ext in ("", ".gz"):
        if os.path.isfile(os.path.join(folder, name + ext)):
            return os.path.join(folder, name + ext)
    raise FileNotFoundError(f"IDX file {name}[.gz] not found in {folder}")


def load_idx_split(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images = read_idx(_idx_path(folder, images_name))
    labels = read_idx(_idx_path(folder, labels_name))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {split} images {list(images.shape)} and labels "
                         f"{list(labels.shape)} do not match (expected [N, H, W] and [N])")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def long_tailed_counts(num_classes: int, max_per_class: int, imbalance_factor: float) -> list[int]:
    """Exponential profile: class c keeps floor(max * (1/imbalance) ** (c / (C - 1))) images."""
    if imbalance_factor < 1:
        raise ValueError(f"data.imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [max_per_class]
    return [int(math.floor(max_per_class * (1.0 / imbalance_factor) ** (c / (num_classes - 1))
                           + 1e-9)) for c in range(num_classes)]


def make_long_tailed(labels: torch.Tensor, counts: list[int], seed: int) -> torch.Tensor:
    """Indices keeping counts[c] images of class c, drawn at random (seeded), sorted."""
    keep = []
    for c, n in enumerate(counts):
        members = torch.nonzero(labels == c).flatten()
        if n > members.numel():
            raise ValueError(f"class {c} has {members.numel()} images, {n} were asked for "
                             f"(lower data.max_per_class)")
        keep.append(members[torch.randperm(members.numel(), generator=_generator(seed, c))[:n]])
    return torch.cat(keep).sort().values


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


def fashion_mnist_lt(root: str | None = None, imbalance_factor: float = 100.0,
                     max_per_class: int = 6000, test_per_class: int | None = None,
                     seed: int = 0) -> tuple[TensorImages, TensorImages]:
    """Long-tailed Fashion-MNIST train set and its balanced test set (1000 per class, or the
    first `test_per_class` of each class)."""
    folder = find_fashion_mnist(root)
    images, labels = load_idx_split(folder, "train")
    counts = long_tailed_counts(10, max_per_class, imbalance_factor)
    keep = make_long_tailed(labels, counts, seed)
    train = TensorImages(images[keep], labels[keep])
    test_images, test_labels = load_idx_split(folder, "test")
    if test_per_class is not None:
        rows = torch.cat([torch.nonzero(test_labels == c).flatten()[:test_per_class]
                          for c in range(10)]).sort().values
        test_images, test_labels = test_images[rows], test_labels[rows]
    return train, TensorImages(test_images, test_labels)


# ----------------------------------------------------------------------------------------------
# Split lists
# ----------------------------------------------------------------------------------------------
def read_split_list(list_file: str, root: str, check_files: bool = True) -> list[tuple[str, int]]:
    """Lines `relative/path label`; blank lines are skipped. Errors name the file and line."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"split list {list_file} not found")
    entries = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise ValueError(f"{list_file}:{lineno}: expected '<relative/path> <label>' with "
                                 f"a non-negative integer label, got {text!r}")
            path = os.path.join(root, parts[0])
            if check_files and not os.path.isfile(path):
                raise FileNotFoundError(f"{list_file}:{lineno}: image {parts[0]!r} not found "
                                        f"under {root}")
            entries.append((path, int(parts[1])))
    if not entries:
        raise ValueError(f"{list_file}: no entries")
    return entries


class SplitListImages(Dataset):
    """Images named by a split list, loaded with PIL as RGB."""

    def __init__(self, list_file: str, root: str, check_files: bool = True):
        self.list_file = list_file
        self.entries = read_split_list(list_file, root, check_files)
        self.labels = torch.tensor([label for _, label in self.entries], dtype=torch.int64)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        from PIL import Image
        path, label = self.entries[index]
        with Image.open(path) as img:
            return img.convert("RGB"), label


# ----------------------------------------------------------------------------------------------
# Seeded transforms: __call__(image, generator) -> float tensor [C, H, W]
# ----------------------------------------------------------------------------------------------
def _to_float(img, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 image (tensor [C, H, W] or PIL) -> normalised float32 tensor."""
    import torchvision.transforms.v2.functional as TF
    if not isinstance(img, torch.Tensor):
        img = TF.pil_to_tensor(img)
    img = img.float().div_(255.0)
    if img.size(0) != mean.size(0):
        mean, std = mean.expand(img.size(0), 1, 1), std.expand(img.size(0), 1, 1)
    return img.sub_(mean).div_(std)


def _stats(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


def _size_of(img) -> tuple[int, int]:
    if isinstance(img, torch.Tensor):
        return int(img.shape[-2]), int(img.shape[-1])
    return img.height, img.width


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) then a horizontal flip with probability 1/2, the
    recipe's augmentation, with torchvision's crop rule but every draw from `generator`."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.mean, self.std = _stats(mean), _stats(std)

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
        import torchvision.transforms.v2.functional as TF
        top, left, h, w = self.crop_box(*_size_of(img), generator)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if float(torch.rand((), generator=generator)) < 0.5:
            img = TF.horizontal_flip(img)
        return _to_float(img, self.mean, self.std)


class ResizeCenterCrop:
    """Evaluation transform: resize the short side to size / crop_fraction, centre crop `size`
    (no resize at all when the image already has the size)."""

    def __init__(self, size: int, crop_fraction: float = 0.875, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.size, self.crop_fraction = int(size), crop_fraction
        self.mean, self.std = _stats(mean), _stats(std)

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        if _size_of(img) != (self.size, self.size):
            img = TF.resize(img, int(round(self.size / self.crop_fraction)), antialias=True)
            img = TF.center_crop(img, [self.size, self.size])
        return _to_float(img, self.mean, self.std)


class SeededViews(Dataset):
    """`views` transformed copies of each image of `base`; call `set_epoch` before each epoch.

    View v of sample `index` in `epoch` is transformed with a generator seeded by
    (seed, epoch, index, v), so the images do not depend on which process or worker loads them.
    Items are (view_0, ..., view_{views-1}, label, index).
    """

    def __init__(self, base: Dataset, transform, views: int = 1, seed: int = 0):
        self.base, self.transform, self.views, self.seed = base, transform, views, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base[index]
        out = [self.transform(img, _generator(self.seed, self.epoch, index, v))
               for v in range(self.views)]
        return (*out, label, index)


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
