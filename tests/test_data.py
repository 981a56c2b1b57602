"""Data: split lists on a generated image tree, IDX files, Fashion-MNIST-LT, seeded views, order."""

import numpy as np
import pytest
import torch
from PIL import Image

from _harness import make_fashion_idx, write_idx

import data as kdata


@pytest.fixture
def image_tree(tmp_path):
    """root/train/c{label}/img{i}.png (odd sizes, RGB and grey) and a split list."""
    root = tmp_path / "images"
    lines = []
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / "train" / f"c{label}").mkdir(parents=True)
        for i in range(2):
            rel = f"train/c{label}/img{i}.png"
            mode = "L" if i else "RGB"
            shape = (37 + label, 45) if mode == "L" else (37 + label, 45, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / rel)
            lines.append(f"{rel} {label}")
    split = tmp_path / "train.txt"
    split.write_text("\n".join(lines) + "\n\n")
    return root, split, lines


def test_split_list_loads_images_and_labels(image_tree):
    root, split, _ = image_tree
    ds = kdata.SplitListImages(str(split), str(root))
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    views = kdata.SeededViews(ds, kdata.RandomResizedCropFlip(32), views=2, seed=1)
    a, b, label, index = views[3]
    assert a.shape == b.shape == (3, 32, 32) and a.dtype == torch.uint8  # uint8 to the device
    assert label == 1 and index == 3 and not torch.equal(a, b)
    img, _ = ds[3]  # a grey PNG, decoded as RGB
    assert img.shape == (3, 38, 45) and torch.equal(img[0], img[2])
    evaluated = kdata.ResizeCenterCrop(32)(img)
    assert evaluated.shape == (3, 32, 32) and evaluated.float().std() > 0
    # The (epoch, index) key of persistent workers and set_epoch give the same views.
    views.set_epoch(4)
    assert all(torch.equal(x, y) for x, y in zip(views[3][:2], views[(4, 3)][:2]))


def test_normalize_on_the_device_matches_the_per_image_formula():
    batch = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = kdata.Normalize(mean, std)(batch)
    expected = torch.stack([img.float().div(255.0).sub(torch.tensor(mean).view(3, 1, 1))
                            .div(torch.tensor(std).view(3, 1, 1)) for img in batch])
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    last = kdata.Normalize(mean, std, channels_last=True)(batch)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)
    with pytest.raises(ValueError, match="images have 3 channels, data.mean/data.std have 1"):
        kdata.Normalize((0.5,), (0.5,))(batch)


