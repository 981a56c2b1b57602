"""Stage 2 and evaluation: a linear classifier on a frozen backbone, features, predictions.

- `LinearProbe`: the classifier (N(0, init_std^2) weights, zero bias, seeded), its SGD
  optimiser, its batch order (instance-balanced, or class-balanced with `class_cycling_batches`)
  and its training step; under torch.distributed the classifier is wrapped in
  DistributedDataParallel, each process training on its slice of every global batch.
- `extract_features` / `predict`: backbone features and classifier predictions of a whole data
  set, each process computing a contiguous shard, gathered on every process.
- `evaluate`: predictions of the test set turned into the long-tailed report (metrics.evaluate).

The backbone stays in eval mode (BatchNorm uses its running statistics): under the linear
protocol nothing of the pre-trained model changes.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcl_ext import distributed as kdist
import data as kdata
import metrics as kmetrics
from schedule import lr_at, set_lr


class LinearProbe:
    """The stage-2 classifier, its optimiser and batch order."""

    def __init__(self, feature_dim: int, num_classes: int, stage2: dict, seed: int,
                 device: torch.device, distributed: bool | None = None):
        """`distributed` (default: whether a process group is up) wraps the classifier in
        DistributedDataParallel; False trains it in this process alone (every process then
        trains the same classifier on the same full batches)."""
        self.stage2, self.seed, self.device = stage2, seed, device
        self.classifier = nn.Linear(feature_dim, num_classes).to(device)
        g = torch.Generator().manual_seed(kdata.derive_seed(seed, 0x57A6E2))
        with torch.no_grad():
            self.classifier.weight.copy_(torch.randn(self.classifier.weight.shape, generator=g)
                                         * stage2.init_std)
            self.classifier.bias.zero_()
        self.module = self.classifier
        if kdist.is_distributed() if distributed is None else distributed:
            self.module = nn.parallel.DistributedDataParallel(
                self.classifier, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=stage2.lr,
                                         momentum=stage2.momentum,
                                         weight_decay=stage2.weight_decay)

    def state_dict(self) -> dict:
        return {"classifier": self.classifier.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.classifier.load_state_dict(state["classifier"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def epoch_batches(self, labels: torch.Tensor, epoch: int) -> list[list[int]]:
        """The global batches of an epoch: cRT's class-cycling order (`class_balanced`), or a
        shuffle of the training set."""
        s2 = self.stage2
        if s2.class_balanced:
            return kdata.class_cycling_batches(labels, s2.batch_size, self.seed, epoch,
                                               s2.samples_per_class)
        return kdata.shuffled_batches(labels.numel(), s2.batch_size, self.seed,
                                      10_000 + epoch)

    def train_epoch(self, source, epoch: int, after_step=None) -> tuple[torch.Tensor, int, float]:
        """One epoch of the classifier (stage 2, and every classifier on cached features):
        the learning rate of `epoch`, then a step per (features, labels) batch of `source`,
        `after_step(loss, lr)` after each. Returns (the loss sum on the device, steps, lr)."""
        lr = lr_at(self.stage2, epoch)
        set_lr(self.optimizer, lr)
        loss_sum, steps = torch.zeros((), device=self.device), 0
        for features, labels in source:
            loss = self.step(features, labels.to(self.device, non_blocking=True))
            loss_sum += loss
            steps += 1
            if after_step is not None:
                after_step(loss, lr)
        return loss_sum, steps, lr

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One SGD step on a local batch of features; returns the loss (no host sync)."""
        self.classifier.train()
        loss = F.cross_entropy(self.module(features.float()), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batches):
    """(features, labels) of each batch of row indices, from features cached on the device: one
    copy of all the indices to the device, then no host sync per step."""
    rows = torch.as_tensor(batches, dtype=torch.int64).to(features.device) if batches else []
    labels = labels.to(features.device)
    return ((features[index], labels[index]) for index in rows)


def _sharded(views, fn, *, batch_size: int, device: torch.device, pool: kdata.LoaderPool,
             name: str, normalize, out_dtype: torch.dtype, progress=None) -> torch.Tensor:
    """fn(normalised images) over this process's shard of `views`, gathered over processes."""
    total = len(views)
    start, stop = kdist.shard_range(total, kdist.rank(), kdist.world_size())
    batches = [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    loader = pool.get(name, views, batches, epoch=0)
    meter = progress.epoch(name, len(batches), batch_size * kdist.world_size()) \
        if progress is not None else None
    outputs = []
    for images, *_ in (meter.wrap(loader) if meter is not None else loader):
        outputs.append(fn(normalize(images.to(device, non_blocking=True))).to(out_dtype))
        if meter is not None:
            meter.step()
    if meter is not None:
        meter.finish()
    local = torch.cat(outputs) if outputs else None
    if local is None:  # an empty shard (more processes than images): shape from a probe batch
        shape = fn(normalize(torch.stack([views[(0, 0)][0]]).to(device))).shape[1:]
        local = torch.empty((0, *shape), dtype=out_dtype, device=device)
    return kdist.all_gather_padded(local, total)


@torch.no_grad()
def extract_features(backbone: nn.Module, views: kdata.SeededViews, *, batch_size: int,
                     device: torch.device, pool: kdata.LoaderPool, name: str, normalize,
                     autocast=contextlib.nullcontext, progress=None) -> torch.Tensor:
    """Backbone features (float32 [N, D], on `device`) of every view of `views`, eval mode."""
    backbone.eval()

    def fn(images):
        with autocast():
            return backbone(images)

    return _sharded(views, fn, batch_size=batch_size, device=device, pool=pool, name=name,
                    normalize=normalize, out_dtype=torch.float32, progress=progress)


@torch.no_grad()
def predict(backbone: nn.Module, classifier: nn.Module, views: kdata.SeededViews, *,
            batch_size: int, device: torch.device, pool: kdata.LoaderPool, name: str, normalize,
            autocast=contextlib.nullcontext, progress=None) -> torch.Tensor:
    """Class predictions (int64 [N], on the CPU) of every view of `views`."""
    backbone.eval()
    classifier.eval()

    def fn(images):
        with autocast():
            features = backbone(images)
        return classifier(features.float()).argmax(1)

    return _sharded(views, fn, batch_size=batch_size, device=device, pool=pool, name=name,
                    normalize=normalize, out_dtype=torch.int64, progress=progress).cpu()


def evaluate(predictions: torch.Tensor, labels: torch.Tensor, train_counts, eval_cfg: dict) -> dict:
    return kmetrics.evaluate(predictions, labels, train_counts,
                             many_threshold=eval_cfg.many_threshold,
                             few_threshold=eval_cfg.few_threshold, sigma=eval_cfg.sigma)
