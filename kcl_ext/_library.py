"""Finds and loads the compiled operator library (it registers the torch.ops.kcl schemas)."""
from __future__ import annotations

import glob
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def library_path() -> str:
    """The compiled library: $KCL_EXT_LIBRARY if set, else kcl_ext/_C*.so next to this file."""
    override = os.environ.get("KCL_EXT_LIBRARY")
    if override:
        return override
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) +
                        glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
    if not candidates:
        raise ImportError(
            "kcl_ext: the compiled operator library (kcl_ext/_C*.so) was not found. Build it with "
            "`pip install --no-build-isolation -e .` (or `make build`) from the repository root."
        )
    return candidates[0]


def load() -> str:
    path = library_path()
    torch.ops.load_library(path)
    return path


LIBRARY_PATH = load()
