"""A run killed (SIGKILL) mid-epoch and resumed ends bitwise identical to an uninterrupted one.

"Killed mid-epoch" here: the test sets train.after_step_hook (in the process it starts, see
`train_cli`) so that the process sends itself SIGKILL right after optimiser step N, before any
checkpoint of that epoch, so the work since the last checkpoint is
lost exactly as in a real kill (no clean-up, no flush). The step is chosen, not random, so the
test always kills inside an epoch; a kill during a checkpoint write is covered by the atomic
rename (a leftover temporary file is never read).
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import torch
import yaml

from _harness import RECIPE, ROOT, make_fashion_idx, tiny_config

from data import long_tailed_counts

# `python references/kcl/train.py ARGS`, with a hook that kills the process (SIGKILL) right after
# global step KILL_AT_STEP when that variable is set.
KILLABLE = """
import os, signal, sys
sys.path.insert(0, {recipe!r})
import train
from errors import run_command
kill_at = int(os.environ.get("KILL_AT_STEP", "-1"))
def kill(run):
    if run.position.global_step == kill_at:  # a real kill: no checkpoint, no clean-up, no flush
        os.kill(os.getpid(), signal.SIGKILL)
train.after_step_hook = kill
sys.exit(run_command(train.main, sys.argv[1:], "train.py"))
"""


def train_cli(config_path, out, *extra, kill_at_step=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if kill_at_step is not None:
        env["KILL_AT_STEP"] = str(kill_at_step)
    return subprocess.run([sys.executable, "-c", KILLABLE.format(recipe=RECIPE),
                           "--config", config_path, "--out", out, *extra], env=env,
                          capture_output=True, text=True, timeout=300)


def tensors_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"array differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    root = make_fashion_idx(str(tmp_path / "fm"))
    cfg = tiny_config(root, eval={"batch_size": 64, "every_epochs": 1})  # 2 epochs per stage
    steps = sum(long_tailed_counts(10, 40, 10)) // cfg["stage1"]["batch_size"]  # per epoch
    assert steps >= 4
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(cfg))

    whole = train_cli(str(config_path), str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = str(tmp_path / "killed")
    # Kill 1: in the middle of stage-1 epoch 2 (global steps steps .. 2 * steps - 1).
    first = train_cli(str(config_path), out, kill_at_step=steps + steps // 2)
    assert first.returncode == -signal.SIGKILL, first.stderr
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert saved["position"] == {"stage": "stage1", "epoch": 1, "step_in_epoch": 0,
                                 "global_step": steps, "warmed_up": True, "best": None}
    assert not os.path.exists(os.path.join(out, "report.json"))
    # Kill 2, after resuming: in the middle of stage-2 epoch 2.
    second = train_cli(str(config_path), out, "--resume", kill_at_step=3 * steps + steps // 2)
    assert second.returncode == -signal.SIGKILL, second.stderr
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert saved["position"]["stage"] == "stage2" and saved["position"]["global_step"] == 3 * steps
    assert saved["position"]["best"]["epoch"] == 1  # evaluated after stage-2 epoch 1
    third = train_cli(str(config_path), out, "--resume")
    assert third.returncode == 0, third.stderr

    a = torch.load(os.path.join(tmp_path / "whole", "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert a["position"] == b["position"] and a["position"]["stage"] == "done"
    for part in ("model", "optimizer", "scaler", "classifier", "optimizer2", "rng"):
        tensors_equal(a[part], b[part], part)
    for name in ("best.pt", "stage1.pt"):
        best_a = torch.load(tmp_path / "whole" / name, weights_only=False)
        best_b = torch.load(tmp_path / "killed" / name, weights_only=False)
        tensors_equal({k: v for k, v in best_a.items() if k != "config"},
                      {k: v for k, v in best_b.items() if k != "config"}, name)
    assert int(a["model"]["bank.total_enqueued"]) > cfg["stage1"]["queue_size"]  # warm-up + training
    # The logs agree line for line (records after a checkpoint were dropped and redone).
    log_a = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert log_a == (tmp_path / "killed" / "metrics.jsonl").read_text()
    assert len([r for r in log_a.splitlines() if '"stage1"' in r]) == 2 * steps
    report_a = json.loads((tmp_path / "whole" / "report.json").read_text())
    report_b = json.loads((tmp_path / "killed" / "report.json").read_text())
    for key in ("top1", "many", "medium", "few", "beta", "class_accuracy"):
        assert report_a[key] == report_b[key]


def test_the_script_end_to_end_from_another_folder(tmp_path):
    """`python references/kcl/train.py` as documented, from outside the repository: both
    stages, evaluate-only, export."""
    root = make_fashion_idx(str(tmp_path / "fm"))
    cfg = tiny_config(root, stage1={"epochs": 1}, stage2={"epochs": 1})
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def script(name, *args):
        return subprocess.run([sys.executable, os.path.join(RECIPE, name), *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    done = script("train.py", "--config", str(config_path), "--out", "run")
    assert done.returncode == 0, done.stderr
    assert "| kcl (seed 3) |" in done.stdout and (tmp_path / "run" / "report.json").exists()
    evaluated = script("train.py", "--out", "run", "--evaluate", "last")
    assert evaluated.returncode == 0, evaluated.stderr
    exported = script("export.py", "--out", "run", "--to", "backbone.pt", "--which", "stage1")
    assert exported.returncode == 0, exported.stderr
    missing = script("train.py", "--config", "configs/nope.yaml", "--out", "x")
    assert missing.returncode == 2 and "looked for" in missing.stderr


def test_resume_without_checkpoint_starts_fresh_and_unknown_key_fails(tmp_path):
    root = make_fashion_idx(str(tmp_path / "fm"))
    cfg = tiny_config(root, stage1={"loss": "ce", "epochs": 1}, stage2={"epochs": 1})
    config_path = tmp_path / "ce.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    done = train_cli(str(config_path), str(tmp_path / "ce"), "--resume")
    assert done.returncode == 0, done.stderr
    assert "| ce (seed 3) |" in done.stdout
    assert (tmp_path / "ce" / "per_class.png").exists()
    bad = train_cli(str(config_path), str(tmp_path / "x"), "--set", "stage1.kk=3")
    assert bad.returncode != 0 and "unknown config key 'stage1.kk'" in bad.stderr
