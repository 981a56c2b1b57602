"""The two-stage trainer: stage 1 learns the backbone, stage 2 a linear classifier on it.

Stage 1 trains with `kcl`, `fcl`, `moco` (kcl_ext.kpos_loss against a MemoryBank, MoCo query
and momentum key encoders, shuffle-BN) or `ce` (supervised cross-entropy); or it is loaded from
a finished run (`stage1.checkpoint`). Stage 2 is `probe.LinearProbe` on the frozen backbone.
The test set is then evaluated: top-1, Many / Medium / Few, beta, a per-class plot and
report.json. Under torchrun each process loads its slice of every global batch (DDP, gloo on
CPU, NCCL on GPU). docs/training.md describes the whole.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as kdist
from ..memory_bank import MemoryBank
from . import balance as kbalance
from . import checkpoint as ckpt
from . import data as kdata
from . import datacheck
from . import metrics as kmetrics
from . import probe as kprobe
from . import provenance
from .config import NEUTRAL_KEYS, differences, dump, format_differences
from .errors import ConfigError, DataError, OutputError, TrainingError
from .logs import MetricsLog, Progress
from .models import (ContrastiveEncoder, MomentumPair, SupervisedClassifier, batch_norm_buffers,
                     build_backbone, has_batch_norm, use_split_batch_norm)
from .schedule import lr_at, set_lr


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass
class DataBundle:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset
    train_transform: object
    eval_transform: object
    num_classes: int
    mean: tuple
    std: tuple
    channels: int
    balanced: torch.utils.data.Dataset | None = None  # the β protocol's balanced split


def _check_labels(dataset, list_file: str, num_classes: int) -> None:
    top = int(dataset.labels.max())
    if top >= num_classes:
        raise DataError(f"{list_file}: label {top} is outside [0, {num_classes}) "
                        f"(data.num_classes = {num_classes})")


def build_data(cfg: dict) -> DataBundle:
    """The data sets and transforms a config names."""
    d = cfg["data"]
    size = d["image_size"]
    val = balanced = None
    if d["kind"] == "fashion_mnist_lt":
        fm = kdata.fashion_mnist_lt(d["root"], d["imbalance_factor"], d["max_per_class"],
                                    d["test_per_class"], d["subset_seed"], d["class_order"],
                                    d["class_counts"], d["balanced_per_class"])
        train, test, balanced = fm.train, fm.test, fm.balanced
        mean, std, num_classes, channels = kdata.FASHION_MNIST_MEAN, kdata.FASHION_MNIST_STD, 10, 1
        crop_fraction = 1.0
    elif d["kind"] == "split_list":
        train = kdata.SplitListImages(d["train_list"], d["image_root"], d["check_files"])
        test = kdata.SplitListImages(d["test_list"], d["image_root"], d["check_files"])
        if d["val_list"]:
            val = kdata.SplitListImages(d["val_list"], d["image_root"], d["check_files"])
        if d["balanced_list"]:
            balanced = kdata.SplitListImages(d["balanced_list"], d["image_root"],
                                             d["check_files"])
        sets = [("train", train), ("test", test)] + ([("val", val)] if val is not None else [])
        extra = [("balanced", balanced)] if balanced is not None else []
        num_classes = d["num_classes"] or \
            int(max(int(s.labels.max()) for _, s in sets + extra)) + 1
        for split, dataset in sets:
            _check_labels(dataset, dataset.list_file, num_classes)
            datacheck.check_counts_or_raise(dataset.list_file, dataset.labels, d["dataset"],
                                            split)
        if balanced is not None:  # any balanced list (ImageNet-LT's val list is one)
            _check_labels(balanced, balanced.list_file, num_classes)
            kbalance.check_balanced(balanced.labels, num_classes,
                                    f"balanced split {balanced.list_file} (data.balanced_list)")
        if d["dataset"] == "inat2018":
            mean, std = kdata.INAT2018_MEAN, kdata.INAT2018_STD
        else:
            mean, std = kdata.IMAGENET_MEAN, kdata.IMAGENET_STD
        channels, crop_fraction = 3, 0.875
    else:  # synthetic
        num_classes, channels = d["num_classes"], d["synthetic_channels"]
        source = d["synthetic_source_size"] or int(round(size / 0.875))
        train = kdata.SyntheticImages(d["synthetic_images"], num_classes, source, channels,
                                      cfg["seed"])
        test = kdata.SyntheticImages(max(num_classes, d["synthetic_images"] // 8), num_classes,
                                     source, channels, cfg["seed"] + 1)
        mean, std = (kdata.FASHION_MNIST_MEAN, kdata.FASHION_MNIST_STD) if channels == 1 else \
            (kdata.IMAGENET_MEAN, kdata.IMAGENET_STD)
        crop_fraction = 0.875
    if d["mean"] is not None:
        mean, std = tuple(d["mean"]), tuple(d["std"])
    if len(mean) != channels:
        raise ConfigError(f"data.mean/data.std have {len(mean)} values, the images have "
                          f"{channels} channels")
    return DataBundle(train, val, test, kdata.RandomResizedCropFlip(size, d["crop_scale"]),
                      kdata.ResizeCenterCrop(size, crop_fraction), num_classes, mean, std,
                      channels, balanced)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    """One run: `Trainer(cfg, out_dir).run()`. `out_dir=None` writes nothing (throughput)."""

    def __init__(self, cfg: dict, out_dir: str | None, stop_at_step: int | None = None):
        self.cfg, self.out_dir, self.stop_at_step = cfg, out_dir, stop_at_step
        self.device = self._device()
        kdist.init_from_env(self.device.type)
        self.rank, self.world = kdist.rank(), kdist.world_size()
        self.main = kdist.is_main()
        if cfg["threads"]:
            torch.set_num_threads(int(cfg["threads"]))
        seed = cfg["seed"]
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"]
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"]) \
            if cuda else None
        self.channels_last = cuda and cfg["channels_last"]
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
        self.log = MetricsLog(out_dir, self.main, cfg["tensorboard"])
        self.progress = Progress(cfg["progress"], enabled=self.main)

        self.data = build_data(cfg)
        self.num_classes = self.data.num_classes
        self.train_labels = torch.as_tensor(self.data.train.labels)
        self.train_labels_device = self.train_labels.to(self.device)
        self.train_counts = torch.bincount(self.train_labels, minlength=self.num_classes).tolist()
        self._check_batch_sizes()

        m, s1 = cfg["model"], cfg["stage1"]
        backbone = build_backbone(m["arch"], self.data.channels, m["width"], m["blocks"],
                                  m["norm"], m["stem_stride"])
        local_groups = self._bn_groups(backbone)
        if local_groups > 1:
            use_split_batch_norm(backbone, local_groups)
        self.contrastive = s1["loss"] != "ce"
        if self.contrastive:
            self.model = MomentumPair(ContrastiveEncoder(backbone, m["dim"], m["mlp_head"]),
                                      m["momentum"], m["shuffle_bn"]).to(self.device)
            self.trainable = self.model.query_encoder
            self.bank = MemoryBank(s1["queue_size"], m["dim"]).to(self.device)
            self.k = {"kcl": s1["k"], "fcl": -1, "moco": 0}[s1["loss"]]
            if self.model.shuffle_bn and local_groups * self.world == 1 and self.main:
                self.progress.note("note: model.shuffle_bn has no effect with one BatchNorm "
                                   "group (one process, model.bn_splits 1); set model.bn_splits "
                                   ">= 2 so that a key is not normalised with its own query")
        else:
            self.model = SupervisedClassifier(backbone, self.num_classes).to(self.device)
            self.trainable = self.model
            self.bank = None
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Under DDP every process averages the BN running statistics after each step, so that
        # they are the mean over all BN groups, as split-BN makes them in one process.
        self.bn_buffers = batch_norm_buffers(self.model) if self.world > 1 else []
        if cfg["compile"]:
            for module in ((self.model.query_encoder, self.model.key_encoder)
                           if self.contrastive else (self.model,)):
                module.compile()
        self.ddp = self.trainable
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.trainable, device_ids=[self.device.index] if cuda else None,
                broadcast_buffers=False)
        self.optimizer = torch.optim.SGD(self.trainable.parameters(), lr=s1["lr"],
                                         momentum=s1["momentum"],
                                         weight_decay=s1["weight_decay"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.backbone = backbone
        self.probe: kprobe.LinearProbe | None = None

        d = cfg["data"]
        self.pool = kdata.LoaderPool(d["num_workers"], pin_memory=cuda and d["pin_memory"],
                                     prefetch_factor=d["prefetch_factor"], seed=seed)
        self.normalize = kdata.Normalize(self.data.mean, self.data.std, self.channels_last)
        self.stage1_views = kdata.SeededViews(self.data.train, self.data.train_transform,
                                              2 if self.contrastive else 1, seed)
        # Position: the next thing to do is (stage, epoch, step within epoch).
        self.stage, self.epoch, self.step_in_epoch, self.global_step = "stage1", 0, 0, 0
        self.warmed_up = False
        self.best: dict | None = None
        self.stage1_from = None
        if s1["checkpoint"]:  # loaded by run() unless a resumed checkpoint supersedes it
            self.stage = "stage2"

    # ------------------------------------------------------------------ set-up checks
    def _device(self) -> torch.device:
        want = self.cfg["device"]
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

    def _check_batch_sizes(self) -> None:
        n = len(self.data.train)
        for name in ("stage1", "stage2"):
            stage = self.cfg[name]
            if stage["batch_size"] % self.world:
                raise ConfigError(f"{name}.batch_size {stage['batch_size']} must be divisible "
                                  f"by the number of processes {self.world}")
            if stage["epochs"] and n < stage["batch_size"]:
                raise ConfigError(f"{name}.batch_size {stage['batch_size']} exceeds the {n} "
                                  f"training images")

    def _bn_groups(self, backbone: nn.Module) -> int:
        """BN groups of each process's batch in stage 1 (model.bn_splits over the processes)."""
        splits = self.cfg["model"]["bn_splits"]
        if splits == 1 or not has_batch_norm(backbone):
            return 1
        if splits % self.world:
            raise ConfigError(f"model.bn_splits ({splits}) must be 1 or a multiple of the number "
                              f"of processes ({self.world}): it is the number of BN groups per "
                              f"global batch, each process holding bn_splits / processes")
        batch = self.cfg["stage1"]["batch_size"]
        if batch % splits:
            raise ConfigError(f"stage1.batch_size ({batch}) must be divisible by model.bn_splits "
                              f"({splits}): each BN group holds batch_size / bn_splits images")
        return splits // self.world

    def _load_stage1(self, path: str) -> None:
        """Takes the model of a finished stage 1 (stage1.pt, a run folder, or a checkpoint.pt
        past stage 1) and starts at stage 2."""
        path = ckpt.resolve(path, ckpt.STAGE1)
        state = ckpt.load(path, "stage-1 checkpoint (stage1.checkpoint)")
        if state.get("kind") != "stage1" and \
                state.get("position", {}).get("stage") not in ("stage2", "done"):
            raise TrainingError(f"{path} does not hold a finished stage 1 (give a run's "
                                f"stage1.pt or its folder)")
        saved = dict(state["config"])
        saved["stage1"] = {**saved["stage1"], "checkpoint": self.cfg["stage1"]["checkpoint"]}
        diffs = [d for d in differences(saved, self.cfg, keys=("model", "stage1"))
                 if d[0] not in NEUTRAL_KEYS]
        if diffs:
            raise ConfigError(f"the model and stage1 sections must be those of the stage-1 run "
                              f"{path}; they differ in:\n"
                              f"{format_differences(diffs, 'stage-1 run', 'this config')}")
        self.model.load_state_dict(state["model"])
        self.stage1_from = os.path.abspath(path)
        self.stage = "stage2"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(images.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ checkpoints
    def _build_probe(self) -> kprobe.LinearProbe:
        if self.probe is None:
            self.probe = kprobe.LinearProbe(self.backbone.feature_dim, self.num_classes,
                                            self.cfg["stage2"], self.cfg["seed"], self.device)
        return self.probe

    def state_dict(self) -> dict:
        state = {
            "position": {"stage": self.stage, "epoch": self.epoch,
                         "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                         "warmed_up": self.warmed_up, "best": self.best},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "rng": ckpt.rng_state(),
            "metrics_offset": self.log.offset(),
            "config": self.cfg,
            "stage1_from": self.stage1_from,
        }
        if self.probe is not None:
            probe_state = self.probe.state_dict()
            state["classifier"], state["optimizer2"] = \
                probe_state["classifier"], probe_state["optimizer"]
        return state

    def save(self) -> None:
        state = self.state_dict()  # every process computes it (RNG), the main one writes
        if self.main and self.out_dir is not None:
            ckpt.atomic_save(state, os.path.join(self.out_dir, ckpt.LAST))
        kdist.barrier()

    def _save_stage1(self) -> None:
        if self.main and self.out_dir is not None:
            ckpt.atomic_save({"kind": "stage1", "model": self.model.state_dict(),
                              "config": self.cfg, "stage1_from": self.stage1_from},
                             os.path.join(self.out_dir, ckpt.STAGE1))
        kdist.barrier()

    def load(self, path: str) -> None:
        state = ckpt.load(path)
        diffs = differences(state["config"], self.cfg)
        hard = [d for d in diffs if d[0] not in NEUTRAL_KEYS]
        if hard:
            raise OutputError(
                f"--resume: this config differs from the one {path} was trained with, in keys "
                f"that change results:\n{format_differences(hard, 'checkpoint', 'now')}\n"
                f"Resume with the run's own config ({os.path.dirname(path)}/config.yaml), or "
                f"start afresh with --overwrite (or another --out).")
        if diffs and self.main:
            self.progress.note("resuming with changed settings that do not affect results:\n"
                               + format_differences(diffs, "checkpoint", "now"))
        pos = state["position"]
        self.stage, self.epoch = pos["stage"], pos["epoch"]
        self.step_in_epoch, self.global_step = pos["step_in_epoch"], pos["global_step"]
        self.warmed_up, self.best = pos["warmed_up"], pos.get("best")
        self.stage1_from = state.get("stage1_from")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        if "classifier" in state:
            self._build_probe().load_state_dict({"classifier": state["classifier"],
                                                 "optimizer": state["optimizer2"]})
        ckpt.set_rng_state(state["rng"])
        self.log.truncate(state["metrics_offset"])

    def _after_step(self) -> None:
        self.step_in_epoch += 1
        self.global_step += 1
        every = self.cfg["checkpoint_every_steps"]
        if every and self.global_step % every == 0:
            self.save()
        if self.stop_at_step is not None and self.global_step == self.stop_at_step:
            # A real kill, at a chosen step: no checkpoint, no clean-up, no flushing.
            os.kill(os.getpid(), signal.SIGKILL)

    def _end_epoch(self, epochs: int, next_stage: str) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        if self.epoch >= epochs:
            if self.stage == "stage1":
                self._save_stage1()
            self.stage, self.epoch = next_stage, 0
        self.save()

    def _log_loss(self, stage: str, loss: torch.Tensor, lr: float) -> None:
        # One host sync (and one all-reduce) per log_interval steps, none in between.
        if self.global_step % self.cfg["log_interval"] == 0:
            value = float(kdist.mean_over_processes(loss))
            self._check_finite(stage, value, lr)
            self.log.write({"stage": stage, "epoch": self.epoch, "step": self.global_step,
                            "loss": value, "lr": lr})

    def _check_finite(self, stage: str, loss: float | None, lr: float) -> None:
        """Stops a diverged run (checked where the loss is read anyway: every log_interval steps
        and at the end of each epoch) instead of training on NaN weights."""
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(
                f"the {stage} loss is {loss} at epoch {self.epoch + 1}, step {self.global_step}: "
                f"training diverged (learning rate {lr:g}); lower {stage}.lr. The last "
                f"checkpoint holds the state before this epoch.")

    # ------------------------------------------------------------------ stage 1
    def _shuffle_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(kdata.derive_seed(self.cfg["seed"], step, 0xB4))

    def warm_up_bank(self) -> None:
        """Fills the bank before epoch 0 with the keys of ceil(size / batch) batches, without
        momentum updates, as the official code does (it takes size // batch batches and
        requires size to be a multiple of batch; both agree then)."""
        s1 = self.cfg["stage1"]
        needed = math.ceil(self.bank.size / s1["batch_size"])
        batches = []
        while len(batches) < needed:  # a bank larger than the data set takes several passes
            batches += kdata.shuffled_batches(len(self.stage1_views), s1["batch_size"],
                                              self.cfg["seed"], -1 - len(batches))
        batches = [kdata.local_part(b, self.rank, self.world) for b in batches[:needed]]
        self.model.train()
        loader = self.pool.get("stage1", self.stage1_views, batches, epoch=-1)
        meter = self.progress.epoch("bank warm-up", len(batches), s1["batch_size"])
        for step, (_, view_k, labels, _) in enumerate(meter.wrap(loader)):
            with torch.no_grad(), self.autocast():
                keys = self.model.encode_keys(self._to_device(view_k),
                                              self._shuffle_generator(-1 - step))
            self.bank.enqueue(keys.float(), labels.to(self.device, non_blocking=True))
            if self.bn_buffers:
                kdist.average_in_place(self.bn_buffers)
            meter.step()
        meter.finish()
        self.warmed_up = True

    def stage1_step(self, item) -> torch.Tensor:
        """One optimiser step on a loader item; returns the loss (on the device, no sync)."""
        labels = item[-2].to(self.device, non_blocking=True)
        if self.contrastive:
            loss = self._contrastive_step(self._to_device(item[0]), self._to_device(item[1]),
                                          labels)
        else:
            loss = self._ce_step(self._to_device(item[0]), labels)
        if self.bn_buffers:
            kdist.average_in_place(self.bn_buffers)
        return loss

    def _step_done(self, stage: str, loss: torch.Tensor, lr: float, meter) -> None:
        """After each training step of either stage: log the loss, advance the progress meter
        and the step counters (checkpoints and stops happen there)."""
        self._log_loss(stage, loss, lr)
        meter.step()
        self._after_step()

    def _epoch_done(self, stage: str, loss_sum: torch.Tensor, steps: int, lr: float,
                    meter) -> None:
        """After each epoch of either stage: the mean loss over every process (one host sync),
        the progress line, the finiteness check and the timing record."""
        mean_loss = float(kdist.mean_over_processes(loss_sum)) / steps if steps else None
        stats = meter.finish(loss=mean_loss, lr=lr)
        self._check_finite(stage, mean_loss, lr)
        self.log.write_timing({"stage": stage, "epoch": self.epoch, **stats}, self.global_step)

    def stage1_epoch(self) -> None:
        s1 = self.cfg["stage1"]
        batches = kdata.shuffled_batches(len(self.stage1_views), s1["batch_size"],
                                         self.cfg["seed"], self.epoch)
        todo = [kdata.local_part(b, self.rank, self.world) for b in batches[self.step_in_epoch:]]
        lr = lr_at(s1, self.epoch)
        set_lr(self.optimizer, lr)
        self.model.train()
        loader = self.pool.get("stage1", self.stage1_views, todo, epoch=self.epoch)
        meter = self.progress.epoch(
            f"stage 1 ({s1['loss']}) epoch {self.epoch + 1}/{s1['epochs']}", len(todo),
            s1["batch_size"], epochs_left=s1["epochs"] - self.epoch - 1)
        loss_sum, steps = torch.zeros((), device=self.device), 0
        for item in meter.wrap(loader):
            loss = self.stage1_step(item)
            loss_sum += loss
            steps += 1
            self._step_done("stage1", loss, lr, meter)
        self._epoch_done("stage1", loss_sum, steps, lr, meter)
        self._end_epoch(s1["epochs"], "stage2")

    def _backward_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _contrastive_step(self, view_q, view_k, labels) -> torch.Tensor:
        s1 = self.cfg["stage1"]
        from ..ops import kpos_loss
        with self.autocast():
            query = self.ddp(view_q)
        with torch.no_grad():
            self.model.momentum_update()
            with self.autocast():
                keys = self.model.encode_keys(view_k, self._shuffle_generator(self.global_step))
        # The selection seed is a function of the step and the process, not of RNG state.
        seed = kdata.derive_seed(self.cfg["seed"], self.global_step, self.rank, 0xC0)
        loss = kpos_loss(query.float(), keys.float(), self.bank.keys, labels, self.bank.labels,
                         k=self.k, temperature=s1["temperature"], seed=seed,
                         backend=s1["backend"])
        self._backward_step(loss)
        self.bank.enqueue(keys.float(), labels)
        return loss.detach()

    def _ce_step(self, images, labels) -> torch.Tensor:
        with self.autocast():
            logits = self.ddp(images)
        loss = F.cross_entropy(logits.float(), labels)
        self._backward_step(loss)
        return loss.detach()

    # ------------------------------------------------------------------ stage 2
    def _eval_views(self, dataset) -> kdata.SeededViews:
        return kdata.SeededViews(dataset, self.data.eval_transform, 1, self.cfg["seed"])

    def _sharded_options(self, name: str) -> dict:
        return {"batch_size": self.cfg["eval"]["batch_size"], "device": self.device,
                "pool": self.pool, "name": name, "normalize": self.normalize,
                "autocast": self.autocast, "progress": self.progress}

    def stage2_features(self) -> torch.Tensor | None:
        """The cached training features (`augment: false`), else None."""
        if self.cfg["stage2"]["augment"]:
            return None
        return kprobe.extract_features(self.backbone, self._eval_views(self.data.train),
                                       **self._sharded_options("train features"))

    def stage2_epoch(self, cached: torch.Tensor | None) -> None:
        s2 = self.cfg["stage2"]
        probe = self._build_probe()
        batches = probe.epoch_batches(self.train_labels, self.epoch)
        todo = [kdata.local_part(b, self.rank, self.world) for b in batches[self.step_in_epoch:]]
        lr = lr_at(s2, self.epoch)
        set_lr(probe.optimizer, lr)
        self.backbone.eval()
        meter = self.progress.epoch(f"stage 2 epoch {self.epoch + 1}/{s2['epochs']}", len(todo),
                                    s2["batch_size"], epochs_left=s2["epochs"] - self.epoch - 1)
        if cached is not None:
            # One copy of the epoch's indices to the device, then no host sync per step.
            rows = torch.as_tensor(todo, dtype=torch.int64).to(self.device) if todo else []
            source = ((cached[index], self.train_labels_device[index]) for index in rows)
        else:
            views = kdata.SeededViews(self.data.train, self.data.train_transform, 1,
                                      self.cfg["seed"])
            loader = self.pool.get("stage2", views, todo, epoch=10_000 + self.epoch)
            source = ((images, labels) for images, labels, _ in loader)
        loss_sum, steps = torch.zeros((), device=self.device), 0
        for inputs, labels in meter.wrap(source):
            labels = labels.to(self.device, non_blocking=True)
            if cached is None:
                with torch.no_grad(), self.autocast():
                    inputs = self.backbone(self._to_device(inputs)).float()
            loss = probe.step(inputs, labels)
            loss_sum += loss
            steps += 1
            self._step_done("stage2", loss, lr, meter)
        self._epoch_done("stage2", loss_sum, steps, lr, meter)
        every = self.cfg["eval"]["every_epochs"]
        if every and (self.epoch + 1) % every == 0:
            self.periodic_evaluation()
        self._end_epoch(s2["epochs"], "done")

    # ------------------------------------------------------------------ evaluation
    def evaluate_split(self, split: str, features: torch.Tensor | None = None) -> dict:
        """The long-tailed report of the current classifier on `split` (val or test); from the
        split's cached backbone `features` when given (the same predictions, bit for bit)."""
        dataset = self.data.val if split == "val" else self.data.test
        if features is not None:
            predictions = kbalance.predict_classes(self._build_probe().classifier, features,
                                                   self.cfg["eval"]["batch_size"])
        else:
            predictions = kprobe.predict(self.backbone, self._build_probe().classifier,
                                         self._eval_views(dataset),
                                         **self._sharded_options(f"evaluation ({split})"))
        report = kprobe.evaluate(predictions, torch.as_tensor(dataset.labels), self.train_counts,
                                 self.cfg["eval"])
        report.update(loss=self.cfg["stage1"]["loss"], seed=self.cfg["seed"], evaluated_on=split)
        return report

    def final_evaluation(self) -> dict:
        """The test-set report of the stage-2 classifier; with a balanced split (data.balanced_*)
        also `feature_balance`, the β protocol on the backbone's features (balance.py); with
        eval.save_features the features of every split in features.pt."""
        e = self.cfg["eval"]
        if self.data.balanced is None and not e["save_features"]:
            report = self.evaluate_split("test")
            self.pool.close()
            return report
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        features = {"test": self._features(self.data.test, "test")}
        report = self.evaluate_split("test", features["test"])
        if self.data.balanced is not None:
            features["balanced"] = self._features(self.data.balanced, "balanced")
            report["feature_balance"] = kbalance.feature_balance(
                features["balanced"], torch.as_tensor(self.data.balanced.labels),
                features["test"], torch.as_tensor(self.data.test.labels), self.num_classes,
                self.cfg["stage2"], self.cfg["seed"], e["sigma"], e["batch_size"])
        if e["save_features"]:
            features["train"] = self._features(self.data.train, "train")
            if self.main:
                ckpt.atomic_save({
                    "num_classes": self.num_classes, "train_counts": self.train_counts,
                    **{f"{name}_features": f.cpu() for name, f in features.items()},
                    **{f"{name}_labels": torch.as_tensor(getattr(self.data, name).labels)
                       for name in features}}, os.path.join(self.out_dir, ckpt.FEATURES))
            kdist.barrier()
        self.pool.close()
        return report

    def _features(self, dataset, name: str) -> torch.Tensor:
        return kprobe.extract_features(self.backbone, self._eval_views(dataset),
                                       **self._sharded_options(f"{name} features"))

    def periodic_evaluation(self) -> None:
        """Evaluates after a stage-2 epoch (on the val split when there is one, else on the test
        set) and keeps the best classifier in best.pt."""
        split = "val" if self.data.val is not None else "test"
        report = self.evaluate_split(split)
        done = self.epoch + 1
        self.log.write({"stage": "stage2_eval", "epoch": done, "step": self.global_step,
                        "split": split, **{k: report[k] for k in
                                           ("top1", "many", "medium", "few", "beta")}})
        if self.best is None or report["top1"] > self.best["top1"]:
            self.best = {"epoch": done, "top1": report["top1"], "split": split}
            if self.main and self.out_dir is not None:
                ckpt.atomic_save({"kind": "best", "classifier": self.probe.classifier.state_dict(),
                                  "backbone": self.backbone.state_dict(), "config": self.cfg,
                                  **self.best}, os.path.join(self.out_dir, ckpt.BEST))
            kdist.barrier()

    def write_report(self, report: dict, name: str) -> None:
        report["provenance"] = provenance.describe(self.device, self.world)
        report["stage1_from"] = self.stage1_from
        report["best"] = self.best
        kmetrics.write_json(report, os.path.join(self.out_dir, name))

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = False, overwrite: bool = False) -> dict | None:
        """Trains and evaluates; returns the report on the main process (None elsewhere)."""
        if self.out_dir is None:
            raise TrainingError("Trainer.run needs an output folder")
        ckpt.check_output_folder(self.out_dir, resume, overwrite)
        kdist.barrier()  # every process has looked before the main one writes
        path = os.path.join(self.out_dir, ckpt.LAST)
        if resume and os.path.exists(path):
            self.load(path)
        else:
            if self.cfg["stage1"]["checkpoint"]:
                self._load_stage1(self.cfg["stage1"]["checkpoint"])
            if self.main:
                ckpt.clear_outputs(self.out_dir)
                with open(os.path.join(self.out_dir, "config.yaml"), "w", encoding="utf-8") as f:
                    f.write(dump(self.cfg))
            kdist.barrier()
        self.log.open_tensorboard()
        started = time.time()
        s1, s2 = self.cfg["stage1"], self.cfg["stage2"]
        if self.stage == "stage1" and s1["epochs"] == 0:
            self._save_stage1()
            self.stage = "stage2"
        if self.stage == "stage1" and self.contrastive and not self.warmed_up:
            self.warm_up_bank()
        while self.stage == "stage1":
            self.stage1_epoch()
        self.pool.close()
        if self.stage == "stage2" and s2["epochs"] == 0:
            self.stage = "done"
        self._build_probe()
        if self.stage == "stage2":
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            cached = self.stage2_features()
            while self.stage == "stage2":
                self.stage2_epoch(cached)
        report = self.final_evaluation()
        report["train_seconds_this_process"] = round(time.time() - started, 1)
        if self.main:
            self.write_report(report, "report.json")
            if self.cfg["eval"]["plot"]:
                kmetrics.plot_per_class(report, os.path.join(self.out_dir, "per_class.png"),
                                        title=s1["loss"])
            self.log.write({"stage": "eval", **{k: report[k] for k in
                                                ("top1", "many", "medium", "few", "beta")}},
                           step=self.global_step)
        self.log.close()
        kdist.barrier()
        return report if self.main else None

    def evaluate_saved(self, which: str) -> dict | None:
        """Evaluate-only: the test set with the classifier of best.pt or checkpoint.pt (`which`
        = best | last); writes report_<which>.json. Returns the report on the main process."""
        if which == "best":
            state = ckpt.load(os.path.join(self.out_dir, ckpt.BEST), "best checkpoint")
            self.backbone.load_state_dict(state["backbone"])
            classifier = state["classifier"]
        elif which == "last":
            state = ckpt.load(os.path.join(self.out_dir, ckpt.LAST))
            if "classifier" not in state:
                raise TrainingError(f"{self.out_dir}/{ckpt.LAST} has no stage-2 classifier yet "
                                    f"(the run is in {state['position']['stage']})")
            self.model.load_state_dict(state["model"])
            classifier = state["classifier"]
            self.best = state["position"].get("best")
        else:
            raise TrainingError(f"evaluate: which must be 'best' or 'last', got {which!r}")
        self._build_probe().classifier.load_state_dict(classifier)
        report = self.evaluate_split("test")
        self.pool.close()
        report["checkpoint"] = which
        if which == "best":
            self.best = {k: state[k] for k in ("epoch", "top1", "split")}
        if self.main:
            self.write_report(report, f"report_{which}.json")
        kdist.barrier()
        return report if self.main else None


def run(cfg: dict, out_dir: str, resume: bool = False, stop_at_step: int | None = None,
        overwrite: bool = False):
    """Trains and evaluates one configuration; returns the report (None on non-main ranks)."""
    return Trainer(cfg, out_dir, stop_at_step).run(resume, overwrite)
