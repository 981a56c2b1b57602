"""Two-stage KCL training: stage 1 learns the backbone, stage 2 a linear classifier on it.

    python references/kcl/train.py --config configs/fmnist_lt_kcl.yaml --out runs/kcl
    torchrun --nproc-per-node 8 references/kcl/train.py --config configs/imagenet_lt_kcl_r50.yaml
    python references/kcl/train.py --out runs/kcl --evaluate best     (evaluate-only)

Stage 1 trains `kcl_ext.KCL` (loss kcl, fcl = k -1, moco = k 0) or a supervised CE model; or it
is loaded from a finished run (`--stage1 RUN`). Stage 2 trains a linear classifier on the frozen
backbone. The test set is then evaluated: top-1, Many / Medium / Few, beta, a per-class plot and
report.json. Under torchrun each process loads its slice of every global batch (DDP, gloo on
CPU, NCCL on GPU). The loops below read top to bottom: `train` calls `warm_up_bank`,
`train_one_epoch` (stage 1), `train_classifier` (stage 2) and `final_evaluation`; everything a
resumed run needs is in `Run.position` and the checkpoint. docs/training.md describes the whole.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import kcl_ext
from kcl_ext import distributed as kdist
from kcl_ext.kcl import batch_norm_buffers, has_batch_norm, use_split_batch_norm

import balance as kbalance
import checkpoint as ckpt
import data as kdata
import metrics as kmetrics
import probe as kprobe
import provenance
from config import NEUTRAL_KEYS, Config, differences, dump, format_differences, load_config
from datasets import DataBundle, build_data
from errors import ConfigError, OutputError, TrainingError, run_command
from logs import MetricsLog, Progress
from models import ContrastiveEncoder, SupervisedClassifier, build_backbone
from schedule import lr_at, set_lr

LOSS_K = {"fcl": -1, "moco": 0}  # kcl takes stage1.k; ce is not contrastive

# Called after every optimiser step with the Run (None: nothing). The kill/resume test sets it to
# kill the process at a chosen step.
after_step_hook = None


@dataclass
class Position:
    """Where a run is: the next thing to do is (stage, epoch, step within epoch)."""

    stage: str = "stage1"  # stage1 | stage2 | done
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    warmed_up: bool = False
    best: dict | None = None


@dataclass
class Run:
    """What the loops work on: the config, the data, the model and its optimiser, the logs."""

    cfg: Config
    out_dir: str | None
    device: torch.device
    data: DataBundle
    model: nn.Module                # kcl_ext.KCL, or SupervisedClassifier for ce
    backbone: nn.Module
    ddp: nn.Module                  # the model, under DistributedDataParallel when distributed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    pool: kdata.LoaderPool
    normalize: kdata.Normalize
    log: MetricsLog
    progress: Progress
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    bn_buffers: list = field(default_factory=list)  # averaged over processes after each step
    probe: kprobe.LinearProbe | None = None
    position: Position = field(default_factory=Position)
    stage1_from: str | None = None

    @property
    def contrastive(self) -> bool:
        return self.cfg.stage1.loss != "ce"

    @property
    def main(self) -> bool:
        return kdist.is_main()


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------
def pick_device(cfg: Config) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device is 'cuda', but torch.cuda.is_available() is False: "
                              "set device: cpu (or auto)")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def check_batch_sizes(cfg: Config, images: int, world: int) -> None:
    for name in ("stage1", "stage2"):
        stage = getattr(cfg, name)
        if stage.batch_size % world:
            raise ConfigError(f"{name}.batch_size {stage.batch_size} must be divisible "
                              f"by the number of processes {world}")
        if stage.epochs and images < stage.batch_size:
            raise ConfigError(f"{name}.batch_size {stage.batch_size} exceeds the {images} "
                              f"training images")


def bn_groups(cfg: Config, backbone: nn.Module, world: int) -> int:
    """BN groups of each process's batch in stage 1 (model.bn_splits over the processes)."""
    splits = cfg.model.bn_splits
    if splits == 1 or not has_batch_norm(backbone):
        return 1
    if splits % world:
        raise ConfigError(f"model.bn_splits ({splits}) must be 1 or a multiple of the number "
                          f"of processes ({world}): it is the number of BN groups per "
                          f"global batch, each process holding bn_splits / processes")
    if cfg.stage1.batch_size % splits:
        raise ConfigError(f"stage1.batch_size ({cfg.stage1.batch_size}) must be divisible by "
                          f"model.bn_splits ({splits}): each BN group holds batch_size / "
                          f"bn_splits images")
    return splits // world


