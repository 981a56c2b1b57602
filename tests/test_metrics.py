"""Long-tailed metrics against hand-computed cases."""
import json
import math

import pytest
import torch

import _harness  # noqa: F401  (the recipe on sys.path)

import metrics


def test_balancedness_hand_computed():
    # a = [1, 0]: pairs (i, j) contribute 1, e^{-1/s}, e^{-1/s}, 1.
    for sigma in (1.0, 0.1):
        expected = (2 + 2 * math.exp(-1 / sigma)) / 4
        assert metrics.balancedness([1.0, 0.0], sigma) == pytest.approx(expected, rel=1e-12)
    # a = [0.5, 0.7, 0.9], sigma = 0.1: differences 0.2, 0.4, 0.2.
    e = lambda d: math.exp(-d * d / 0.1)  # noqa: E731
    expected = (3 + 2 * (e(0.2) + e(0.4) + e(0.2))) / 9
    assert metrics.balancedness([0.5, 0.7, 0.9], 0.1) == pytest.approx(expected, rel=1e-12)


def test_balancedness_is_one_only_when_balanced_and_ignores_missing_classes():
    assert metrics.balancedness([0.3, 0.3, 0.3]) == 1.0
    assert metrics.balancedness([0.3, float("nan"), 0.3]) == 1.0
    assert metrics.balancedness([0.3, 0.31]) < 1.0
    with pytest.raises(ValueError, match="sigma must be a positive finite"):
        metrics.balancedness([0.1], sigma=0.0)


def test_shot_groups_boundaries_default_and_configurable():
    counts = [500, 101, 100, 20, 19, 5]
    assert metrics.shot_groups(counts) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    # BalFeat's convention puts 20 into Few.
    assert metrics.shot_groups(counts, 100, 21)["few"] == [3, 4, 5]
    with pytest.raises(ValueError, match="few_threshold"):
        metrics.shot_groups(counts, 10, 20)


def test_evaluate_hand_computed_shot_accuracies():
    train_counts = [200, 150, 50, 10]          # Many: 0, 1; Medium: 2; Few: 3
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    preds = torch.tensor([0, 0, 1, 0, 2, 1, 2, 3, 0, 3])
    # class accuracies: 1.0, 0.5, 0.5, 0.5
    r = metrics.evaluate(preds, labels, train_counts, sigma=0.5)
    assert r["class_accuracy"] == [1.0, 0.5, 0.5, 0.5]
    assert r["top1"] == pytest.approx(60.0)  # 6 of 10 test images
    assert r["many"] == pytest.approx(75.0)
    assert r["medium"] == pytest.approx(50.0)
    assert r["few"] == pytest.approx(50.0)
    e = math.exp(-0.25 / 0.5)
    assert r["beta"] == pytest.approx((4 + 6 * e + 6 * 1.0) / 16)


def test_evaluate_empty_group_is_none():
    r = metrics.evaluate(torch.tensor([0, 1]), torch.tensor([0, 1]), [500, 300])
    assert r["few"] is None and r["medium"] is None and r["many"] == 100.0


def test_plot_and_json(tmp_path):
    r = metrics.evaluate(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), [300, 50, 5])
    png = tmp_path / "per_class.png"
    metrics.plot_per_class(r, str(png), "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics.write_json(r, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["few"] == 50.0
    table = metrics.format_table({"x": r})
    assert "| x | 100.0 | 100.0 | 50.0 | 75.0 |" in table


def test_compare_aggregates_seeds(tmp_path, capsys):
    import compare

    def report(seed, few, beta):
        path = tmp_path / f"r{seed}.json"
        path.write_text(json.dumps({
            "seed": seed, "many": 80.0, "medium": 60.0 + seed, "few": few, "top1": 70.0,
            "beta": beta, "sigma": 0.1,
            "thresholds": {"many": "> 100", "medium": "20..100", "few": "< 20"}}))
        return str(path)

    paths = [report(0, 10.0, 0.5), report(1, 20.0, 0.7)]
    out = tmp_path / "table.md"
    assert compare.main([f"KCL={','.join(paths)}", "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "| KCL (seed 0) | 80.0 | 60.0 | 10.0 | 70.0 | 0.500 |" in text
    assert "| KCL, mean ± std over 2 seeds | 80.0 ± 0.0 | 60.5 ± 0.5 | 15.0 ± 5.0 | 70.0 ± 0.0 | 0.600 ± 0.100 |" in text
