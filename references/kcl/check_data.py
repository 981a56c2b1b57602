"""Split lists checked against their published figures and against the images on disk.

`python references/kcl/check_data.py --config X` reads every list the config names (train,
val, test) and reports, each with the list file and line where there is one:
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

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch

from data import decode_image_file, missing_image_hint, parse_split_line, split_list_lines
from config import load_config
from datasets import PUBLISHED, figure_problems, published_figures
from errors import DataError, MissingFileError, run_command


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


def check_split_list(list_file: str, image_root: str, split: str, *,
                     dataset: str | None = None, num_classes: int | None = None,
                     check_images: bool = True, decode: bool = False,
                     train_paths: dict | None = None,
                     train_list: str = "") -> tuple[SplitReport, dict]:
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
    if data_cfg.kind != "split_list":
        raise DataError(f"check_data.py checks split lists; data.kind is {data_cfg.kind!r}")
    root = data_cfg.image_root
    if check_images and not os.path.isdir(root):
        raise MissingFileError(f"data.image_root {root} is not a folder")
    reports, train_paths = [], None
    for split, key in SPLIT_KEYS.items():
        if not getattr(data_cfg, key):
            continue
        report, paths = check_split_list(
            getattr(data_cfg, key), root, split, dataset=data_cfg.dataset,
            num_classes=data_cfg.num_classes, check_images=check_images, decode=decode,
            train_paths=train_paths, train_list=data_cfg.train_list)
        if split == "train":
            train_paths = paths
        reports.append(report)
    return reports


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="check_data.py",
        description="Checks the split lists of a config against the published figures of "
                    "data.dataset and against the images under data.image_root; every problem "
                    "names the list file and line.")
    p.add_argument("--config", required=True, help="YAML config with data.kind: split_list")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-images", action="store_true", help="check the lists only")
    p.add_argument("--decode", action="store_true", help="also decode every image (slow)")
    p.add_argument("--max-problems", type=int, default=30,
                   help="problems printed per list (default 30)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    reports = check_data(d, check_images=not args.no_images, decode=args.decode)
    if d.dataset:
        published = PUBLISHED[d.dataset]
        print(f"data.dataset: {published.title} ({published.num_classes} classes); lists: "
              f"{published.lists}; layout: {published.layout}")
    else:
        print("data.dataset is null: no published figures to compare with")
    failed = 0
    for report in reports:
        print(report.summary())
        for problem in report.problems[:args.max_problems]:
            print(f"  {problem}")
        if len(report.problems) > args.max_problems:
            print(f"  ... and {len(report.problems) - args.max_problems} more problems")
        failed += len(report.problems)
    print(f"{failed} problem(s)" if failed else "all lists agree" +
          (" with the published figures" if d.dataset else "") +
          ("" if args.no_images else " and every image is there"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "check_data.py"))
