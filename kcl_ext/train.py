"""`python -m kcl_ext.train ...` is `kcl-train ...`: the harness lives in kcl_ext.training.

`kcl_ext.train.run` and `kcl_ext.train.Trainer` remain importable from here."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from .training.cli import main as cli_main
    return cli_main(argv)


def __getattr__(name):
    if name in ("run", "Trainer"):
        from .training import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'kcl_ext.train' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
