"""references/kcl/train.py as a user meets it: the output folder guard, resume with a changed
config, the log of a non-terminal run, evaluate-only, stage 2 on a given stage-1 checkpoint,
TensorBoard, a diverging run, --help, notes only about settings the user set, configs found from
anywhere, and the message when a package the recipe needs is missing.

The commands run in this process (`main` through `errors.run_command`, as `python train.py`
runs them), on the tiny generated data set."""
import json
import re
import sys
import types

import pytest
import torch
import yaml

from _harness import make_fashion_idx, tiny_config

import compare
import train
from data import long_tailed_counts
from errors import run_command


def cli(argv):
    return run_command(train.main, argv, "train.py")


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    return make_fashion_idx(str(tmp_path_factory.mktemp("fm")))


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def short(fm_root, **sections):
    sections.setdefault("stage1", {"epochs": 1})
    sections.setdefault("stage2", {"epochs": 1})
    return tiny_config(fm_root, **sections)


def test_non_empty_out_is_refused_without_resume_or_overwrite(fm_root, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", short(fm_root))
    out = str(tmp_path / "run")
    assert cli(["--config", config, "--out", out]) == 0
    first = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli(["--config", config, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"train.py: error: output folder {out} is not empty" in err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == first  # nothing touched
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert cli(["--config", config, "--out", out, "--overwrite"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == first  # afresh, same seed
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # not ours: left alone
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    assert cli(["--config", config, "--out", str(tmp_path / "other")]) == 2


def test_resume_refuses_a_changed_config_and_prints_the_difference(fm_root, tmp_path, capsys):
    cfg = tiny_config(fm_root)  # 2 epochs per stage
    config = write_config(tmp_path / "c.yaml", cfg)
    out = str(tmp_path / "run")
    assert cli(["--config", config, "--out", out]) == 0
    capsys.readouterr()
    assert cli(["--config", config, "--out", out, "--resume",
                     "--set", "stage2.lr=0.1", "--set", "stage1.k=3"]) == 2
    err = capsys.readouterr().err
    assert "--resume: this config differs" in err
    assert "stage1.k: 2 (checkpoint) -> 3 (now)" in err
    assert "stage2.lr: 0.5 (checkpoint) -> 0.1 (now)" in err
    # Settings that cannot change results may change.
    assert cli(["--config", config, "--out", out, "--resume",
                     "--set", "data.num_workers=1", "--set", "log_interval=5"]) == 0
    assert "data.num_workers: 0 (checkpoint) -> 1 (now)" in capsys.readouterr().err


def test_a_log_file_gets_one_line_per_epoch(fm_root, tmp_path, capsys):
    cfg = tiny_config(fm_root, progress="auto", eval={"every_epochs": 1, "batch_size": 64})
    config = write_config(tmp_path / "c.yaml", cfg)
    assert cli(["--config", config, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err  # not a terminal: no bars
    assert "\r" not in err
    stage1 = re.findall(r"^stage 1 \(kcl\) epoch (\d)/2: loss [\d.]+  lr [\d.e-]+  "
                        r"[\d.]+ img/s  data \d+%  [\d.]+s", err, re.M)
    stage2 = re.findall(r"^stage 2 epoch (\d)/2: loss [\d.]+  lr [\d.e-]+  [\d.]+ img/s", err,
                        re.M)
    assert stage1 == ["1", "2"] and stage2 == ["1", "2"]
    assert re.search(r"^stage 1 \(kcl\) epoch 1/2: .* ETA [\d.]+s$", err, re.M)
    timing = [json.loads(x) for x in (tmp_path / "run" / "timing.jsonl").read_text().split("\n")
              if x]
    assert [(t["stage"], t["epoch"]) for t in timing] == [("stage1", 0), ("stage1", 1),
                                                          ("stage2", 0), ("stage2", 1)]
    assert all(t["images_per_s"] > 0 and 0 <= t["data_wait_fraction"] <= 1 for t in timing)


def test_evaluate_only_and_stage2_from_a_stage1_checkpoint(fm_root, tmp_path, capsys):
    cfg = short(fm_root, eval={"every_epochs": 1, "batch_size": 64})
    config = write_config(tmp_path / "c.yaml", cfg)
    assert cli(["--config", config, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    for key in ("commit", "versions", "device", "date"):
        assert key in report["provenance"]
    assert report["best"]["epoch"] == 1 and report["best"]["split"] == "test"

    assert cli(["--out", str(tmp_path / "a"), "--evaluate", "best"]) == 0
    best = json.loads((tmp_path / "a" / "report_best.json").read_text())
    assert best["top1"] == report["best"]["top1"] == report["top1"]  # one epoch: best = last
    assert best["class_accuracy"] == report["class_accuracy"]

    # Another classifier (not class-balanced, 2 epochs) on the same backbone, no stage 1.
    other = dict(cfg, stage2={**cfg["stage2"], "class_balanced": False, "epochs": 2})
    config2 = write_config(tmp_path / "c2.yaml", other)
    assert cli(["--config", config2, "--out", str(tmp_path / "b"),
                     "--stage1", str(tmp_path / "a")]) == 0
    a = torch.load(tmp_path / "a" / "stage1.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name  # the same backbone, untouched
    steps = sum(long_tailed_counts(10, 40, 10)) // 16
    assert b["position"]["global_step"] == 2 * steps  # stage-2 steps only
    assert "stage1" not in {json.loads(x)["stage"] for x in
                            (tmp_path / "b" / "metrics.jsonl").read_text().split("\n") if x}
    report_b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report_b["stage1_from"].endswith("stage1.pt")

    # A stage-1 checkpoint of another model is refused, naming the difference.
    capsys.readouterr()
    mismatch = dict(cfg, model={**cfg["model"], "width": 8})
    config3 = write_config(tmp_path / "c3.yaml", mismatch)
    assert cli(["--config", config3, "--out", str(tmp_path / "c"),
                     "--stage1", str(tmp_path / "a")]) == 2
    assert "model.width: 4 (stage-1 run) -> 8 (this config)" in capsys.readouterr().err


def test_tensorboard_scalars_when_importable(fm_root, tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    cfg = short(fm_root, tensorboard=True)
    assert cli(["--config", write_config(tmp_path / "c.yaml", cfg),
                     "--out", str(tmp_path / "run")]) == 0
    tags = {c[0] for c in calls}
    assert calls[0] == ("dir", str(tmp_path / "run" / "tensorboard")) and calls[-1] == ("closed",)
    assert {"stage1/loss", "stage1/lr", "stage2/loss", "stage1_timing/images_per_s",
            "eval/top1", "eval/beta"} <= tags


def test_a_diverging_run_stops_with_an_error(fm_root, tmp_path, capsys):
    cfg = short(fm_root, stage1={"loss": "ce", "epochs": 1, "lr": 1e30})
    assert cli(["--config", write_config(tmp_path / "c.yaml", cfg),
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"the stage1 loss is (nan|inf) .* training diverged .* lower stage1.lr", err)
    assert not (tmp_path / "run" / "report.json").exists()


def test_help_has_no_test_only_flags(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = capsys.readouterr().out
    assert "--stop-at-step" not in text and "kill" not in text
    for flag in ("--overwrite", "--resume", "--stage1", "--evaluate", "--set"):
        assert flag in text


def test_missing_package_names_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    assert cli(["--config", "whatever.yaml"]) == 2
    err = capsys.readouterr().err
    assert "pip install pyyaml" in err
    assert "Traceback" not in err and "ModuleNotFoundError" not in err


def test_compare_prints_a_dash_for_an_empty_group(tmp_path, capsys):
    reports = []
    for seed in (0, 1):
        path = tmp_path / f"r{seed}.json"
        path.write_text(json.dumps({
            "seed": seed, "many": None, "medium": 60.0, "few": 10.0 + seed, "top1": 70.0,
            "beta": 0.5, "sigma": 0.1,
            "thresholds": {"many": "> 100", "medium": "20..100", "few": "< 20"}}))
        reports.append(str(path))
    assert run_command(compare.main, [f"X={','.join(reports)}"], "compare.py") == 0
    out = capsys.readouterr().out
    assert "| X, mean ± std over 2 seeds | - | 60.0 ± 0.0 | 10.5 ± 0.5 |" in out
    assert "None" not in out


def test_evaluate_best_after_a_default_run_evaluates_the_last_classifier(fm_root, tmp_path,
                                                                          capsys):
    # eval.every_epochs is 0 by default: no periodic evaluation, so no best.pt.
    config = write_config(tmp_path / "c.yaml", short(fm_root))
    out = tmp_path / "run"
    assert cli(["--config", config, "--out", str(out)]) == 0
    assert not (out / "best.pt").exists()
    report = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    assert cli(["--out", str(out), "--evaluate", "best"]) == 0
    err = capsys.readouterr().err
    assert "has no best.pt" in err and "evaluating the last classifier" in err
    last = json.loads((out / "report_last.json").read_text())
    assert last["checkpoint"] == "last" and last["class_accuracy"] == report["class_accuracy"]


def test_notes_only_about_settings_the_user_set(fm_root, tmp_path, capsys):
    # One process, one BN group: shuffle-BN cannot act. A note only if the user asked for it.
    cfg = short(fm_root, progress="line", model={**tiny_config(fm_root)["model"], "bn_splits": 1})
    assert cli(["--config", write_config(tmp_path / "c.yaml", cfg),
                "--out", str(tmp_path / "default")]) == 0
    assert "shuffle_bn" not in capsys.readouterr().err
    assert cli(["--config", write_config(tmp_path / "c.yaml", cfg), "--out",
                str(tmp_path / "set"), "--set", "model.shuffle_bn=true"]) == 0
    assert "note: model.shuffle_bn has no effect" in capsys.readouterr().err


def test_config_files_are_found_from_anywhere(tmp_path, monkeypatch):
    from config import load_config
    from errors import MissingFileError
    monkeypatch.chdir(tmp_path)  # not the repository
    cfg = load_config("configs/fmnist_lt_kcl.yaml")
    assert cfg.stage1.loss == "kcl" and cfg.model.bn_splits == 2
    assert load_config("fmnist_lt_ce.yaml").stage1.loss == "ce"
    with pytest.raises(MissingFileError, match=r"config file configs/nope.yaml not found \(looked "
                                               r"for .*nope.yaml and .*references.kcl"):
        load_config("configs/nope.yaml")
