"""The β protocol and the difficulty control (references/kcl/balance.py) on tiny features whose
expected β, spread, worst class and relative accuracies are computed by hand."""
import math

import pytest
import torch

import _harness  # noqa: F401  (the recipe on sys.path)

import balance
from config import Stage2Config
from errors import DataError

STAGE2 = Stage2Config(epochs=20, batch_size=4, lr=1.0, momentum=0.9, weight_decay=0.0,
                      schedule="step", milestones=[15], gamma=0.1, init_std=0.01,
                      class_balanced=True, samples_per_class=2, augment=False)


def axis_features(classes, scale=3.0):
    """Feature rows on the coordinate axes: class c at scale * e_c."""
    return scale * torch.eye(3)[torch.as_tensor(classes)]


def test_feature_balance_hand_computed():
    # Balanced split: 4 images per class, each class on its own axis (a linear classifier
    # separates them exactly). Test set: class 0 both on axis 0 (right), class 1 one on axis 1
    # (right) and one on axis 0 (predicted 0), class 2 both on axis 1 (predicted 1).
    train_labels = torch.tensor([0, 1, 2] * 4)
    test_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    test_features = axis_features([0, 0, 1, 0, 1, 1])
    fb = balance.feature_balance(axis_features(train_labels), train_labels, test_features,
                                 test_labels, 3, STAGE2, seed=0, sigma=0.5)
    assert fb["images_per_class"] == 4
    assert fb["class_accuracy"] == [1.0, 0.5, 0.0]
    assert fb["top1"] == pytest.approx(50.0)
    # beta = (3 + 2 (e^{-0.25/0.5} + e^{-1/0.5} + e^{-0.25/0.5})) / 9
    expected = (3 + 2 * (2 * math.exp(-0.5) + math.exp(-2.0))) / 9
    assert fb["beta"] == pytest.approx(expected, rel=1e-12) and fb["sigma"] == 0.5
    # population sd of (1, 0.5, 0): sqrt((0.25 + 0 + 0.25) / 3) = 0.408248 -> 40.82 points
    assert fb["class_std"] == pytest.approx(100 * math.sqrt(1 / 6), rel=1e-12)
    assert (fb["worst_class_accuracy"], fb["worst_class"]) == (0.0, 2)
    assert fb["mean_class_accuracy"] == pytest.approx(50.0)


def test_the_protocol_needs_a_balanced_split():
    labels = torch.tensor([0, 0, 1, 2, 2, 1, 0])
    with pytest.raises(DataError, match=r"same number of images of every one of the 3 classes, "
                                        r"it holds \[3, 2, 2\] per class"):
        balance.feature_balance(axis_features(labels), labels, axis_features([0]),
                                torch.tensor([0]), 3, STAGE2, seed=0)
    with pytest.raises(DataError, match=r"holds \[2, 2, 0\]"):
        balance.check_balanced(torch.tensor([0, 1, 0, 1]), 3)
    with pytest.raises(DataError, match="fewer than one batch of 4"):
        balance.fit_linear_classifier(axis_features([0, 1, 2]), torch.tensor([0, 1, 2]), 3,
                                      STAGE2, seed=0)


def test_fit_linear_classifier_is_deterministic_and_follows_the_batch_order():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 5, generator=g)
    labels = torch.arange(40) % 3
    a = balance.fit_linear_classifier(features, labels, 3, STAGE2, seed=4)
    b = balance.fit_linear_classifier(features, labels, 3, STAGE2, seed=4)
    c = balance.fit_linear_classifier(features, labels, 3, STAGE2, seed=4, class_balanced=False)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)  # another batch order, another classifier
    predictions = balance.predict_classes(a, features, batch_size=7)
    assert predictions.dtype == torch.int64 and predictions.shape == (40,)
    assert torch.equal(predictions, a(features).argmax(1))


