"""The data sets of the recipe and the published figures of their splits, in one place.

To add a data set: a `data.kind` (config.DATA_KINDS) and its branch in `build_data`; for a
published long-tailed split list, its figures in PUBLISHED (the start-up check and `check_data.py`
compare lists with them). The Fashion-MNIST files, where to find and download them: FASHION_MNIST.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

import balance as kbalance
import data as kdata
from errors import ConfigError, DataError

# The four IDX files of Fashion-MNIST (Xiao et al., 2017; MIT licence): gzip file -> (bytes, MD5)
# of its decompressed content, which is the same in torchvision's download and in the Debian
# package dataset-fashion-mnist (their gzip files differ). `get_data.py` fetches and checks them.
FASHION_MNIST = {
    "train-images-idx3-ubyte.gz": (47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte.gz": (60008, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte.gz": (7840016, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte.gz": (10008, "15d484375f8d13e6eb1aabb0c3f46965"),
}


@dataclass(frozen=True)
class SplitFigures:
    """What a published split holds."""

    images: int
    classes: int
    max_per_class: int | None = None
    min_per_class: int | None = None
    per_class: int | None = None   # balanced splits: every class has exactly this many


@dataclass(frozen=True)
class PublishedDataset:
    title: str
    num_classes: int
    splits: dict
    lists: str      # where the split lists come from
    layout: str     # how the images must be laid out under data.image_root


PUBLISHED = {
    "imagenet_lt": PublishedDataset(
        "ImageNet-LT", 1000,
        {"train": SplitFigures(115_846, 1000, max_per_class=1280, min_per_class=5),
         "val": SplitFigures(20_000, 1000, per_class=20),
         "test": SplitFigures(50_000, 1000, per_class=50)},
        lists="ImageNet_LT_{train,val,test}.txt of the OLTR project (Liu et al., CVPR 2019, "
              "github.com/zhmiao/OpenLongTailRecognition-OLTR), also in "
              "facebookresearch/classifier-balancing under data/ImageNet_LT/",
        layout="image_root holds ILSVRC2012 train/<wnid>/*.JPEG and val/<wnid>/*.JPEG: the "
               "test list names the ILSVRC2012 val images inside class folders, so the val "
               "archive must be sorted into them"),
    "inat2018": PublishedDataset(
        "iNaturalist 2018", 8142,
        {"train": SplitFigures(437_513, 8142, max_per_class=1000, min_per_class=2),
         "val": SplitFigures(24_426, 8142, per_class=3),
         "test": SplitFigures(24_426, 8142, per_class=3)},
        lists="iNaturalist18_{train,val}.txt of facebookresearch/classifier-balancing "
              "(data/iNaturalist18/, generated from the competition's train2018.json and "
              "val2018.json); the val split is the test set",
        layout="image_root holds the competition's train_val2018/<kingdom>/<class>/*.jpg"),
    "places_lt": PublishedDataset(
        "Places-LT", 365,
        {"train": SplitFigures(62_500, 365, max_per_class=4980, min_per_class=5),
         "val": SplitFigures(7_300, 365, per_class=20),
         "test": SplitFigures(36_500, 365, per_class=100)},
        lists="Places_LT_{train,val,test}.txt of the OLTR project, also in "
              "facebookresearch/classifier-balancing under data/Places_LT/",
        layout="image_root holds Places365-Standard as the lists name it"),
}


def figure_problems(list_file: str, labels, figures: SplitFigures | None, title: str = "",
                    split: str = "", limit: int = 10) -> list[str]:
    """How the label counts of a list differ from the published figures (empty: they agree)."""
    counts = Counter(int(x) for x in labels)
    if figures is None or not counts:
        return []
    name = f"the published {title} {split} split".replace("  ", " ")
    out = []
    total = sum(counts.values())
    if total != figures.images:
        out.append(f"{list_file}: {total:,} images, {name} has {figures.images:,}")
    if len(counts) != figures.classes:
        out.append(f"{list_file}: {len(counts):,} classes have images, {name} has "
                   f"{figures.classes:,}")
    largest = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
    smallest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if figures.max_per_class is not None and largest[1] != figures.max_per_class:
        out.append(f"{list_file}: the largest class (label {largest[0]}) has {largest[1]:,} "
                   f"images, in {name} it has {figures.max_per_class:,}")
    if figures.min_per_class is not None and smallest[1] != figures.min_per_class:
        out.append(f"{list_file}: the smallest class (label {smallest[0]}) has "
                   f"{smallest[1]:,} images, in {name} it has {figures.min_per_class:,}")
    if figures.per_class is not None:
        wrong = [(c, n) for c, n in sorted(counts.items()) if n != figures.per_class]
        for c, n in wrong[:limit]:
            out.append(f"{list_file}: class {c} has {n} images, {name} has "
                       f"{figures.per_class} per class")
        if len(wrong) > limit:
            out.append(f"{list_file}: ... and {len(wrong) - limit} more classes with another "
                       f"count than {figures.per_class}")
    return out


def published_figures(dataset: str | None, split: str) -> tuple[SplitFigures | None, str]:
    if dataset is None:
        return None, ""
    published = PUBLISHED[dataset]
    return published.splits.get(split), published.title


def check_counts_or_raise(list_file: str, labels: torch.Tensor, dataset: str | None,
                          split: str) -> None:
    """The start-up check of a run: DataError listing every count that differs."""
    figures, title = published_figures(dataset, split)
    problems = figure_problems(list_file, labels.tolist(), figures, title, split)
    if problems:
        raise DataError(f"data.dataset is {dataset!r}, but the {split} list does not hold its "
                        f"published split:\n  " + "\n  ".join(problems) +
                        "\n(`check_data.py` checks lists and images; set data.dataset: "
                        "null for a list of your own)")


@dataclass
class DataBundle:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset
    train_transform: object
    eval_transform: object
    num_classes: int
    mean: tuple
    std: tuple
    channels: int
    balanced: torch.utils.data.Dataset | None = None  # the β protocol's balanced split


def _check_labels(dataset, list_file: str, num_classes: int) -> None:
    top = int(dataset.labels.max())
    if top >= num_classes:
        raise DataError(f"{list_file}: label {top} is outside [0, {num_classes}) "
                        f"(data.num_classes = {num_classes})")


def build_data(cfg) -> DataBundle:
    """The data sets and transforms a config names."""
    d = cfg.data
    size = d.image_size
    val = balanced = None
    if d.kind == "fashion_mnist_lt":
        fm = kdata.fashion_mnist_lt(d.root, d.imbalance_factor, d.max_per_class,
                                    d.test_per_class, d.subset_seed, d.class_order,
                                    d.class_counts, d.balanced_per_class)
        train, test, balanced = fm.train, fm.test, fm.balanced
        mean, std, num_classes, channels = kdata.FASHION_MNIST_MEAN, kdata.FASHION_MNIST_STD, 10, 1
        crop_fraction = 1.0
    elif d.kind == "split_list":
        train = kdata.SplitListImages(d.train_list, d.image_root, d.check_files)
        test = kdata.SplitListImages(d.test_list, d.image_root, d.check_files)
        if d.val_list:
            val = kdata.SplitListImages(d.val_list, d.image_root, d.check_files)
        if d.balanced_list:
            balanced = kdata.SplitListImages(d.balanced_list, d.image_root, d.check_files)
        sets = [("train", train), ("test", test)] + ([("val", val)] if val is not None else [])
        extra = [("balanced", balanced)] if balanced is not None else []
        num_classes = d.num_classes or max(int(s.labels.max()) for _, s in sets + extra) + 1
        for split, dataset in sets:
            _check_labels(dataset, dataset.list_file, num_classes)
            check_counts_or_raise(dataset.list_file, dataset.labels, d.dataset, split)
        if balanced is not None:  # any balanced list (ImageNet-LT's val list is one)
            _check_labels(balanced, balanced.list_file, num_classes)
            kbalance.check_balanced(balanced.labels, num_classes,
                                    f"balanced split {balanced.list_file} (data.balanced_list)")
        if d.dataset == "inat2018":
            mean, std = kdata.INAT2018_MEAN, kdata.INAT2018_STD
        else:
            mean, std = kdata.IMAGENET_MEAN, kdata.IMAGENET_STD
        channels, crop_fraction = 3, 0.875
    else:  # synthetic
        num_classes, channels = d.num_classes, d.synthetic_channels
        source = d.synthetic_source_size or int(round(size / 0.875))
        train = kdata.SyntheticImages(d.synthetic_images, num_classes, source, channels,
                                      cfg.seed)
        test = kdata.SyntheticImages(max(num_classes, d.synthetic_images // 8), num_classes,
                                     source, channels, cfg.seed + 1)
        mean, std = (kdata.FASHION_MNIST_MEAN, kdata.FASHION_MNIST_STD) if channels == 1 else \
            (kdata.IMAGENET_MEAN, kdata.IMAGENET_STD)
        crop_fraction = 0.875
    if d.mean is not None:
        mean, std = tuple(d.mean), tuple(d.std)
    if len(mean) != channels:
        raise ConfigError(f"data.mean/data.std have {len(mean)} values, the images have "
                          f"{channels} channels")
    return DataBundle(train, val, test, kdata.RandomResizedCropFlip(size, d.crop_scale),
                      kdata.ResizeCenterCrop(size, crop_fraction), num_classes, mean, std,
                      channels, balanced)
