"""Two-stage KCL training: `kcl-train --config configs/X.yaml [--out DIR] [--resume] [--set k=v]`.

Stage 1 learns the backbone with `kcl`, `fcl`, `moco` (kcl_ext.kpos_loss against a MemoryBank,
MoCo query and momentum key encoders) or `ce` (supervised cross-entropy). Stage 2 freezes the
backbone in eval mode and trains a linear classifier with cross-entropy (optionally with
class-balanced sampling). The test set is then evaluated: top-1, Many / Medium / Few, beta, a
per-class plot and a JSON report. Under torchrun each process loads its slice of every global
batch (DDP, gloo on CPU, NCCL on GPU).

Outputs in DIR: config.yaml, metrics.jsonl, checkpoint.pt (every epoch, written atomically),
report.json, per_class.png. See docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from . import data as kdata
from . import distributed as kdist
from . import metrics as kmetrics
from .config import load_config
from .memory_bank import MemoryBank
from .models import (ContrastiveEncoder, MomentumPair, SupervisedClassifier, build_backbone)

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------
def lr_at(stage: dict, epoch: int) -> float:
    """The learning rate of an epoch (MoCo sets it at the start of each epoch)."""
    if stage["schedule"] == "cosine":
        return stage["lr"] * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, stage["epochs"])))
    drops = sum(1 for m in stage["milestones"] if epoch >= m)
    return stage["lr"] * stage["gamma"] ** drops


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, fsync it, then rename it over `path` and fsync the folder:
    neither a killed process nor a power loss leaves a torn checkpoint or loses the previous one
    (one fsync per epoch costs little next to an epoch)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class MetricsLog:
    """JSON lines on the main process (and TensorBoard scalars when tensorboard is installed)."""

    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                self.tb = None

    def offset(self) -> int:
        return os.path.getsize(self.path) if self.enabled and os.path.exists(self.path) else 0

    def truncate(self, offset: int) -> None:
        """Drops records written after the checkpoint being resumed (they will be redone)."""
        if self.enabled and os.path.exists(self.path):
            with open(self.path, "r+b") as f:
                f.truncate(offset)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('stage', 'run')}/{name}", value,
                                       record["step"])


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=2.0, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def build_data(cfg: dict):
    """(train base dataset, test base dataset, train transform, eval transform, num_classes)."""
    d = cfg["data"]
    size = d["image_size"]
    if d["kind"] == "fashion_mnist_lt":
        train, test = kdata.fashion_mnist_lt(d["root"], d["imbalance_factor"], d["max_per_class"],
                                             d["test_per_class"], d["subset_seed"])
        mean, std = (kdata.FASHION_MNIST_MEAN,), (kdata.FASHION_MNIST_STD,)
        num_classes = 10
        crop_fraction = 1.0
    else:
        for key in ("image_root", "train_list", "test_list"):
            if not d[key]:
                raise ValueError(f"data.{key} is required for data.kind split_list")
        train = kdata.SplitListImages(d["train_list"], d["image_root"], d["check_files"])
        test = kdata.SplitListImages(d["test_list"], d["image_root"], d["check_files"])
        mean, std = kdata.IMAGENET_MEAN, kdata.IMAGENET_STD
        num_classes = d["num_classes"] or int(max(train.labels.max(), test.labels.max())) + 1
        crop_fraction = 0.875
    train_tf = kdata.RandomResizedCropFlip(size, d["crop_scale"], mean=mean, std=std)
    eval_tf = kdata.ResizeCenterCrop(size, crop_fraction, mean=mean, std=std)
    return train, test, train_tf, eval_tf, num_classes


def _loader(dataset, batches, cfg):
    # Its own generator: the loader then never draws from the process RNG (whose state a
    # checkpoint restores), and the augmentations are seeded per sample anyway.
    generator = torch.Generator().manual_seed(kdata.derive_seed(cfg["seed"], 0x10AD))
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, generator=generator,
                                       num_workers=cfg["data"]["num_workers"])


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: dict, out_dir: str, stop_at_step: int | None = None):
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
        os.makedirs(out_dir, exist_ok=True)
        self.log = MetricsLog(out_dir, self.main)
        self.progress = cfg["progress"] and self.main
        self.amp = bool(cfg["amp"]) and self.device.type == "cuda"

        self.train_base, self.test_base, self.train_tf, self.eval_tf, self.num_classes = \
            build_data(cfg)
        self.train_labels = torch.as_tensor(self.train_base.labels)
        self.train_counts = torch.bincount(self.train_labels, minlength=self.num_classes).tolist()
        s1 = cfg["stage1"]
        for name, stage in (("stage1", s1), ("stage2", cfg["stage2"])):
            if stage["batch_size"] % self.world:
                raise ValueError(f"{name}.batch_size {stage['batch_size']} must be divisible by "
                                 f"the number of processes {self.world}")
            if stage["epochs"] and len(self.train_base) < stage["batch_size"]:
                raise ValueError(f"{name}.batch_size {stage['batch_size']} exceeds the "
                                 f"{len(self.train_base)} training images")

        m = cfg["model"]
        in_channels = 1 if cfg["data"]["kind"] == "fashion_mnist_lt" else 3
        backbone = build_backbone(m["arch"], in_channels, m["width"], m["blocks"], m["norm"],
                                  m["stem_stride"])
        self.contrastive = s1["loss"] != "ce"
        if self.contrastive:
            self.model = MomentumPair(ContrastiveEncoder(backbone, m["dim"], m["mlp_head"]),
                                      m["momentum"], m["shuffle_bn"]).to(self.device)
            self.trainable = self.model.query_encoder
            self.bank = MemoryBank(s1["queue_size"], m["dim"]).to(self.device)
            self.k = {"kcl": s1["k"], "fcl": -1, "moco": 0}[s1["loss"]]
        else:
            self.model = SupervisedClassifier(backbone, self.num_classes).to(self.device)
            self.trainable = self.model
            self.bank = None
        self.ddp = self.trainable
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.trainable)
        self.optimizer = torch.optim.SGD(self.trainable.parameters(), lr=s1["lr"],
                                         momentum=s1["momentum"],
                                         weight_decay=s1["weight_decay"])
        self.backbone = backbone
        self.classifier = None
        self.optimizer2 = None
        # Position: the next thing to do is (stage, epoch, step within epoch).
        self.stage, self.epoch, self.step_in_epoch, self.global_step = "stage1", 0, 0, 0
        self.warmed_up = False

    def _device(self) -> torch.device:
        want = self.cfg["device"]
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    # ------------------------------------------------------------------ checkpoints
    def _build_stage2(self):
        s2 = self.cfg["stage2"]
        self.classifier = nn.Linear(self.backbone.feature_dim, self.num_classes).to(self.device)
        g = torch.Generator().manual_seed(kdata.derive_seed(self.cfg["seed"], 0x57A6E2))
        with torch.no_grad():
            self.classifier.weight.copy_(torch.randn(self.classifier.weight.shape, generator=g)
                                         * s2["init_std"])
            self.classifier.bias.zero_()
        self.optimizer2 = torch.optim.SGD(self.classifier.parameters(), lr=s2["lr"],
                                          momentum=s2["momentum"],
                                          weight_decay=s2["weight_decay"])

    def state_dict(self) -> dict:
        state = {
            "position": {"stage": self.stage, "epoch": self.epoch,
                         "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                         "warmed_up": self.warmed_up},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "rng": rng_state(),
            "metrics_offset": self.log.offset(),
            "config": self.cfg,
        }
        if self.classifier is not None:
            state["classifier"] = self.classifier.state_dict()
            state["optimizer2"] = self.optimizer2.state_dict()
        return state

    def save(self) -> None:
        state = self.state_dict()  # every process computes it (RNG), the main one writes
        if self.main:
            atomic_save(state, os.path.join(self.out_dir, CHECKPOINT))
        kdist.barrier()

    def load(self, path: str) -> None:
        # On the CPU: the RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = torch.load(path, map_location="cpu", weights_only=False)
        pos = state["position"]
        self.stage, self.epoch = pos["stage"], pos["epoch"]
        self.step_in_epoch, self.global_step = pos["step_in_epoch"], pos["global_step"]
        self.warmed_up = pos["warmed_up"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        if "classifier" in state:
            self._build_stage2()
            self.classifier.load_state_dict(state["classifier"])
            self.optimizer2.load_state_dict(state["optimizer2"])
        set_rng_state(state["rng"])
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
            self.stage, self.epoch = next_stage, 0
        self.save()

    # ------------------------------------------------------------------ stage 1
    def warm_up_bank(self) -> None:
        """Fills the bank before epoch 0 with keys of ceil(size / batch) batches, without
        momentum updates (as the official code does)."""
        s1 = self.cfg["stage1"]
        views = kdata.SeededViews(self.train_base, self.train_tf, 1, self.cfg["seed"])
        views.set_epoch(-1)
        needed = math.ceil(self.bank.size / s1["batch_size"])
        batches = []
        while len(batches) < needed:  # a bank larger than the data set takes several passes
            batches += kdata.shuffled_batches(len(views), s1["batch_size"], self.cfg["seed"],
                                              -1 - len(batches))
        batches = [kdata.local_part(b, self.rank, self.world) for b in batches[:needed]]
        self.model.train()
        for step, (images, labels, _) in enumerate(_progress(
                _loader(views, batches, self.cfg), len(batches), "bank warm-up", self.progress)):
            images, labels = images.to(self.device), labels.to(self.device)
            with self.autocast():
                keys = self.model.encode_keys(images, self._shuffle_generator(-1 - step))
            self.bank.enqueue(keys.float(), labels)
        self.warmed_up = True

    def _shuffle_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(kdata.derive_seed(self.cfg["seed"], step, 0xB4))

    def stage1_epoch(self) -> None:
        s1 = self.cfg["stage1"]
        views = kdata.SeededViews(self.train_base, self.train_tf, 2 if self.contrastive else 1,
                                  self.cfg["seed"])
        views.set_epoch(self.epoch)
        batches = kdata.shuffled_batches(len(views), s1["batch_size"], self.cfg["seed"],
                                         self.epoch)
        todo = [kdata.local_part(b, self.rank, self.world) for b in batches[self.step_in_epoch:]]
        lr = lr_at(s1, self.epoch)
        set_lr(self.optimizer, lr)
        self.model.train()
        bar = _progress(_loader(views, todo, self.cfg), len(todo),
                        f"stage 1 ({s1['loss']}) epoch {self.epoch + 1}/{s1['epochs']}",
                        self.progress)
        for item in bar:
            item = [x.to(self.device) for x in item]
            if self.contrastive:
                loss = self._contrastive_step(item[0], item[1], item[2])
            else:
                loss = self._ce_step(item[0], item[1])
            loss = float(kdist.mean_over_processes(loss.detach()))
            if self.global_step % self.cfg["log_interval"] == 0:
                self.log.write({"stage": "stage1", "epoch": self.epoch, "step": self.global_step,
                                "loss": loss, "lr": lr})
            if self.progress:
                bar.set_postfix(loss=f"{loss:.3f}")
            self._after_step()
        self._end_epoch(s1["epochs"], "stage2")

    def _contrastive_step(self, view_q, view_k, labels) -> torch.Tensor:
        s1 = self.cfg["stage1"]
        from .ops import kpos_loss
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
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.bank.enqueue(keys.float(), labels)
        return loss

    def _ce_step(self, images, labels) -> torch.Tensor:
        with self.autocast():
            logits = self.ddp(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    # ------------------------------------------------------------------ stage 2
    @torch.no_grad()
    def features(self, base, transform, batch_size: int) -> torch.Tensor:
        """Backbone features of every image of `base` (eval mode, no augmentation)."""
        self.backbone.eval()
        views = kdata.SeededViews(base, transform, 1, self.cfg["seed"])
        batches = [list(range(i, min(i + batch_size, len(views))))
                   for i in range(0, len(views), batch_size)]
        out = []
        for images, _, _ in _loader(views, batches, self.cfg):
            with self.autocast():
                out.append(self.backbone(images.to(self.device)).float())
        return torch.cat(out)

    def stage2_epoch(self, cached: torch.Tensor | None) -> None:
        s2 = self.cfg["stage2"]
        if s2["class_balanced"]:
            batches = kdata.class_cycling_batches(self.train_labels, s2["batch_size"],
                                                  self.cfg["seed"], self.epoch,
                                                  s2["samples_per_class"])
        else:
            batches = kdata.shuffled_batches(len(self.train_base), s2["batch_size"],
                                             self.cfg["seed"], 10_000 + self.epoch)
        todo = [kdata.local_part(b, self.rank, self.world) for b in batches[self.step_in_epoch:]]
        lr = lr_at(s2, self.epoch)
        set_lr(self.optimizer2, lr)
        self.backbone.eval()
        self.classifier.train()
        if cached is not None:
            source = ((cached[b], self.train_labels[b]) for b in todo)
        else:
            views = kdata.SeededViews(self.train_base, self.train_tf, 1, self.cfg["seed"])
            views.set_epoch(10_000 + self.epoch)
            source = ((imgs, labels) for imgs, labels, _ in _loader(views, todo, self.cfg))
        bar = _progress(source, len(todo), f"stage 2 epoch {self.epoch + 1}/{s2['epochs']}",
                        self.progress)
        for inputs, labels in bar:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            if cached is None:
                with torch.no_grad(), self.autocast():
                    inputs = self.backbone(inputs).float()
            loss = F.cross_entropy(self.classifier(inputs), labels)
            self.optimizer2.zero_grad(set_to_none=True)
            loss.backward()
            kdist.average_gradients(self.classifier.parameters())
            self.optimizer2.step()
            loss = float(kdist.mean_over_processes(loss.detach()))
            if self.global_step % self.cfg["log_interval"] == 0:
                self.log.write({"stage": "stage2", "epoch": self.epoch, "step": self.global_step,
                                "loss": loss, "lr": lr})
            self._after_step()
        self._end_epoch(s2["epochs"], "done")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        e = self.cfg["eval"]
        feats = self.features(self.test_base, self.eval_tf, e["batch_size"])
        self.classifier.eval()
        predictions = self.classifier(feats).argmax(1).cpu()
        labels = torch.as_tensor(self.test_base.labels)
        report = kmetrics.evaluate(predictions, labels, self.train_counts,
                                   many_threshold=e["many_threshold"],
                                   few_threshold=e["few_threshold"], sigma=e["sigma"])
        report["loss"] = self.cfg["stage1"]["loss"]
        report["seed"] = self.cfg["seed"]
        return report

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = False) -> dict | None:
        path = os.path.join(self.out_dir, CHECKPOINT)
        if resume and os.path.exists(path):
            self.load(path)
        elif self.main:
            self.log.truncate(0)
            with open(os.path.join(self.out_dir, "config.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(self.cfg, f, sort_keys=False)
        started = time.time()
        s1, s2 = self.cfg["stage1"], self.cfg["stage2"]
        if self.stage == "stage1" and s1["epochs"] == 0:
            self.stage = "stage2"
        if self.stage == "stage1" and self.contrastive and not self.warmed_up:
            self.warm_up_bank()
        while self.stage == "stage1":
            self.stage1_epoch()
        if self.stage == "stage2" and s2["epochs"] == 0:
            self.stage = "done"
        if self.classifier is None:
            self._build_stage2()
        if self.stage == "stage2":
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            cached = None
            if not s2["augment"]:
                cached = self.features(self.train_base, self.eval_tf, self.cfg["eval"]["batch_size"])
            while self.stage == "stage2":
                self.stage2_epoch(cached)
        report = None
        if self.main:
            report = self.evaluate()
            report["train_seconds_this_process"] = round(time.time() - started, 1)
            kmetrics.write_json(report, os.path.join(self.out_dir, "report.json"))
            kmetrics.plot_per_class(report, os.path.join(self.out_dir, "per_class.png"),
                                    title=s1["loss"])
            self.log.write({"stage": "eval", **{k: report[k] for k in
                                                ("top1", "many", "medium", "few", "beta")}})
        kdist.barrier()
        return report


def run(cfg: dict, out_dir: str, resume: bool = False, stop_at_step: int | None = None):
    """Trains and evaluates one configuration; returns the report (None on non-main ranks)."""
    return Trainer(cfg, out_dir, stop_at_step).run(resume)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kcl-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (configs/*.yaml); keys not given keep defaults")
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt when it exists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.epochs=3 (repeatable)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="testing: SIGKILL this process right after global step N")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = args.out or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.config or "default"))[0])
    report = run(cfg, out, args.resume, args.stop_at_step)
    if report is not None:
        print(kmetrics.format_table({f"{cfg['stage1']['loss']} (seed {cfg['seed']})": report}))
        print(f"report: {os.path.join(out, 'report.json')}")
    if kdist.is_distributed():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