def build_model(cfg: Config, channels: int, num_classes: int, world: int,
                progress: Progress) -> tuple[nn.Module, nn.Module]:
    """(model, backbone): kcl_ext.KCL over the backbone and projection head, or the CE model."""
    m, s1 = cfg.model, cfg.stage1
    backbone = build_backbone(m.arch, channels, m.width, m.blocks, m.norm, m.stem_stride)
    groups = bn_groups(cfg, backbone, world)
    if s1.loss == "ce":
        if groups > 1:  # split-BN too, so that CE and KCL see the same BN groups
            use_split_batch_norm(backbone, groups)
        return SupervisedClassifier(backbone, num_classes), backbone
    model = kcl_ext.KCL(ContrastiveEncoder(backbone, m.dim, m.mlp_head), m.dim,
                        k=LOSS_K.get(s1.loss, s1.k), temperature=s1.temperature,
                        queue_size=s1.queue_size, momentum=m.momentum, shuffle_bn=m.shuffle_bn,
                        bn_splits=groups, backend=s1.backend)
    if model.shuffle_bn and groups * world == 1 and "model.shuffle_bn" in cfg.user_keys:
        progress.note("note: model.shuffle_bn has no effect with one BatchNorm group (one "
                      "process, model.bn_splits 1); set model.bn_splits >= 2 so that a key is "
                      "not normalised with its own query")
    return model, backbone


