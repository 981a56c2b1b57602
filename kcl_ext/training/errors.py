"""Errors in what a user gave the harness (config, data, paths, output folder).

`kcl-train` prints these as one line (`kcl-train: error: ...`) and exits with status 2, without a
traceback: they say what was wrong and what was expected. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations


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