def test_split_list_missing_val_folder_layout_gets_a_hint(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    listing = tmp_path / "test.txt"
    listing.write_text("val/n01440764/ILSVRC2012_val_00000001.JPEG 0\n")
    with pytest.raises(FileNotFoundError, match=r"test\.txt:1: .*must be sorted into class "
                                                r"folders"):
        kdata.SplitListImages(str(listing), str(tmp_path))


def test_split_list_malformed_line_names_file_and_line(image_tree, tmp_path):
    root, _, lines = image_tree
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{lines[0]}\n{lines[1]}\ntrain/c0/img0.png\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: expected '<relative/path> <label>'"):
        kdata.SplitListImages(str(bad), str(root))
    bad.write_text(f"{lines[0]}\ntrain/c0/img1.png zero\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: .*got 'train/c0/img1\.png zero'"):
        kdata.SplitListImages(str(bad), str(root))


def test_split_list_missing_file_names_file_and_line(image_tree, tmp_path):
    root, _, lines = image_tree
    bad = tmp_path / "missing.txt"
    bad.write_text(f"{lines[0]}\n{lines[1]}\n{lines[2]}\ntrain/c9/nope.png 9\n")
    with pytest.raises(FileNotFoundError,
                       match=r"missing\.txt:4: image 'train/c9/nope\.png' not found under"):
        kdata.SplitListImages(str(bad), str(root))
    with pytest.raises(FileNotFoundError, match="split list .*absent.txt not found"):
        kdata.SplitListImages(str(tmp_path / "absent.txt"), str(root))


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(str(tmp_path / "x-idx3-ubyte"), array, compress)
    assert np.array_equal(kdata.read_idx(path), array)


def test_read_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="bad-idx is not an IDX file"):
        kdata.read_idx(str(bad))
    good = write_idx(str(tmp_path / "short"), np.zeros((4, 4), np.uint8), compress=False)
    with open(good, "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match="short holds 8 data bytes"):
        kdata.read_idx(good)


def test_long_tailed_counts_exponential_profile():
    # floor(1000 * 0.01 ** (c / 9)): 599.48, 359.38, 215.44, 129.15, 77.43, 46.42, 27.83, 16.68
    assert kdata.long_tailed_counts(10, 1000, 100) == [1000, 599, 359, 215, 129, 77, 46, 27, 16,
                                                       10]
    assert kdata.long_tailed_counts(10, 6000, 100)[-1] == 60
    with pytest.raises(ValueError, match="imbalance_factor must be >= 1"):
        kdata.long_tailed_counts(10, 1000, 0.5)


def test_fashion_mnist_lt_on_generated_idx(tmp_path):
    folder = make_fashion_idx(str(tmp_path / "fm"), train_per_class=30, test_per_class=5)
    fm = kdata.fashion_mnist_lt(folder, imbalance_factor=10, max_per_class=30)
    train, test = fm.train, fm.test
    assert fm.balanced is None and fm.counts == kdata.long_tailed_counts(10, 30, 10)
    counts = torch.bincount(train.labels, minlength=10).tolist()
    assert counts == kdata.long_tailed_counts(10, 30, 10)
    assert torch.bincount(test.labels).tolist() == [5] * 10  # balanced test set
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    again = kdata.fashion_mnist_lt(folder, imbalance_factor=10, max_per_class=30).train
    assert torch.equal(again.images, train.images)  # the subset is seeded
    with pytest.raises(ValueError, match="class 0 has 30 images, 31 were asked"):
        kdata.fashion_mnist_lt(folder, imbalance_factor=10, max_per_class=31)
    with pytest.raises(FileNotFoundError, match="make data"):
        kdata.find_fashion_mnist(str(tmp_path / "nowhere"))


def test_seeded_views_depend_on_seed_epoch_index_only(tmp_path):
    folder = make_fashion_idx(str(tmp_path / "fm"), train_per_class=4, test_per_class=1)
    train = kdata.fashion_mnist_lt(folder, 1, 4).train
    tf = kdata.RandomResizedCropFlip(28, (0.3, 1.0))
    a = kdata.SeededViews(train, tf, views=2, seed=5)
    b = kdata.SeededViews(train, tf, views=2, seed=5)
    torch.manual_seed(123)  # the process RNG plays no part
    assert all(torch.equal(x, y) for x, y in zip(a[7][:2], b[7][:2]))
    b.set_epoch(1)
    assert not torch.equal(a[7][0], b[7][0])


def test_batch_orders():
    batches = kdata.shuffled_batches(10, 4, seed=1, epoch=0)
    assert [len(b) for b in batches] == [4, 4]
    assert batches == kdata.shuffled_batches(10, 4, seed=1, epoch=0)
    assert batches != kdata.shuffled_batches(10, 4, seed=1, epoch=1)
    labels = torch.tensor([0] * 50 + [1] * 8 + [2] * 2)
    order = [i for b in kdata.class_cycling_batches(labels, 12, 0, 0, 4, num_samples=60)
             for i in b]
    per_class = torch.bincount(labels[order], minlength=3).tolist()
    assert per_class == [20, 20, 20]
    assert kdata.local_part([1, 2, 3, 4], 1, 2) == [3, 4]
    with pytest.raises(ValueError, match="does not split over 3"):
        kdata.local_part([1, 2, 3, 4], 0, 3)


def test_class_orders_and_the_balanced_held_out_split(tmp_path):
    folder = make_fashion_idx(str(tmp_path / "fm"), train_per_class=30, test_per_class=2)
    orders = ([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], [3, 1, 4, 0, 5, 9, 2, 6, 8, 7])
    sets = [kdata.fashion_mnist_lt(folder, 10, 20, seed=2, class_order=order,
                                   balanced_per_class=10) for order in orders]
    profile = kdata.long_tailed_counts(10, 20, 10)
    for order, fm in zip(orders, sets):
        counts = torch.bincount(fm.train.labels, minlength=10).tolist()
        assert counts == fm.counts == [profile[order.index(c)] for c in range(10)]
        assert torch.bincount(fm.balanced.labels).tolist() == [10] * 10
    # The held-out split is the same under every ordering and shares no image with any of
    # the long-tailed sets (the generated images are all distinct).
    assert torch.equal(sets[0].balanced.images, sets[1].balanced.images)
    held = {bytes(img.numpy()) for img in sets[0].balanced.images}
    for fm in sets:
        assert not held & {bytes(img.numpy()) for img in fm.train.images}
    # The subsets of a class are nested: class 0 has rank 9 under the first order (2 images)
    # and rank 3 under the second (9 images); the 2 are among the 9.
    few_class = 0
    small = {bytes(i.numpy()) for i in sets[0].train.images[sets[0].train.labels == few_class]}
    large = {bytes(i.numpy()) for i in sets[1].train.images[sets[1].train.labels == few_class]}
    assert len(small) == 2 and small < large
    with pytest.raises(ValueError, match=r"a balanced held-out split of 11 images per class needs "
                                         r"31 images of class 0 \(20 are in the training set\), "
                                         r"the source has 30"):
        kdata.fashion_mnist_lt(folder, 10, 20, balanced_per_class=11)