def test_accuracy_spread_hand_computed():
    # (0.9, 0.6, None, 0.6): beta over the 3 present classes at sigma 0.1, pairs differing by
    # 0.3 contribute e^{-0.9}: (3 + 4 e^{-0.9} + 2) / 9; sd of (0.9, 0.6, 0.6) about 0.7:
    # sqrt((0.04 + 0.01 + 0.01) / 3); worst 60 % (class 1, the first of the tie).
    s = balance.accuracy_spread([0.9, 0.6, None, 0.6], sigma=0.1)
    assert s["beta"] == pytest.approx((5 + 4 * math.exp(-0.9)) / 9, rel=1e-12)
    assert s["class_std"] == pytest.approx(100 * math.sqrt(0.06 / 3), rel=1e-12)
    assert (s["worst_class_accuracy"], s["worst_class"]) == (pytest.approx(60.0), 1)
    assert s["mean_class_accuracy"] == pytest.approx(70.0)
    with pytest.raises(DataError, match="no class has an accuracy"):
        balance.accuracy_spread([None, float("nan")])


def test_difficulty_control_hand_computed():
    reference = balance.mean_class_accuracy([[0.9, 0.8, 0.5, 0.0], [0.7, 0.8, 0.6, 0.0]])
    assert reference == pytest.approx([0.8, 0.8, 0.55, 0.0])
    relative = balance.relative_accuracy([0.4, 0.8, 0.44, 0.3], reference)
    # 0.4 / 0.8, 0.8 / 0.8, 0.44 / 0.55; a reference of 0 gives no ratio
    assert relative[:3] == pytest.approx([0.5, 1.0, 0.8]) and relative[3] is None
    assert balance.group_mean(relative, [0, 2, 3]) == pytest.approx(0.65)
    assert balance.group_mean(relative, [3]) is None
    # hardest first; the tie 0.8 / 0.8 goes by class index
    assert balance.difficulty_ranking(reference) == [3, 2, 0, 1]
    with pytest.raises(DataError, match="every class needs a reference"):
        balance.difficulty_ranking([0.5, None])
    with pytest.raises(DataError, match="2 class accuracies against a reference of 3"):
        balance.relative_accuracy([0.1, 0.2], [0.1, 0.2, 0.3])


def test_balanced_counts_keep_the_total():
    assert balance.balanced_counts(2478, 10) == [248] * 8 + [247] * 2
    assert sum(balance.balanced_counts(2478, 10)) == 2478
    assert balance.balanced_counts(30, 3) == [10, 10, 10]
    with pytest.raises(DataError, match="cannot hold 10 classes"):
        balance.balanced_counts(9, 10)


def test_a_run_reports_feature_balance_and_saves_its_features(tmp_path):
    """data.balanced_per_class adds the β protocol to report.json; the stage-2 report from the
    cached test features is the one a run without them computes, bit for bit."""
    import json

    import train
    from config import load_config
    from _harness import make_fashion_idx, tiny_config

    root = make_fashion_idx(str(tmp_path / "fm"))
    base = tiny_config(root, stage1={"loss": "ce", "epochs": 1}, stage2={"epochs": 2},
                       data={"max_per_class": 30})  # 10 of 40 images per class held out
    plain = train.train(load_config(base=base), str(tmp_path / "plain"))
    cfg = load_config(base=base, overrides=["data.balanced_per_class=5",
                                            "eval.save_features=true", "eval.plot=false"])
    report = train.train(cfg, str(tmp_path / "balanced"))
    for key in ("top1", "many", "medium", "few", "beta", "class_accuracy"):
        assert report[key] == plain[key], key
    fb = json.loads((tmp_path / "balanced" / "report.json").read_text())["feature_balance"]
    assert fb["images_per_class"] == 5 and len(fb["class_accuracy"]) == 10
    assert fb["beta"] == pytest.approx(balance.accuracy_spread(fb["class_accuracy"])["beta"])
    assert not (tmp_path / "balanced" / "per_class.png").exists()
    saved = torch.load(tmp_path / "balanced" / "features.pt", weights_only=True)
    assert saved["train_features"].shape == (len(saved["train_labels"]), 16)  # 4 x width 4
    assert torch.bincount(saved["balanced_labels"]).tolist() == [5] * 10
    assert saved["test_features"].shape[0] == 40 and saved["train_counts"] == \
        report["train_counts"]
    # The saved features give the stage-2 classifier's predictions again.
    state = torch.load(tmp_path / "balanced" / "checkpoint.pt", weights_only=False)
    classifier = torch.nn.Linear(16, 10)
    classifier.load_state_dict(state["classifier"])
    predictions = balance.predict_classes(classifier, saved["test_features"], 64)
    assert (predictions == saved["test_labels"]).double().mean().item() * 100 == \
        pytest.approx(report["top1"])
