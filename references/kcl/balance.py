"""How balanced a feature space is (the paper's β protocol) and the difficulty control, on cached
features: no backbone is trained or run here.

- `feature_balance`: the β protocol. A linear classifier is trained on the features of a
  BALANCED split (the same number of images of every class) and evaluated on the test set; its
  class accuracies a_c give β (eq. 3) and the σ-free spread: the standard deviation of the class
  accuracies and the worst class. Trained on balanced data, the classifier has no reason to
  favour a class, so what it shows is how separable each class is in the feature space (the
  official loss study trains it on the full, balanced ImageNet). A classifier trained on the
  long-tailed set (stage 2) measures its own head-class bias as well.
- `relative_accuracy` and `difficulty_ranking`: the difficulty control. A class's accuracy
  divided by its accuracy under a reference model trained on a balanced set of the same total
  size (`balanced_counts`) says how much the class lost to its place in the long tail, apart
  from how hard it is; the ranking (hardest first) is what the study's class orderings are
  built from.
- `fit_linear_classifier` / `predict_classes`: the stage-2 classifier (`probe.LinearProbe`,
  its initialisation, batch order and schedule) trained on a feature tensor in this process.

Works for any data set with a balanced split: Fashion-MNIST-LT's held-out images
(`data.balanced_per_class`) or a split list (`data.balanced_list`, e.g. ImageNet-LT's val list,
20 images per class). docs/training.md, "Feature balance and the difficulty control".
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

import metrics as kmetrics
from errors import DataError, TrainingError
from probe import LinearProbe, cached_batches


def check_balanced(labels: torch.Tensor, num_classes: int, what: str = "balanced split") -> int:
    """The number of images per class of a balanced split; DataError unless every class of
    0..num_classes-1 has the same, non-zero number."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).tolist()
    if len(counts) > num_classes:
        raise DataError(f"the {what} has labels outside [0, {num_classes})")
    if min(counts) == 0 or len(set(counts)) != 1:
        shown = counts if num_classes <= 20 else f"{min(counts)}..{max(counts)}"
        raise DataError(f"the {what} must hold the same number of images of every one of the "
                        f"{num_classes} classes, it holds {shown} per class")
    return counts[0]


def balanced_counts(total: int, num_classes: int) -> list[int]:
    """Class sizes of a balanced set of exactly `total` images: total // C each, the first
    total % C classes one more."""
    if total < num_classes:
        raise DataError(f"a balanced set of {total} images cannot hold {num_classes} classes")
    base, extra = divmod(int(total), num_classes)
    return [base + 1 if c < extra else base for c in range(num_classes)]


def fit_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          stage2, seed: int, class_balanced: bool | None = None
                          ) -> nn.Linear:
    """A linear classifier trained as stage 2 trains it (`stage2`: lr, epochs, schedule, batch,
    momentum, weight decay, init; `class_balanced` overrides the config's batch order) on
    features [N, D] with labels [N], in this process. Deterministic for given inputs."""
    options = stage2 if class_balanced is None else \
        dataclasses.replace(stage2, class_balanced=class_balanced)
    labels = torch.as_tensor(labels).to(features.device)
    if features.dim() != 2 or features.size(0) != labels.numel():
        raise DataError(f"fit_linear_classifier: features must be [N, D] with one label per "
                        f"row, got {list(features.shape)} and {labels.numel()} labels")
    if features.size(0) < options.batch_size:
        raise DataError(f"fit_linear_classifier: {features.size(0)} feature rows are fewer "
                        f"than one batch of {options.batch_size} (stage2.batch_size)")
    probe = LinearProbe(features.size(1), num_classes, options, seed, features.device,
                        distributed=False)
    cpu_labels = labels.cpu()
    for epoch in range(options.epochs):
        batches = probe.epoch_batches(cpu_labels, epoch)
        loss_sum, _, lr = probe.train_epoch(cached_batches(features, labels, batches), epoch)
        if not math.isfinite(float(loss_sum)):
            raise TrainingError(f"the linear classifier diverged at epoch {epoch + 1} "
                                f"(learning rate {lr:g}); lower stage2.lr")
    probe.classifier.eval()
    return probe.classifier


@torch.no_grad()
def predict_classes(classifier: nn.Module, features: torch.Tensor,
                    batch_size: int = 256) -> torch.Tensor:
    """argmax of the classifier (int64 [N], on the CPU), `batch_size` rows at a time (the rows
    of `probe.predict`'s batches, so that both give the same bits)."""
    classifier.eval()
    out = [classifier(features[i:i + batch_size].float()).argmax(1)
           for i in range(0, features.size(0), batch_size)]
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.int64)


