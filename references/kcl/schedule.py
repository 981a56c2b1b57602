"""Learning-rate schedules, set once per epoch as MoCo and the official KCL code do."""
from __future__ import annotations

import math


def lr_at(stage: dict, epoch: int) -> float:
    """The learning rate of `epoch` for a stage config: `cosine` from `lr` to 0 over `epochs`
    (no warm-up, as the official code), or `step` (x `gamma` at each of `milestones`)."""
    if stage.schedule == "cosine":
        return stage.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, stage.epochs)))
    drops = sum(1 for m in stage.milestones if epoch >= m)
    return stage.lr * stage.gamma ** drops


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
