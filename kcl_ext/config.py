"""Run configuration: defaults, YAML files and `--set key=value` overrides.

Every key a run reads is in DEFAULTS; a YAML file or override naming any other key is an error
(a typo must not silently fall back to a default). docs/training.md describes each key.
"""
from __future__ import annotations

import copy

import yaml

DEFAULTS = {
    "seed": 0,
    "device": "auto",          # auto | cpu | cuda
    "amp": True,               # bf16 autocast, on CUDA only
    "threads": None,           # torch.set_num_threads; None = torch's default
    "log_interval": 10,        # steps between JSON-lines records
    "checkpoint_every_steps": 0,  # 0 = only at the end of each epoch
    "progress": True,          # tqdm bars
    "data": {
        "kind": "fashion_mnist_lt",  # fashion_mnist_lt | split_list
        "root": None,              # Fashion-MNIST IDX folder (None: data/fashion-mnist, then
                                   # /usr/share/datasets/fashion-mnist)
        "imbalance_factor": 100.0,
        "max_per_class": 6000,
        "test_per_class": None,
        "subset_seed": 0,          # which images of each class the long-tailed subset keeps
        "image_root": None,        # split lists: folder the relative paths start from
        "train_list": None,
        "test_list": None,
        "num_classes": None,       # split lists: None = max label + 1
        "check_files": True,
        "image_size": 28,
        "crop_scale": [0.08, 1.0],
        "num_workers": 0,
    },
    "model": {
        "arch": "small_resnet",    # small_resnet | resnet50 | other torchvision ResNets
        "width": 16,
        "blocks": 1,
        "stem_stride": 1,
        "norm": "bn",              # bn | gn | none (small_resnet only)
        "dim": 128,
        "mlp_head": False,
        "momentum": 0.999,         # key encoder
        "shuffle_bn": True,
    },
    "stage1": {
        "loss": "kcl",             # kcl | fcl | moco | ce
        "k": 6,
        "temperature": 0.07,
        "queue_size": 65536,
        "backend": "auto",
        "epochs": 200,
        "batch_size": 256,         # global, over all processes
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",      # cosine (to 0, per epoch) | step
        "milestones": [],
        "gamma": 0.1,
    },
    "stage2": {
        "epochs": 100,
        "batch_size": 256,
        "lr": 30.0,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "step",
        "milestones": [60, 80],
        "gamma": 0.1,
        "init_std": 0.01,
        "class_balanced": False,
        "samples_per_class": 4,
        "augment": True,           # False: no augmentation, features computed once and cached
    },
    "eval": {
        "many_threshold": 100,
        "few_threshold": 20,
        "sigma": 0.1,
        "batch_size": 256,
    },
}

LOSSES = ("kcl", "fcl", "moco", "ce")


def _merge(base: dict, update: dict, where: str) -> dict:
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in base:
            raise KeyError(f"unknown config key {name!r} (known: {sorted(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise TypeError(f"config key {name!r} must be a mapping, got {value!r}")
            _merge(base[key], value, name + ".")
        else:
            base[key] = value
    return base


def parse_override(text: str) -> dict:
    """'stage1.epochs=3' -> {'stage1': {'epochs': 3}} (the value is read as YAML)."""
    if "=" not in text:
        raise ValueError(f"--set expects KEY=VALUE (e.g. stage1.epochs=3), got {text!r}")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    out: dict = {}
    node = out
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | None = None, overrides=(), base: dict | None = None) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if base:
        _merge(cfg, copy.deepcopy(base), "")
    if path:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise TypeError(f"{path}: a config file must hold a mapping, got {type(loaded)}")
        _merge(cfg, loaded, "")
    for text in overrides:
        _merge(cfg, parse_override(text), "")
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    s1, s2 = cfg["stage1"], cfg["stage2"]
    if s1["loss"] not in LOSSES:
        raise ValueError(f"stage1.loss must be one of {LOSSES}, got {s1['loss']!r}")
    if s1["loss"] == "kcl" and (not isinstance(s1["k"], int) or s1["k"] < 1):
        raise ValueError(f"stage1.k must be an int >= 1 for loss kcl, got {s1['k']!r}")
    for stage, name in ((s1, "stage1"), (s2, "stage2")):
        if stage["epochs"] < 0 or stage["batch_size"] < 1:
            raise ValueError(f"{name}.epochs must be >= 0 and {name}.batch_size >= 1")
        if stage["schedule"] not in ("cosine", "step"):
            raise ValueError(f"{name}.schedule must be 'cosine' or 'step', got "
                             f"{stage['schedule']!r}")
    if cfg["data"]["kind"] not in ("fashion_mnist_lt", "split_list"):
        raise ValueError(f"data.kind must be 'fashion_mnist_lt' or 'split_list', got "
                         f"{cfg['data']['kind']!r}")
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {cfg['device']!r}")
