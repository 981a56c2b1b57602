"""The README's example runs as written: the python block after the `readme-example` marker."""
from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-example:"


def readme_example() -> str:
    text = README.read_text()
    assert MARKER in text, f"README.md lost its {MARKER!r} marker before the op's example"
    after = text[text.index(MARKER):]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, "no ```python block after the readme-example marker"
    return match.group(1)


def test_readme_example_runs():
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    # It trained three MoCo-order steps and filled the bank with their keys.
    bank = namespace["bank"]
    assert len(bank) == 3 * 256
    assert torch.isfinite(namespace["loss"]) and namespace["query"].grad is not None
    assert namespace["temperature"].grad is not None and torch.isfinite(namespace["temperature"].grad)
