"""Split lists checked against their published figures and against the images on disk.

`kcl-train check-data --config X` reads every list the config names (train, val, test) and
reports, each with the list file and line where there is one:
- malformed lines, labels outside [0, data.num_classes), an image listed twice, an image of the
  test (or val) list that is also in the train list;
- counts that differ from the published split of `data.dataset` (images, classes, largest and
  smallest class, images per class of the balanced splits);
- images missing under `data.image_root` (with a hint when the layout explains it, such as the
  ILSVRC2012 val images left unsorted), and with `--decode` images that do not decode.

Training runs the count check at start-up too (when `data.dataset` is set), so a wrong list
stops the run before it trains on the wrong data.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from .data import decode_image_file, missing_image_hint, parse_split_line, split_list_lines
from .errors import DataError, MissingFileError


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

SPLIT_KEYS = {"train": "train_list", "val": "val_list", "test": "test_list"}


@dataclass
class SplitReport:
    split: str
    list_file: str
    images: int = 0
    classes: int = 0
    max_per_class: int = 0
    min_per_class: int = 0
    problems: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.split}: {self.list_file}: {self.images:,} images, {self.classes:,} "
                f"classes, {self.max_per_class:,} to {self.min_per_class:,} per class")


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


def check_split_list(list_file: str, image_root: str, split: str, *,
                     dataset: str | None = None, num_classes: int | None = None,
                     check_images: bool = True, decode: bool = False,
                     train_paths: dict | None = None, train_list: str = "") -> tuple[SplitReport, dict]:
    """Checks one list; returns its report and {relative path: line} of its entries."""
    report = SplitReport(split, list_file)
    if not os.path.isfile(list_file):
        report.problems.append(f"{list_file}: split list not found")
        return report, {}
    seen: dict[str, int] = {}
    labels = []
    for lineno, text in split_list_lines(list_file):
        try:
            relative, label = parse_split_line(list_file, lineno, text)
        except DataError as e:
            report.problems.append(str(e))
            continue
        where = f"{list_file}:{lineno}"
        if num_classes is not None and label >= num_classes:
            report.problems.append(f"{where}: label {label} is outside [0, {num_classes}) "
                                   f"(data.num_classes = {num_classes})")
        if relative in seen:
            report.problems.append(f"{where}: image {relative!r} is already listed on line "
                                   f"{seen[relative]}")
            continue
        seen[relative] = lineno
        if train_paths is not None and relative in train_paths:
            report.problems.append(f"{where}: image {relative!r} is also in the train list "
                                   f"({train_list}:{train_paths[relative]})")
        labels.append(label)
        if check_images:
            path = os.path.join(image_root, relative)
            if not os.path.isfile(path):
                report.problems.append(f"{where}: image {relative!r} not found under "
                                       f"{image_root}{missing_image_hint(image_root, relative)}")
            elif decode:
                try:
                    decode_image_file(path)
                except DataError as e:
                    report.problems.append(f"{where}: {e}")
    if not labels:
        report.problems.append(f"{list_file}: no entries")
        return report, seen
    counts = Counter(labels)
    report.images, report.classes = len(labels), len(counts)
    report.max_per_class, report.min_per_class = max(counts.values()), min(counts.values())
    figures, title = published_figures(dataset, split)
    report.problems += figure_problems(list_file, labels, figures, title, split)
    return report, seen


def check_data(data_cfg: dict, *, check_images: bool = True,
               decode: bool = False) -> list[SplitReport]:
    """Checks every split list of a `data` config section."""
    if data_cfg["kind"] != "split_list":
        raise DataError(f"check-data checks split lists; data.kind is {data_cfg['kind']!r}")
    root = data_cfg["image_root"]
    if check_images and not os.path.isdir(root):
        raise MissingFileError(f"data.image_root {root} is not a folder")
    reports, train_paths = [], None
    for split, key in SPLIT_KEYS.items():
        if not data_cfg[key]:
            continue
        report, paths = check_split_list(
            data_cfg[key], root, split, dataset=data_cfg["dataset"],
            num_classes=data_cfg["num_classes"], check_images=check_images, decode=decode,
            train_paths=train_paths, train_list=data_cfg["train_list"])
        if split == "train":
            train_paths = paths
        reports.append(report)
    return reports


def check_counts_or_raise(list_file: str, labels: torch.Tensor, dataset: str | None,
                          split: str) -> None:
    """The start-up check of a run: DataError listing every count that differs."""
    figures, title = published_figures(dataset, split)
    problems = figure_problems(list_file, labels.tolist(), figures, title, split)
    if problems:
        raise DataError(f"data.dataset is {dataset!r}, but the {split} list does not hold its "
                        f"published split:\n  " + "\n  ".join(problems) +
                        "\n(`kcl-train check-data` checks lists and images; set data.dataset: "
                        "null for a list of your own)")