def distributed_data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP that leaves buffers alone in forward (the BN statistics are averaged after each step
    instead). torch >= 2.13 calls that forward_sync_buffers=False and deprecates
    broadcast_buffers, which is all torch 2.11 and 2.12 know."""
    device_ids = [device.index] if device.type == "cuda" else None
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in parameters else \
        "broadcast_buffers"
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **{option: False})


def setup(cfg: Config, out_dir: str | None) -> Run:
    """Seeds, joins the process group torchrun describes, builds data, model and optimiser."""
    device = pick_device(cfg)
    kdist.init_from_env(device.type)
    world, main = kdist.world_size(), kdist.is_main()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    progress = Progress(cfg.progress, enabled=main)
    data = build_data(cfg)
    check_batch_sizes(cfg, len(data.train), world)
    model, backbone = build_model(cfg, data.channels, data.num_classes, world, progress)
    model.to(device)
    channels_last = cuda and cfg.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    trainable = model.query_encoder if isinstance(model, kcl_ext.KCL) else model
    if cfg.compile:
        for module in ((model.query_encoder, model.key_encoder)
                       if isinstance(model, kcl_ext.KCL) else (model,)):
            module.compile()
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
    s1 = cfg.stage1
    return Run(
        cfg=cfg, out_dir=out_dir, device=device, data=data, model=model, backbone=backbone,
        ddp=distributed_data_parallel(model, device) if world > 1 else model,
        optimizer=torch.optim.SGD(trainable.parameters(), lr=s1.lr, momentum=s1.momentum,
                                  weight_decay=s1.weight_decay),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        pool=kdata.LoaderPool(cfg.data.num_workers, pin_memory=cuda and cfg.data.pin_memory,
                              prefetch_factor=cfg.data.prefetch_factor, seed=cfg.seed),
        normalize=kdata.Normalize(data.mean, data.std, channels_last),
        log=MetricsLog(out_dir, main, cfg.tensorboard), progress=progress,
        amp_dtype=amp_dtype, channels_last=channels_last,
        # Under DDP every process averages the BN running statistics after each step, so that
        # they are the mean over all BN groups, as split-BN makes them in one process.
        bn_buffers=batch_norm_buffers(model) if world > 1 else [],
        position=Position(stage="stage2" if s1.checkpoint else "stage1"))


def autocast(run: Run):
    if run.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=run.amp_dtype)


def to_device(run: Run, images: torch.Tensor) -> torch.Tensor:
    return run.normalize(images.to(run.device, non_blocking=True))


def classifier(run: Run) -> kprobe.LinearProbe:
    """The stage-2 classifier (built on first use)."""
    if run.probe is None:
        run.probe = kprobe.LinearProbe(run.backbone.feature_dim, run.data.num_classes,
                                       run.cfg.stage2, run.cfg.seed, run.device)
    return run.probe


def train_labels(run: Run) -> torch.Tensor:
    return torch.as_tensor(run.data.train.labels)


def train_counts(run: Run) -> list[int]:
    return torch.bincount(train_labels(run), minlength=run.data.num_classes).tolist()


def local_batches(run: Run, batches) -> list[list[int]]:
    return [kdata.local_part(b, kdist.rank(), kdist.world_size()) for b in batches]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_state(run: Run) -> dict:
    state = {
        "position": asdict(run.position),
        "model": run.model.state_dict(),  # with KCL: the encoders and the bank
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": ckpt.rng_state(),
        "metrics_offset": run.log.offset(),
        "config": run.cfg.to_dict(),
        "stage1_from": run.stage1_from,
    }
    if run.probe is not None:
        state["classifier"] = run.probe.classifier.state_dict()
        state["optimizer2"] = run.probe.optimizer.state_dict()
    return state


def save_checkpoint(run: Run) -> None:
    state = checkpoint_state(run)  # every process computes it (RNG), the main one writes
    if run.main and run.out_dir is not None:
        ckpt.atomic_save(state, os.path.join(run.out_dir, ckpt.LAST))
    kdist.barrier()


def save_stage1(run: Run) -> None:
    if run.main and run.out_dir is not None:
        ckpt.atomic_save({"kind": "stage1", "model": run.model.state_dict(),
                          "config": run.cfg.to_dict(), "stage1_from": run.stage1_from},
                         os.path.join(run.out_dir, ckpt.STAGE1))
    kdist.barrier()


def load_checkpoint(run: Run, path: str) -> None:
    state = ckpt.load(path)
    diffs = differences(state["config"], run.cfg)
    hard = [d for d in diffs if d[0] not in NEUTRAL_KEYS]
    if hard:
        raise OutputError(
            f"--resume: this config differs from the one {path} was trained with, in keys "
            f"that change results:\n{format_differences(hard, 'checkpoint', 'now')}\n"
            f"Resume with the run's own config ({os.path.dirname(path)}/config.yaml), or "
            f"start afresh with --overwrite (or another --out).")
    if diffs and run.main:
        run.progress.note("resuming with changed settings that do not affect results:\n"
                          + format_differences(diffs, "checkpoint", "now"))
    run.position = Position(**state["position"])
    run.stage1_from = state.get("stage1_from")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if "classifier" in state:
        probe = classifier(run)
        probe.classifier.load_state_dict(state["classifier"])
        probe.optimizer.load_state_dict(state["optimizer2"])
    ckpt.set_rng_state(state["rng"])
    run.log.truncate(state["metrics_offset"])


def load_stage1(run: Run, path: str) -> None:
    """Takes the model of a finished stage 1 (stage1.pt, a run folder, or a checkpoint.pt past
    stage 1) and starts at stage 2."""
    path = ckpt.resolve(path, ckpt.STAGE1)
    state = ckpt.load(path, "stage-1 checkpoint (stage1.checkpoint)")
    if state.get("kind") != "stage1" and \
            state.get("position", {}).get("stage") not in ("stage2", "done"):
        raise TrainingError(f"{path} does not hold a finished stage 1 (give a run's "
                            f"stage1.pt or its folder)")
    saved = dict(state["config"])
    saved["stage1"] = {**saved["stage1"], "checkpoint": run.cfg.stage1.checkpoint}
    diffs = [d for d in differences(saved, run.cfg, keys=("model", "stage1"))
             if d[0] not in NEUTRAL_KEYS]
    if diffs:
        raise ConfigError(f"the model and stage1 sections must be those of the stage-1 run "
                          f"{path}; they differ in:\n"
                          f"{format_differences(diffs, 'stage-1 run', 'this config')}")
    run.model.load_state_dict(state["model"])
    run.stage1_from = os.path.abspath(path)
    run.position.stage = "stage2"


# ----------------------------------------------------------------------------------------------
# Bookkeeping shared by both stages
# ----------------------------------------------------------------------------------------------
def check_finite(run: Run, stage: str, loss: float | None, lr: float) -> None:
    """Stops a diverged run (checked where the loss is read anyway: every log_interval steps and
    at the end of each epoch) instead of training on NaN weights."""
    if loss is not None and not math.isfinite(loss):
        raise TrainingError(
            f"the {stage} loss is {loss} at epoch {run.position.epoch + 1}, step "
            f"{run.position.global_step}: training diverged (learning rate {lr:g}); lower "
            f"{stage}.lr. The last checkpoint holds the state before this epoch.")


def step_done(run: Run, stage: str, loss: torch.Tensor, lr: float, meter) -> None:
    """After each training step: log the loss (one host sync per log_interval steps), advance the
    meter and the position, checkpoint every checkpoint_every_steps."""
    pos = run.position
    if pos.global_step % run.cfg.log_interval == 0:
        value = float(kdist.mean_over_processes(loss))
        check_finite(run, stage, value, lr)
        run.log.write({"stage": stage, "epoch": pos.epoch, "step": pos.global_step,
                       "loss": value, "lr": lr})
    meter.step()
    pos.step_in_epoch += 1
    pos.global_step += 1
    every = run.cfg.checkpoint_every_steps
    if every and pos.global_step % every == 0:
        save_checkpoint(run)
    if after_step_hook is not None:
        after_step_hook(run)


def epoch_done(run: Run, stage: str, loss_sum: torch.Tensor, steps: int, lr: float,
               meter) -> None:
    """After each epoch: the mean loss over every process (one host sync), the progress line,
    the finiteness check and the timing record."""
    mean_loss = float(kdist.mean_over_processes(loss_sum)) / steps if steps else None
    stats = meter.finish(loss=mean_loss, lr=lr)
    check_finite(run, stage, mean_loss, lr)
    run.log.write_timing({"stage": stage, "epoch": run.position.epoch, **stats},
                         run.position.global_step)


def next_epoch(run: Run, epochs: int, next_stage: str) -> None:
    """Moves the position past the epoch (to the next stage after the last one; stage 1 then
    writes stage1.pt) and writes the checkpoint."""
    pos = run.position
    pos.epoch += 1
    pos.step_in_epoch = 0
    if pos.epoch >= epochs:
        if pos.stage == "stage1":
            save_stage1(run)
        pos.stage, pos.epoch = next_stage, 0
    save_checkpoint(run)


# ----------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------
def stage1_views(run: Run) -> kdata.SeededViews:
    return kdata.SeededViews(run.data.train, run.data.train_transform,
                             2 if run.contrastive else 1, run.cfg.seed)


def shuffle_generator(cfg: Config, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(kdata.derive_seed(cfg.seed, step, 0xB4))


def warm_up_bank(run: Run) -> None:
    """Fills the bank before epoch 0 with the keys of ceil(size / batch) batches, without
    momentum updates, as the official code does (it takes size // batch batches and requires
    size to be a multiple of batch; both agree then)."""
    s1, bank = run.cfg.stage1, run.model.bank
    views = stage1_views(run)
    needed = math.ceil(bank.size / s1.batch_size)
    batches = []
    while len(batches) < needed:  # a bank larger than the data set takes several passes
        batches += kdata.shuffled_batches(len(views), s1.batch_size, run.cfg.seed,
                                          -1 - len(batches))
    batches = local_batches(run, batches[:needed])
    run.model.train()
    loader = run.pool.get("stage1", views, batches, epoch=-1)
    meter = run.progress.epoch("bank warm-up", len(batches), s1.batch_size)
    for step, (_, view_k, labels, _) in enumerate(meter.wrap(loader)):
        with torch.no_grad(), autocast(run):
            keys = run.model.encode_keys(to_device(run, view_k), shuffle_generator(run.cfg,
                                                                                   -1 - step))
        bank.enqueue(keys, labels.to(run.device, non_blocking=True))
        if run.bn_buffers:
            kdist.average_in_place(run.bn_buffers)
        meter.step()
    meter.finish()
    run.position.warmed_up = True


def train_step(run: Run, item) -> torch.Tensor:
    """One optimiser step on a loader item; returns the loss (on the device, no host sync)."""
    labels = item[-2].to(run.device, non_blocking=True)
    step = run.position.global_step
    if run.contrastive:
        # The positives' seed is a function of the step and the process, not of RNG state.
        with autocast(run):
            loss = run.ddp(to_device(run, item[0]), to_device(run, item[1]), labels,
                           seed=kdata.derive_seed(run.cfg.seed, step, kdist.rank(), 0xC0),
                           shuffle_generator=shuffle_generator(run.cfg, step))
    else:
        with autocast(run):
            logits = run.ddp(to_device(run, item[0]))
        loss = F.cross_entropy(logits.float(), labels)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.bn_buffers:
        kdist.average_in_place(run.bn_buffers)
    return loss.detach()


def train_one_epoch(run: Run) -> None:
    """One stage-1 epoch (from the step a resumed run stopped at)."""
    s1, pos = run.cfg.stage1, run.position
    views = stage1_views(run)
    batches = kdata.shuffled_batches(len(views), s1.batch_size, run.cfg.seed, pos.epoch)
    todo = local_batches(run, batches[pos.step_in_epoch:])
    lr = lr_at(s1, pos.epoch)
    set_lr(run.optimizer, lr)
    run.model.train()
    loader = run.pool.get("stage1", views, todo, epoch=pos.epoch)
    meter = run.progress.epoch(f"stage 1 ({s1.loss}) epoch {pos.epoch + 1}/{s1.epochs}",
                               len(todo), s1.batch_size, epochs_left=s1.epochs - pos.epoch - 1)
    loss_sum, steps = torch.zeros((), device=run.device), 0
    for item in meter.wrap(loader):
        loss = train_step(run, item)
        loss_sum += loss
        steps += 1
        step_done(run, "stage1", loss, lr, meter)
    epoch_done(run, "stage1", loss_sum, steps, lr, meter)
    next_epoch(run, s1.epochs, "stage2")


# ----------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------
def eval_views(run: Run, dataset) -> kdata.SeededViews:
    return kdata.SeededViews(dataset, run.data.eval_transform, 1, run.cfg.seed)


def sharded_options(run: Run, name: str) -> dict:
    return {"batch_size": run.cfg.eval.batch_size, "device": run.device, "pool": run.pool,
            "name": name, "normalize": run.normalize, "autocast": lambda: autocast(run),
            "progress": run.progress}


def features_of(run: Run, dataset, name: str) -> torch.Tensor:
    return kprobe.extract_features(run.backbone, eval_views(run, dataset),
                                   **sharded_options(run, f"{name} features"))


@torch.no_grad()
def backbone_features(run: Run, images: torch.Tensor) -> torch.Tensor:
    with autocast(run):
        return run.backbone(to_device(run, images)).float()


def train_classifier(run: Run, cached: torch.Tensor | None) -> None:
    """One stage-2 epoch of the linear classifier on the frozen backbone: on the cached training
    features (`stage2.augment: false`), else on augmented images through the backbone."""
    s2, pos = run.cfg.stage2, run.position
    probe = classifier(run)
    batches = probe.epoch_batches(train_labels(run), pos.epoch)
    todo = local_batches(run, batches[pos.step_in_epoch:])
    run.backbone.eval()
    meter = run.progress.epoch(f"stage 2 epoch {pos.epoch + 1}/{s2.epochs}", len(todo),
                               s2.batch_size, epochs_left=s2.epochs - pos.epoch - 1)
    # The meter times the wait for data: the loader's batches, not the backbone's forward.
    if cached is not None:
        source = meter.wrap(kprobe.cached_batches(cached, train_labels(run), todo))
    else:
        views = kdata.SeededViews(run.data.train, run.data.train_transform, 1, run.cfg.seed)
        loader = run.pool.get("stage2", views, todo, epoch=10_000 + pos.epoch)
        source = ((backbone_features(run, images), labels)
                  for images, labels, _ in meter.wrap(loader))
    loss_sum, steps, lr = probe.train_epoch(
        source, pos.epoch,
        after_step=lambda loss, lr: step_done(run, "stage2", loss, lr, meter))
    epoch_done(run, "stage2", loss_sum, steps, lr, meter)
    every = run.cfg.eval.every_epochs
    if every and (pos.epoch + 1) % every == 0:
        periodic_evaluation(run)
    next_epoch(run, s2.epochs, "done")


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def evaluate(run: Run, split: str, features: torch.Tensor | None = None) -> dict:
    """The long-tailed report of the current classifier on `split` (val or test); from the
    split's cached backbone `features` when given (the same predictions, bit for bit)."""
    dataset = run.data.val if split == "val" else run.data.test
    linear = classifier(run).classifier
    if features is not None:
        predictions = kbalance.predict_classes(linear, features, run.cfg.eval.batch_size)
    else:
        predictions = kprobe.predict(run.backbone, linear, eval_views(run, dataset),
                                     **sharded_options(run, f"evaluation ({split})"))
    report = kprobe.evaluate(predictions, torch.as_tensor(dataset.labels), train_counts(run),
                             run.cfg.eval)
    report.update(loss=run.cfg.stage1.loss, seed=run.cfg.seed, evaluated_on=split)
    return report


