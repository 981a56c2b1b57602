"""Errors in what a user gave the recipe (config, data, paths, output folder).

The commands (`run_command`) print these as one line (`train.py: error: ...`) and exit with
status 2, without a traceback: they say what was wrong and what was expected. Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import sys

# What the recipe needs beside torch and kcl_ext: module -> package.
REQUIREMENTS = {"yaml": "pyyaml", "torchvision": "torchvision", "tqdm": "tqdm",
                "matplotlib": "matplotlib"}


class TrainingError(Exception):
    """Base class: a problem with the user's input that the CLI reports without a traceback."""


class ConfigError(TrainingError, ValueError):
    """A config key or value that is unknown, of the wrong type or out of range."""


class DataError(TrainingError, ValueError):
    """A split list, image folder or data set that does not hold what the config says."""


class MissingFileError(TrainingError, FileNotFoundError):
    """A file the config or the command line names does not exist."""


class OutputError(TrainingError):
    """The output folder holds a run that this command would damage (see --resume, --overwrite)."""


def missing_requirements() -> list[str]:
    missing = []
    for module, package in REQUIREMENTS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def run_command(main, argv, prog: str) -> int:
    """Runs a command's `main(argv)`: missing packages and user errors become one line and
    status 2."""
    missing = missing_requirements()
    if missing:
        print(f"{prog}: error: the recipe needs packages missing here: {', '.join(missing)}. "
              f"Install them with: pip install {' '.join(missing)}", file=sys.stderr)
        return 2
    try:
        return main(argv)
    except TrainingError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
