"""What a user meets before any loss: help(), the package files, the import error."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import kcl_ext

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("obj,needed", [
    (kcl_ext.kpos_loss, ["Args:", "Returns:", "Raises:", "L2-normalised", "empty queue",
                         "loss 0", "zero gradients", "takes all of them", "negative label",
                         "0-d floating tensor", "MemoryBank.enqueue"]),
    (kcl_ext.sample_positives, ["Args:", "Returns:", "Raises:", "None draws", "padded"]),
    (kcl_ext.KPositiveContrastiveLoss, ["Args:", "Raises:", "Parameter"]),
    (kcl_ext.KPositiveContrastiveLoss.forward, ["Args:", "Returns:"]),
    (kcl_ext.MemoryBank, ["Args:", "Raises:", "dtype", "device"]),
    (kcl_ext.MemoryBank.enqueue, ["Args:", "Raises:"]),
], ids=["kpos_loss", "sample_positives", "KPositiveContrastiveLoss", "forward", "MemoryBank",
        "enqueue"])
def test_docstrings_stand_alone(obj, needed):
    doc = obj.__doc__ or ""
    missing = [part for part in needed if part not in doc]
    assert not missing, f"{obj.__qualname__}'s docstring lacks {missing}"


def test_py_typed_and_license_ship():
    assert (ROOT / "kcl_ext" / "py.typed").is_file()
    setup = (ROOT / "setup.py").read_text()
    assert 'package_data={"kcl_ext": ["py.typed"]}' in setup
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "kcl_ext contributors" in license_text


def _import_error_in(tmp_path, extra_path: str | None) -> str:
    """Import kcl_ext from an unbuilt copy of the package in a source tree (the current
    directory), with `extra_path` (a built copy) later on sys.path; the ImportError's text."""
    tree = tmp_path / "src"
    shutil.copytree(ROOT / "kcl_ext", tree / "kcl_ext",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    (tree / "setup.py").write_text("# a source tree\n")
    env = {k: v for k, v in os.environ.items() if k not in ("KCL_EXT_LIBRARY", "PYTHONPATH")}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    result = subprocess.run([sys.executable, "-c", "import kcl_ext"], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, "the unbuilt copy imported"
    assert "ImportError" in result.stderr, result.stderr[-2000:]
    return result.stderr, tree


def test_import_error_names_the_path_and_the_source_tree(tmp_path):
    stderr, tree = _import_error_in(tmp_path, None)
    assert str(tree / "kcl_ext" / "_C*.so") in stderr, stderr[-2000:]
    # An unbuilt tree, or (where kcl_ext is also installed, e.g. editable) one that hides it.
    assert ("unbuilt source tree" in stderr and "run Python from another directory" in stderr
            or "which hides the built copy in" in stderr and "outside this source tree" in stderr)


def test_import_error_says_the_source_tree_hides_a_built_copy(tmp_path):
    built = tmp_path / "site"
    (built / "kcl_ext").mkdir(parents=True)
    (built / "kcl_ext" / "_C.so").write_bytes(b"")   # found by name; never loaded
    stderr, tree = _import_error_in(tmp_path, str(built))
    assert f"hides the built copy in {built / 'kcl_ext'}" in stderr, stderr[-2000:]