def periodic_evaluation(run: Run) -> None:
    """Evaluates after a stage-2 epoch (on the val split when there is one, else on the test
    set) and keeps the best classifier in best.pt."""
    split = "val" if run.data.val is not None else "test"
    report = evaluate(run, split)
    pos = run.position
    done = pos.epoch + 1
    run.log.write({"stage": "stage2_eval", "epoch": done, "step": pos.global_step,
                   "split": split, **{k: report[k] for k in
                                      ("top1", "many", "medium", "few", "beta")}})
    if pos.best is None or report["top1"] > pos.best["top1"]:
        pos.best = {"epoch": done, "top1": report["top1"], "split": split}
        if run.main and run.out_dir is not None:
            ckpt.atomic_save({"kind": "best", "classifier": run.probe.classifier.state_dict(),
                              "backbone": run.backbone.state_dict(),
                              "config": run.cfg.to_dict(), **pos.best},
                             os.path.join(run.out_dir, ckpt.BEST))
        kdist.barrier()


def final_evaluation(run: Run) -> dict:
    """The test-set report of the stage-2 classifier; with a balanced split (data.balanced_*)
    also `feature_balance`, the beta protocol on the backbone's features (balance.py); with
    eval.save_features the features of every split in features.pt."""
    e, data = run.cfg.eval, run.data
    if data.balanced is None and not e.save_features:
        report = evaluate(run, "test")
        run.pool.close()
        return report
    for p in run.backbone.parameters():
        p.requires_grad_(False)
    features = {"test": features_of(run, data.test, "test")}
    report = evaluate(run, "test", features["test"])
    if data.balanced is not None:
        features["balanced"] = features_of(run, data.balanced, "balanced")
        report["feature_balance"] = kbalance.feature_balance(
            features["balanced"], torch.as_tensor(data.balanced.labels), features["test"],
            torch.as_tensor(data.test.labels), data.num_classes, run.cfg.stage2, run.cfg.seed,
            e.sigma, e.batch_size)
    if e.save_features:
        features["train"] = features_of(run, data.train, "train")
        if run.main:
            ckpt.atomic_save({
                "num_classes": data.num_classes, "train_counts": train_counts(run),
                **{f"{name}_features": f.cpu() for name, f in features.items()},
                **{f"{name}_labels": torch.as_tensor(getattr(data, name).labels)
                   for name in features}}, os.path.join(run.out_dir, ckpt.FEATURES))
        kdist.barrier()
    run.pool.close()
    return report


