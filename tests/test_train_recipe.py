"""The paper's ResNet-50 recipe: the configs hold every value of the recipe table, the variants
differ only where they should, and two iterations of each stage run at 64 px with batch 4 on a
generated split-list image tree; the exported backbone loads into torchvision's ResNet-50."""
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from _harness import RECIPE

import datasets
import train
from config import differences, load_config
from data import INAT2018_MEAN, INAT2018_STD
from errors import run_command
from schedule import lr_at

CONFIGS = os.path.join(RECIPE, "configs")
IMAGENET_LT_KCL = os.path.join(CONFIGS, "imagenet_lt_kcl_r50.yaml")


def config(name):
    return load_config(os.path.join(CONFIGS, name))


def test_recipe_config_holds_every_value_of_the_recipe_table():
    cfg = load_config(IMAGENET_LT_KCL)
    s1, s2, m = cfg.stage1, cfg.stage2, cfg.model
    assert (s1.loss, s1.k, s1.epochs, s1.batch_size) == ("kcl", 6, 200, 256)
    assert (s1.lr, s1.momentum, s1.schedule, s1.weight_decay) == \
        (0.1, 0.9, "cosine", 5e-4)
    assert (s1.temperature, s1.queue_size) == (0.07, 65536)
    assert (m.arch, m.momentum, m.dim, m.mlp_head) == ("resnet50", 0.999, 128, False)
    assert (m.shuffle_bn, m.bn_splits) == (True, 8)  # 8 GPUs x 32 in the official runs
    assert (cfg.data.image_size, cfg.data.crop_scale) == (224, [0.08, 1.0])
    assert (s2.lr, s2.weight_decay, s2.epochs, s2.milestones, s2.gamma) == \
        (30.0, 0.0, 100, [60, 80], 0.1)
    assert (s2.batch_size, s2.init_std, s2.class_balanced) == (256, 0.01, False)
    assert lr_at(s1, 0) == 0.1 and abs(lr_at(s1, 100) - 0.05) < 1e-12
    assert lr_at(s2, 59) == 30.0 and abs(lr_at(s2, 80) - 0.3) < 1e-9


def test_variants_differ_only_where_they_should():
    kcl, kcl_cb = config("imagenet_lt_kcl_r50.yaml"), config("imagenet_lt_kcl_r50_cb.yaml")
    changed = {name for name, _, _ in differences(kcl, kcl_cb)}
    assert changed and all(n.startswith(("stage2.", "eval.")) for n in changed), changed
    s2 = kcl_cb.stage2  # TSC's main_lincls_imba.py
    assert (s2.class_balanced, s2.samples_per_class, s2.lr, s2.batch_size,
            s2.epochs, s2.milestones) == (True, 4, 10.0, 2048, 40, [20, 30])
    for loss, official, balanced in (("fcl", "imagenet_lt_fcl_r50.yaml",
                                      "imagenet_lt_fcl_r50_cb.yaml"),):
        assert [d[0] for d in differences(kcl, config(official))] == ["stage1.loss"]
        assert [d[0] for d in differences(kcl_cb, config(balanced))] == ["stage1.loss"]
    ce, ce_cb = config("imagenet_lt_ce_r50.yaml"), config("imagenet_lt_ce_r50_cb.yaml")
    assert (ce.stage1.loss, ce.stage1.epochs, ce.stage1.schedule) == \
        ("ce", 90, "cosine")
    assert (ce.stage2.class_balanced, ce.stage2.epochs, ce.stage2.lr) == \
        (True, 10, 0.1)  # cRT, as the official main_sl.py command
    assert ce_cb.stage2 == kcl_cb.stage2 and ce_cb.stage1 == ce.stage1
    inat = config("inat2018_kcl_r50.yaml")
    assert inat.data.num_classes == 8142 and inat.data.dataset == "inat2018"
    assert inat.stage1 == kcl.stage1 and inat.stage2 == kcl.stage2
    assert config("inat2018_kcl_r50_cb.yaml").stage2 == kcl_cb.stage2


def test_inat_uses_its_own_normalisation_and_checks_its_published_split(tmp_path):
    rel = "train_val2018/Plantae/1/a.jpg"
    os.makedirs(tmp_path / os.path.dirname(rel))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / rel)
    (tmp_path / "l.txt").write_text(f"{rel} 1\n")
    cfg = load_config(os.path.join(CONFIGS, "inat2018_kcl_r50.yaml"), [
        f"data.image_root={tmp_path}", f"data.train_list={tmp_path / 'l.txt'}",
        f"data.test_list={tmp_path / 'l.txt'}", "data.dataset=null"])
    bundle = datasets.build_data(cfg)
    assert (bundle.mean, bundle.std) == (INAT2018_MEAN, INAT2018_STD)
    assert bundle.num_classes == 8142
    cfg.data.dataset = "inat2018"
    with pytest.raises(ValueError, match="1 images, the published iNaturalist 2018 train split "
                                         "has 437,513"):
        datasets.build_data(cfg)


def test_resnet50_recipe_two_iterations_at_64px_and_torchvision_export(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        rel = f"train/n{i % 2}/img{i}.JPEG"
        os.makedirs(tmp_path / "img" / os.path.dirname(rel), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(
            tmp_path / "img" / rel, format="JPEG")
        lines.append(f"{rel} {i % 2}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cfg = load_config(IMAGENET_LT_KCL, [
        f"data.image_root={tmp_path / 'img'}", f"data.train_list={tmp_path / 'train.txt'}",
        f"data.test_list={tmp_path / 'train.txt'}", "data.val_list=null", "data.dataset=null",
        "data.num_classes=2", "data.image_size=64", "data.num_workers=0",
        "stage1.batch_size=4", "stage1.epochs=1", "model.bn_splits=2",
        "stage1.queue_size=8", "stage2.batch_size=4", "stage2.epochs=1", "stage2.lr=0.1",
        "progress=none",
        "log_interval=1", "threads=1"])
    report = train.train(cfg, str(tmp_path / "out"))
    losses = [line for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 4  # two iterations of each stage
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert state["position"]["global_step"] == 4 and len(state["model"]["bank.labels"]) == 8
    assert (state["model"]["bank.labels"] >= 0).all()  # warmed up, then refilled by the two steps
    assert state["model"]["query_encoder.head.weight"].shape == (128, 2048)
    assert 0.0 <= report["top1"] <= 100.0 and report["train_counts"] == [4, 4]
    assert report["provenance"]["versions"]["torch"] == torch.__version__

    import export
    assert run_command(export.main, ["--out", str(tmp_path / "out"), "--to",
                                     str(tmp_path / "r50.pt")], "export.py") == 0
    net = torchvision.models.resnet50(num_classes=2)
    net.load_state_dict(torch.load(tmp_path / "r50.pt"))  # strict: every key, fc = classifier
    assert torch.equal(net.fc.weight, state["classifier"]["weight"])
    assert torch.equal(net.layer4[2].bn3.running_var,
                       state["model"]["query_encoder.backbone.net.layer4.2.bn3.running_var"])
