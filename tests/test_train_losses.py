"""Each stage-1 loss name maps to the right kpos_loss k, and a moco run goes through both stages."""
import json

import pytest
import torch

from _harness import make_fashion_idx, tiny_config

import train
from config import load_config
from errors import ConfigError


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    return make_fashion_idx(str(tmp_path_factory.mktemp("fm")))


@pytest.mark.parametrize("loss, k", [("kcl", 2), ("fcl", -1), ("moco", 0)])
def test_loss_names_map_to_k(fm_root, tmp_path, loss, k):
    cfg = load_config(base=tiny_config(fm_root, stage1={"loss": loss}))
    run = train.setup(cfg, str(tmp_path))
    assert run.model.k == k and run.model.bank.size == 48


def test_moco_run_both_stages(fm_root, tmp_path):
    cfg = load_config(base=tiny_config(fm_root, stage1={"loss": "moco", "epochs": 1},
                                       stage2={"epochs": 1, "class_balanced": False,
                                               "augment": True}))
    report = train.train(cfg, str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("stage") == "stage1"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert records[-1]["stage"] == "eval" and records[-1]["top1"] == report["top1"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (state["model"]["bank.labels"] >= 0).all()
    assert {"beta", "few", "many", "medium", "top1", "class_accuracy"} <= set(report)
    assert report["many"] is None  # no class of the tiny set has more than 100 images


def test_bad_config_values_are_rejected(fm_root):
    with pytest.raises(ConfigError, match="'stage1.loss': expected one of 'kcl', 'fcl', "
                                          "'moco', 'ce', got 'supcon'"):
        load_config(base=tiny_config(fm_root, stage1={"loss": "supcon"}))
    with pytest.raises(ConfigError, match="'stage1.k': expected an integer >= 1, got 0"):
        load_config(base=tiny_config(fm_root, stage1={"k": 0}))
    with pytest.raises(ConfigError, match="unknown config key 'model.depth'"):
        load_config(base=tiny_config(fm_root, model={"depth": 3}))
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        load_config(overrides=["stage1.epochs"])