def write_report(run: Run, report: dict, name: str) -> None:
    report["provenance"] = provenance.describe(run.device, kdist.world_size())
    report["stage1_from"] = run.stage1_from
    report["best"] = run.position.best
    kmetrics.write_json(report, os.path.join(run.out_dir, name))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def train(cfg: Config, out_dir: str, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Trains both stages and evaluates; returns the report on the main process (None
    elsewhere)."""
    run = setup(cfg, out_dir)
    ckpt.check_output_folder(out_dir, resume, overwrite)
    kdist.barrier()  # every process has looked before the main one writes
    path = os.path.join(out_dir, ckpt.LAST)
    if resume and os.path.exists(path):
        load_checkpoint(run, path)
    else:
        if cfg.stage1.checkpoint:
            load_stage1(run, cfg.stage1.checkpoint)
        if run.main:
            ckpt.clear_outputs(out_dir)
            with open(os.path.join(out_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(dump(cfg))
        kdist.barrier()
    run.log.open_tensorboard()
    started = time.time()
    pos = run.position
    if pos.stage == "stage1" and cfg.stage1.epochs == 0:
        save_stage1(run)
        pos.stage = "stage2"
    if pos.stage == "stage1" and run.contrastive and not pos.warmed_up:
        warm_up_bank(run)
    while pos.stage == "stage1":
        train_one_epoch(run)
    run.pool.close()
    if pos.stage == "stage2" and cfg.stage2.epochs == 0:
        pos.stage = "done"
    classifier(run)
    if pos.stage == "stage2":
        for p in run.backbone.parameters():
            p.requires_grad_(False)
        cached = None if cfg.stage2.augment else features_of(run, run.data.train, "train")
        while pos.stage == "stage2":
            train_classifier(run, cached)
    report = final_evaluation(run)
    report["train_seconds_this_process"] = round(time.time() - started, 1)
    if run.main:
        write_report(run, report, "report.json")
        if cfg.eval.plot:
            kmetrics.plot_per_class(report, os.path.join(out_dir, "per_class.png"),
                                    title=cfg.stage1.loss)
        run.log.write({"stage": "eval", **{k: report[k] for k in
                                           ("top1", "many", "medium", "few", "beta")}},
                      step=pos.global_step)
    run.log.close()
    kdist.barrier()
    return report if run.main else None


def saved_classifier(out_dir: str, which: str) -> tuple[str, dict]:
    """(which, checkpoint) of `--evaluate best|last`. A run without periodic evaluation
    (eval.every_epochs 0) has no best.pt: `best` is then the last classifier, with a note."""
    if which not in ("best", "last"):
        raise TrainingError(f"--evaluate must be 'best' or 'last', got {which!r}")
    best = os.path.join(out_dir, ckpt.BEST)
    if which == "best" and not os.path.exists(best) and \
            os.path.exists(os.path.join(out_dir, ckpt.LAST)):
        if kdist.is_main():
            print(f"note: {out_dir} has no {ckpt.BEST} (it is written by the periodic "
                  f"evaluations of eval.every_epochs, 0 in this run): evaluating the last "
                  f"classifier (checkpoint.pt) instead", file=sys.stderr)
        which = "last"
    if which == "best":
        return which, ckpt.load(best, "best checkpoint")
    state = ckpt.load(os.path.join(out_dir, ckpt.LAST))
    if "classifier" not in state:
        raise TrainingError(f"{out_dir}/{ckpt.LAST} has no stage-2 classifier yet (the run is "
                            f"in {state['position']['stage']})")
    return which, state


def evaluate_saved(out_dir: str, which: str, overrides=()) -> dict | None:
    """Evaluate-only: the test set with the classifier of best.pt or checkpoint.pt, with the
    run's own config (and `overrides`); writes report_<which>.json. Returns the report on the
    main process."""
    which, state = saved_classifier(out_dir, which)
    cfg = load_config(base=state["config"], overrides=list(overrides) + ["stage1.checkpoint=null"])
    run = setup(cfg, out_dir)
    if which == "best":
        run.backbone.load_state_dict(state["backbone"])
        run.position.best = {k: state[k] for k in ("epoch", "top1", "split")}
    else:
        run.model.load_state_dict(state["model"])
        run.position.best = state["position"].get("best")
    classifier(run).classifier.load_state_dict(state["classifier"])
    report = evaluate(run, "test")
    run.pool.close()
    report["checkpoint"] = which
    if run.main:
        write_report(run, report, f"report_{which}.json")
    kdist.barrier()
    return report if run.main else None


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (as given, or relative to references/kcl/, e.g. "
                                    "configs/fmnist_lt_kcl.yaml); keys not given keep defaults")
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in OUT from its checkpoint.pt (a fresh start when "
                           "there is none); the config must be the run's, apart from settings "
                           "that cannot change results (num_workers, progress, ...)")
    mode.add_argument("--overwrite", action="store_true",
                      help="start afresh in a non-empty OUT, replacing the outputs of the run "
                           "there")
    mode.add_argument("--evaluate", choices=("best", "last"), metavar="best|last",
                      help="evaluate-only: the classifier of OUT's best.pt (the best periodic "
                           "evaluation; the last classifier when there is none) or "
                           "checkpoint.pt on the test set, with the run's own config and --set "
                           "changes; writes OUT/report_<which>.json")
    p.add_argument("--stage1", metavar="RUN",
                   help="skip stage 1: take the backbone of a finished stage 1 (a run folder or "
                        "its stage1.pt) and train only the stage-2 classifier "
                        "(sets stage1.checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.epochs=3 (repeatable)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.evaluate:
            if not args.out:
                raise TrainingError("--evaluate needs --out, the run folder")
            report = evaluate_saved(args.out, args.evaluate, args.overrides)
            name = f"report_{report['checkpoint']}.json" if report else ""
            title = f"({args.evaluate})"
        else:
            overrides = list(args.overrides)
            if args.stage1:
                overrides.append(f"stage1.checkpoint={os.path.abspath(args.stage1)}")
            cfg = load_config(args.config, overrides)
            args.out = args.out or os.path.join(
                "runs", os.path.splitext(os.path.basename(args.config or "default"))[0])
            report = train(cfg, args.out, args.resume, overwrite=args.overwrite)
            name, title = "report.json", f"(seed {cfg.seed})"
        if report is not None:
            print(kmetrics.format_table({f"{report['loss']} {title}": report}))
            print(f"report: {os.path.join(args.out, name)}")
    finally:
        if kdist.is_distributed():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "train.py"))