def accuracy_spread(class_accuracy, sigma: float = kmetrics.DEFAULT_SIGMA) -> dict:
    """β (eq. 3) and the σ-free spread of class accuracies given as fractions (NaN/None =
    class absent): `class_std` (population standard deviation over the classes: they are all
    the classes, not a sample) and `worst_class_accuracy`, both in percentage points, and which
    class is worst."""
    acc = torch.tensor([math.nan if a is None else float(a) for a in class_accuracy],
                       dtype=torch.float64)
    present = ~torch.isnan(acc)
    if not bool(present.any()):
        raise DataError("accuracy_spread: no class has an accuracy")
    values = acc[present]
    mean = float(values.mean())
    std = math.sqrt(float(((values - mean) ** 2).mean()))
    worst = int(torch.where(present, acc, torch.full_like(acc, math.inf)).argmin())
    return {"beta": kmetrics.balancedness(acc, sigma), "sigma": sigma,
            "class_std": 100.0 * std, "worst_class_accuracy": 100.0 * float(acc[worst]),
            "worst_class": worst, "mean_class_accuracy": 100.0 * mean}


def feature_balance(train_features: torch.Tensor, train_labels: torch.Tensor,
                    test_features: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                    stage2, seed: int, sigma: float = kmetrics.DEFAULT_SIGMA,
                    batch_size: int = 256) -> dict:
    """The β protocol: a linear classifier trained (as `fit_linear_classifier`) on the features
    of a balanced split, evaluated on the test features; its top-1, class accuracies
    (fractions), β at `sigma` and the σ-free spread (`accuracy_spread`)."""
    per_class = check_balanced(train_labels, num_classes)
    classifier = fit_linear_classifier(train_features, train_labels, num_classes, stage2, seed,
                                       class_balanced=False)
    predictions = predict_classes(classifier, test_features, batch_size)
    test_labels = torch.as_tensor(test_labels).cpu()
    acc = kmetrics.per_class_accuracy(predictions, test_labels, num_classes)
    return {
        "protocol": f"linear classifier on the frozen features of a balanced split "
                    f"({per_class} images per class), evaluated on the test set",
        "images_per_class": per_class,
        "top1": float((predictions == test_labels).double().mean() * 100),
        "class_accuracy": [None if math.isnan(a) else a for a in acc.tolist()],
        **accuracy_spread(acc.tolist(), sigma),
    }


def relative_accuracy(class_accuracy, reference_accuracy) -> list[float | None]:
    """a_c / r_c for every class: its accuracy relative to a reference model's accuracy on it
    (None where either is missing or the reference is 0)."""
    a, r = list(class_accuracy), list(reference_accuracy)
    if len(a) != len(r):
        raise DataError(f"relative_accuracy: {len(a)} class accuracies against a reference of "
                        f"{len(r)} classes")
    return [None if x is None or y is None or math.isnan(x) or math.isnan(y) or y == 0
            else x / y for x, y in zip(a, r)]


def group_mean(values, classes) -> float | None:
    """Mean of values[c] over `classes` (missing values skipped; None if none is left)."""
    chosen = [values[c] for c in classes if values[c] is not None and not math.isnan(values[c])]
    return math.fsum(chosen) / len(chosen) if chosen else None


def mean_class_accuracy(reports_accuracy) -> list[float | None]:
    """Class-wise mean of several runs' class accuracies (e.g. the reference over its seeds)."""
    runs = [list(r) for r in reports_accuracy]
    if not runs or len({len(r) for r in runs}) != 1:
        raise DataError("mean_class_accuracy: needs runs with the same number of classes")
    out = []
    for values in zip(*runs):
        present = [v for v in values if v is not None and not math.isnan(v)]
        out.append(math.fsum(present) / len(present) if present else None)
    return out


def difficulty_ranking(reference_accuracy) -> list[int]:
    """Classes from the hardest (lowest reference accuracy) to the easiest; ties by class
    index. Classes without a reference accuracy are an error."""
    acc = list(reference_accuracy)
    if any(a is None or math.isnan(a) for a in acc):
        raise DataError("difficulty_ranking: every class needs a reference accuracy")
    return sorted(range(len(acc)), key=lambda c: (acc[c], c))
