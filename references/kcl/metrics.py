"""Long-tailed evaluation: top-1, shot groups, balancedness, the per-class plot and the report.

Shot groups are defined by the number of TRAINING images of a class (`many_threshold`,
`few_threshold`): Many > 100, Medium 20..100, Few < 20 by default (the classifier-balancing and
PaCo convention; BalFeat's own code puts 20 into Few, pass few_threshold=21 for that).

Balancedness (the paper's eq. 3): beta = 1/C^2 sum_{i,j} exp(-|a_i - a_j|^2 / sigma), where a_j
is the accuracy of class j as a FRACTION in [0, 1]. The paper does not publish sigma; the default
here is sigma = 0.1 (then two classes 10 points apart contribute exp(-0.1) = 0.905 and a 0 vs
100 % pair contributes exp(-10) = 4.5e-5). beta = 1 iff all classes are equally accurate.
"""
from __future__ import annotations

import json
import math
import os

import torch

DEFAULT_SIGMA = 0.1


def confusion_counts(predictions: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct per class, total per class) as int64 [C]."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {list(predictions.shape)} and labels "
                         f"{list(labels.shape)} must have the same shape")
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes)
    total = torch.bincount(labels, minlength=num_classes)
    return correct[:num_classes], total[:num_classes]


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """Accuracy of each class as a fraction (float64 [C]); NaN for a class absent from labels."""
    correct, total = confusion_counts(predictions, labels, num_classes)
    acc = correct.double() / total.double()
    return torch.where(total > 0, acc, torch.full_like(acc, float("nan")))


def shot_groups(train_counts, many_threshold: int = 100, few_threshold: int = 20) -> dict:
    """Class indices of Many (> many_threshold), Medium, Few (< few_threshold) training images."""
    if few_threshold > many_threshold + 1:
        raise ValueError(f"few_threshold ({few_threshold}) must be <= many_threshold + 1 "
                         f"({many_threshold + 1})")
    counts = [int(c) for c in train_counts]
    return {
        "many": [c for c, n in enumerate(counts) if n > many_threshold],
        "medium": [c for c, n in enumerate(counts) if few_threshold <= n <= many_threshold],
        "few": [c for c, n in enumerate(counts) if n < few_threshold],
    }


def balancedness(class_accuracy, sigma: float = DEFAULT_SIGMA) -> float:
    """beta of eq. 3 over the classes with a defined accuracy (fractions in [0, 1])."""
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"balancedness: sigma must be a positive finite number, got {sigma}")
    acc = torch.as_tensor(class_accuracy, dtype=torch.float64)
    acc = acc[~torch.isnan(acc)]
    if acc.numel() == 0:
        return float("nan")
    diff = acc[:, None] - acc[None, :]
    return float(torch.exp(-diff.pow(2) / sigma).mean())


def evaluate(predictions: torch.Tensor, labels: torch.Tensor, train_counts, *,
             many_threshold: int = 100, few_threshold: int = 20,
             sigma: float = DEFAULT_SIGMA) -> dict:
    """Top-1 (over test images) and the mean class accuracy of each shot group, in percent, beta,
    and the per-class accuracies (fractions)."""
    num_classes = len(train_counts)
    acc = per_class_accuracy(predictions, labels, num_classes)
    groups = shot_groups(train_counts, many_threshold, few_threshold)

    def group_mean(classes):
        values = acc[classes] if classes else torch.empty(0, dtype=torch.float64)
        values = values[~torch.isnan(values)]
        return float(values.mean() * 100) if values.numel() else None

    return {
        "top1": float((predictions == labels).double().mean() * 100) if labels.numel() else None,
        "many": group_mean(groups["many"]),
        "medium": group_mean(groups["medium"]),
        "few": group_mean(groups["few"]),
        "beta": balancedness(acc, sigma),
        "sigma": sigma,
        "thresholds": {"many": f"> {many_threshold}",
                       "medium": f"{few_threshold}..{many_threshold}",
                       "few": f"< {few_threshold}"},
        "groups": groups,
        "train_counts": [int(c) for c in train_counts],
        "class_accuracy": [None if math.isnan(a) else a for a in acc.tolist()],
    }


def plot_per_class(report: dict, path: str, title: str = "") -> None:
    """Bar plot of class accuracy, classes sorted by training-set size (largest first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = report["train_counts"]
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    acc = [(report["class_accuracy"][c] or 0.0) * 100 for c in order]
    colours = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    group_of = {c: g for g, members in report["groups"].items() for c in members}
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.35 * len(order), 20.0)), 3.5))
    ax.bar(range(len(order)), acc, color=[colours[group_of[c]] for c in order], width=0.85)
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), [f"{c}\n({counts[c]})" for c in order], fontsize=7)
    ax.set_xlabel("class (training images), sorted by training-set size")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"{title}  top-1 {report['top1']:.1f}  beta {report['beta']:.3f}".strip())
    handles = [plt.Rectangle((0, 0), 1, 1, color=v) for v in colours.values()]
    ax.legend(handles, list(colours), loc="upper center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(report: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def format_table(rows: dict) -> str:
    """Markdown table of Many / Medium / Few / All and beta for {name: report}."""
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| run | Many | Medium | Few | All | beta |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {cell(r['many'], '.1f')} | {cell(r['medium'], '.1f')} | "
                     f"{cell(r['few'], '.1f')} | {cell(r['top1'], '.1f')} | "
                     f"{cell(r['beta'], '.3f')} |")
    return "\n".join(lines)
