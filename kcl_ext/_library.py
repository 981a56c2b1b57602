"""Finds and loads the compiled operator library (it registers the torch.ops.kcl schemas)."""
from __future__ import annotations

import glob
import os
import sys

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PATTERNS = ("_C*.so", "_C*.pyd")


def _libraries_in(directory: str) -> list[str]:
    return sorted(p for pattern in _PATTERNS for p in glob.glob(os.path.join(directory, pattern)))


def _hidden_copies() -> list[str]:
    """kcl_ext packages with a compiled library elsewhere on sys.path: an installed copy that
    this one (say, the source tree in the current directory) hides."""
    directories = [os.path.join(os.path.abspath(entry or os.getcwd()), "kcl_ext")
                   for entry in sys.path if isinstance(entry, str)]
    # An editable install is found by its own finder on sys.meta_path, not through sys.path.
    for finder in sys.meta_path:
        try:
            spec = finder.find_spec("kcl_ext", None)
        except Exception:  # a third-party finder may not take this call: it is only a hint
            continue
        if spec is not None and spec.origin:
            directories.append(os.path.dirname(os.path.abspath(spec.origin)))
    found = []
    for directory in directories:
        if (os.path.normcase(directory) != os.path.normcase(_PACKAGE_DIR)
                and directory not in found and _libraries_in(directory)):
            found.append(directory)
    return found


def missing_library_message(package_dir: str = _PACKAGE_DIR) -> str:
    """What to tell a user when `package_dir` holds no compiled library."""
    searched = " and ".join(os.path.join(package_dir, pattern) for pattern in _PATTERNS)
    message = f"kcl_ext: the compiled operator library was not found (searched {searched})."
    source_tree = os.path.isfile(os.path.join(os.path.dirname(package_dir), "setup.py"))
    hidden = _hidden_copies()
    if hidden:
        message += (f" Python imported kcl_ext from {package_dir}, which hides the built copy in "
                    f"{hidden[0]}: run Python outside this source tree (or build this one).")
    elif source_tree:
        message += (" This is an unbuilt source tree (Python imports kcl_ext from the current "
                    "directory before any installed copy): run Python from another directory, "
                    "or build it here.")
    message += (" Build it with `pip install --no-build-isolation -e .` (or `make build`) from "
                "the repository root, or set KCL_EXT_LIBRARY to the library's path.")
    return message


def library_path() -> str:
    """The compiled library: $KCL_EXT_LIBRARY if set, else kcl_ext/_C*.so next to this file."""
    override = os.environ.get("KCL_EXT_LIBRARY")
    if override:
        if not os.path.isfile(override):
            raise ImportError(f"kcl_ext: KCL_EXT_LIBRARY={override!r} is not a file")
        return override
    candidates = _libraries_in(_PACKAGE_DIR)
    if not candidates:
        raise ImportError(missing_library_message())
    return candidates[0]


def load() -> str:
    path = library_path()
    torch.ops.load_library(path)
    return path


LIBRARY_PATH = load()
