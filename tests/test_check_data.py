"""Split lists against published figures and the images on disk: generated lists with a wrong
count, a missing file, a duplicate, a train/test overlap; the check_data.py command."""
import os

import numpy as np
import pytest
from PIL import Image

from _harness import RECIPE  # noqa: F401  (the recipe on sys.path)

import check_data
import datasets
from check_data import check_split_list
from config import DataConfig
from datasets import SplitFigures
from errors import run_command


def cli(argv):
    return run_command(check_data.main, argv, "check_data.py")


@pytest.fixture
def tree(tmp_path):
    """root/train/c{k}/i{j}.png: class k has 4 - k images (4, 3, 2); root/val/c{k}/v{j}.png: 2."""
    root = tmp_path / "root"
    train, test = [], []
    for k in range(3):
        for j in range(4 - k):
            train.append(f"train/c{k}/i{j}.png {k}")
        for j in range(2):
            test.append(f"val/c{k}/v{j}.png {k}")
    for line in train + test:
        rel = line.split()[0]
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        Image.fromarray(np.full((4, 4), 7, np.uint8)).save(root / rel)
    return root, train, test


def test_small_list_with_a_wrong_count_and_a_missing_file(tree, tmp_path):
    root, train, _ = tree
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(train[:-1] + ["train/c2/gone.png 2"]) + "\n")
    figures = SplitFigures(images=10, classes=3, max_per_class=4, min_per_class=2)
    report, _ = check_split_list(str(listing), str(root), "train")
    assert report.problems == [f"{listing}:9: image 'train/c2/gone.png' not found under {root}"]
    # Against figures: the list holds 9 images and its smallest class 2 (all correct but count).
    datasets.PUBLISHED["tiny"] = datasets.PublishedDataset("Tiny", 3, {"train": figures},
                                                           "here", "here")
    try:
        report, _ = check_split_list(str(listing), str(root), "train", dataset="tiny")
    finally:
        del datasets.PUBLISHED["tiny"]
    assert f"{listing}: 9 images, the published Tiny train split has 10" in report.problems
    assert report.problems[0].startswith(f"{listing}:9: image 'train/c2/gone.png' not found")
    assert (report.images, report.classes, report.max_per_class, report.min_per_class) == \
        (9, 3, 4, 2)


def test_imagenet_lt_figures_on_a_generated_list_one_line_short(tmp_path):
    # ImageNet-LT's shape (115,846 images, 1000 classes, 1280 down to 5 per class), with one line
    # of a 5-image class lost; the text alone is checked (no images).
    counts = [1280] * 86 + [1201] + [5] * 913
    assert (sum(counts), len(counts)) == (115_846, 1000)
    lines = [f"train/n{c}/{i}.JPEG {c}" for c, n in enumerate(counts) for i in range(n)]
    listing = tmp_path / "ImageNet_LT_train.txt"
    listing.write_text("\n".join(lines) + "\n")
    report, _ = check_split_list(str(listing), str(tmp_path), "train", dataset="imagenet_lt",
                                 check_images=False)
    assert report.problems == []
    listing.write_text("\n".join(lines[:-1]) + "\n")
    report, _ = check_split_list(str(listing), str(tmp_path), "train", dataset="imagenet_lt",
                                 check_images=False)
    assert report.problems == [
        f"{listing}: 115,845 images, the published ImageNet-LT train split has 115,846",
        f"{listing}: the smallest class (label 999) has 4 images, in the published "
        f"ImageNet-LT train split it has 5"]


def test_duplicates_labels_overlap_and_bad_lines(tree, tmp_path):
    root, train, test = tree
    (tmp_path / "train.txt").write_text("\n".join(train + [train[0], "oops"]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(test + [train[1].replace(" 0", " 5")]) + "\n")
    reports = check_data.check_data(DataConfig(
        kind="split_list", image_root=str(root), dataset=None, num_classes=3,
        train_list=str(tmp_path / "train.txt"), val_list=None,
        test_list=str(tmp_path / "test.txt")))
    train_problems, test_problems = reports[0].problems, reports[1].problems
    assert f"{tmp_path / 'train.txt'}:10: image 'train/c0/i0.png' is already listed on line 1" \
        in train_problems
    assert any(p.startswith(f"{tmp_path / 'train.txt'}:11: expected '<relative/path> <label>'")
               for p in train_problems)
    assert f"{tmp_path / 'test.txt'}:7: label 5 is outside [0, 3) (data.num_classes = 3)" \
        in test_problems
    assert f"{tmp_path / 'test.txt'}:7: image 'train/c0/i1.png' is also in the train list " \
        f"({tmp_path / 'train.txt'}:2)" in test_problems


def test_check_data_command(tree, tmp_path, capsys):
    root, train, test = tree
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(test) + "\n")
    (tmp_path / "c.yaml").write_text(
        f"data:\n  kind: split_list\n  image_root: {root}\n  train_list: {tmp_path / 'train.txt'}\n"
        f"  test_list: {tmp_path / 'test.txt'}\n")
    assert cli(["--config", str(tmp_path / "c.yaml"), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "train: " in out and "9 images, 3 classes, 4 to 2 per class" in out
    assert "all lists agree and every image is there" in out
    os.remove(root / "val" / "c1" / "v0.png")
    assert cli(["--config", str(tmp_path / "c.yaml")]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'test.txt'}:3: image 'val/c1/v0.png' not found under {root}" in out
    assert "1 problem(s)" in out
    assert cli(["--config", str(tmp_path / "c.yaml"),
                     "--set", "data.dataset=imagenet_lt", "--no-images"]) == 1
    assert "9 images, the published ImageNet-LT train split has 115,846" in \
        capsys.readouterr().out
