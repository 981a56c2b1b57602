"""Helpers of the recipe's tests: tiny generated data sets, tiny configs, gloo groups.

Importing it puts the recipe (references/kcl/, whose modules import each other by their plain
names, as torchvision's references do) on sys.path; test modules import it first.
"""
from __future__ import annotations

import gzip
import os
import socket
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "references", "kcl")
STUDY = os.path.join(ROOT, "experiments", "fmnist_lt_study")
for _path in (STUDY, RECIPE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np
import torch


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> str:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    opener = gzip.open if compress else open
    path = path + (".gz" if compress else "")
    with opener(path, "wb") as f:
        f.write(raw)
    return path


def class_images(labels: np.ndarray, size: int = 28, seed: int = 0) -> np.ndarray:
    """Noisy images whose bright band depends on the class (learnable, never all-zero)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(labels.size, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        row = int(c) * size // 10
        images[i, row:row + max(1, size // 10), :] = 220
    return images


def make_fashion_idx(folder: str, train_per_class: int = 40, test_per_class: int = 4,
                     compress: bool = True) -> str:
    """Fashion-MNIST-shaped IDX files (10 classes, 28x28) in `folder`."""
    os.makedirs(folder, exist_ok=True)
    for split, per, seed in (("train", train_per_class, 1), ("t10k", test_per_class, 2)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per)
        np.random.default_rng(seed).shuffle(labels)
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte"),
                  class_images(labels, seed=seed), compress)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte"), labels, compress)
    return folder


def tiny_config(root: str, **sections) -> dict:
    """A config that trains in about a second: 10 classes of 40..4 images, a 4-wide ResNet."""
    cfg = {
        "seed": 3,
        "threads": 1,
        "progress": "none",
        "tensorboard": False,
        "log_interval": 1,
        "data": {"kind": "fashion_mnist_lt", "root": root, "imbalance_factor": 10,
                 "max_per_class": 40, "crop_scale": [0.5, 1.0]},
        "model": {"arch": "small_resnet", "width": 4, "blocks": 1, "stem_stride": 2, "dim": 16,
                  "momentum": 0.9, "bn_splits": 2},
        "stage1": {"loss": "kcl", "k": 2, "temperature": 0.2, "queue_size": 48, "epochs": 2,
                   "batch_size": 16, "lr": 0.05},
        "stage2": {"epochs": 2, "batch_size": 16, "lr": 0.5, "milestones": [1],
                   "class_balanced": True, "augment": False},
        "eval": {"batch_size": 64},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg[name].update(values)
        else:
            cfg[name] = values
    return cfg


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Joins a gloo group on the loopback address, as torchrun would describe it."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         init_method=f"tcp://127.0.0.1:{port}")
