"""Checkpoint files of a run: atomic writes, RNG state, the output folder, backbone export.

Files in a run folder (`--out`):
- `checkpoint.pt`: the last state (every epoch and every `checkpoint_every_steps`), what
  `--resume` continues from;
- `stage1.pt`: the model at the end of stage 1, what `--stage1 PATH` trains new classifiers on;
- `best.pt`: the stage-2 classifier (and the frozen backbone) of the best periodic evaluation.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from errors import MissingFileError, OutputError, TrainingError

LAST, STAGE1, BEST = "checkpoint.pt", "stage1.pt", "best.pt"
FEATURES = "features.pt"  # eval.save_features: the backbone features of every split
# Everything a run writes into its folder (what --overwrite removes).
OUTPUTS = ("config.yaml", "metrics.jsonl", "timing.jsonl", LAST, STAGE1, BEST, FEATURES,
           "report.json", "report_best.json", "report_last.json", "per_class.png", "tensorboard")


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


def load(path: str, what: str = "checkpoint") -> dict:
    """A checkpoint file as saved (on the CPU: RNG states must stay CPU tensors)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many kinds on a damaged file
        raise TrainingError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise TrainingError(f"{what} {path} is not a checkpoint of references/kcl/train.py")
    return state


def resolve(path: str, default_name: str) -> str:
    """`path` itself, or `path/default_name` when `path` is a run folder."""
    return os.path.join(path, default_name) if os.path.isdir(path) else path


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


# ----------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------
def check_output_folder(out_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuses to start a run in a folder that holds anything, unless `resume` (continue the run
    there) or `overwrite` (start afresh, replacing its outputs) says what to do with it."""
    if resume and overwrite:
        raise OutputError("--resume and --overwrite exclude each other: continue the run in "
                          "the folder, or replace it")
    if resume or overwrite or not os.path.isdir(out_dir):
        return
    present = sorted(os.listdir(out_dir))
    if present:
        shown = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
        raise OutputError(f"output folder {out_dir} is not empty (it holds {shown}): pass "
                          f"--resume to continue the run there, or --overwrite to start afresh "
                          f"and replace its outputs")


def clear_outputs(out_dir: str) -> None:
    """Removes what a run writes (OUTPUTS, and temporary checkpoint files); leaves anything
    else in the folder alone."""
    if not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name in OUTPUTS or any(name.startswith(f"{n}.tmp") for n in (LAST, STAGE1, BEST)):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# ----------------------------------------------------------------------------------------------
# Backbone weights and export
# ----------------------------------------------------------------------------------------------
def backbone_state(model_state: dict, contrastive: bool) -> dict:
    """The backbone's weights out of a stage-1 model state (query encoder or CE model)."""
    prefix = "query_encoder.backbone." if contrastive else "backbone."
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}


def torchvision_state(backbone: dict, arch: str, classifier: dict | None = None) -> dict:
    """A state dict that `torchvision.models.<arch>(num_classes=C).load_state_dict` accepts
    (strictly when `classifier` is given: it becomes `fc`); for `small_resnet` the harness's own
    `SmallResNet` keys, with the classifier as `fc`."""
    if arch != "small_resnet":
        backbone = {k[len("net."):]: v for k, v in backbone.items() if k.startswith("net.")}
    out = dict(backbone)
    if classifier is not None:
        out["fc.weight"], out["fc.bias"] = classifier["weight"], classifier["bias"]
    return out


def export(run_dir: str, which: str, path: str) -> dict:
    """Writes the backbone of a run (with its stage-2 classifier as `fc`, except for `stage1`)
    as a torchvision state dict; returns what was written about."""
    names = {"last": LAST, "best": BEST, "stage1": STAGE1}
    if which not in names:
        raise TrainingError(f"export: which must be one of {sorted(names)}, got {which!r}")
    state = load(os.path.join(run_dir, names[which]), f"{which} checkpoint")
    cfg = state["config"]
    contrastive = cfg["stage1"]["loss"] != "ce"
    if which == "best":
        backbone, classifier = state["backbone"], state["classifier"]
    else:
        backbone = backbone_state(state["model"], contrastive)
        classifier = state.get("classifier") if which == "last" else None
        if which == "last" and classifier is None:
            raise TrainingError(f"{run_dir}/{LAST} has no stage-2 classifier yet (the run is "
                                f"in {state['position']['stage']}); export.py --which stage1 "
                                f"writes the backbone alone")
    weights = torchvision_state(backbone, cfg["model"]["arch"], classifier)
    atomic_save(weights, path)
    return {"arch": cfg["model"]["arch"], "classes": None if classifier is None
            else int(classifier["weight"].shape[0]), "tensors": len(weights)}
