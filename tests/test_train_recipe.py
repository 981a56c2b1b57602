"""The paper's ResNet-50 recipe: the config holds every value of the recipe table, and two
iterations of each stage run at 32 px with batch 4 on a generated split-list image tree."""
import os

import numpy as np
import torch
from PIL import Image

from kcl_ext import train
from kcl_ext.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "imagenet_lt_r50.yaml")


def test_recipe_config_holds_every_value_of_the_recipe_table():
    cfg = load_config(RECIPE)
    s1, s2, m = cfg["stage1"], cfg["stage2"], cfg["model"]
    assert (s1["loss"], s1["k"], s1["epochs"], s1["batch_size"]) == ("kcl", 6, 200, 256)
    assert (s1["lr"], s1["momentum"], s1["schedule"], s1["weight_decay"]) == \
        (0.1, 0.9, "cosine", 5e-4)
    assert (s1["temperature"], s1["queue_size"]) == (0.07, 65536)
    assert (m["arch"], m["momentum"], m["dim"], m["mlp_head"]) == ("resnet50", 0.999, 128, False)
    assert (cfg["data"]["image_size"], cfg["data"]["crop_scale"]) == (224, [0.08, 1.0])
    assert (s2["lr"], s2["weight_decay"], s2["epochs"], s2["milestones"], s2["gamma"]) == \
        (30.0, 0.0, 100, [60, 80], 0.1)
    assert (s2["batch_size"], s2["init_std"], s2["class_balanced"]) == (256, 0.01, False)
    assert train.lr_at(s1, 0) == 0.1 and abs(train.lr_at(s1, 100) - 0.05) < 1e-12
    assert train.lr_at(s2, 59) == 30.0 and abs(train.lr_at(s2, 80) - 0.3) < 1e-9
    inat = load_config(os.path.join(ROOT, "configs", "inat2018_r50.yaml"))
    assert inat["data"]["num_classes"] == 8142
    assert inat["stage1"] == s1 and inat["stage2"] == s2 and inat["model"] == m


def test_resnet50_recipe_two_iterations_at_32px(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        rel = f"train/n{i % 2}/img{i}.JPEG"
        os.makedirs(tmp_path / "img" / os.path.dirname(rel), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            tmp_path / "img" / rel, format="JPEG")
        lines.append(f"{rel} {i % 2}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cfg = load_config(RECIPE, [
        f"data.image_root={tmp_path / 'img'}", f"data.train_list={tmp_path / 'train.txt'}",
        f"data.test_list={tmp_path / 'train.txt'}", "data.num_classes=2",
        "data.image_size=32", "data.num_workers=0", "stage1.batch_size=4", "stage1.epochs=1",
        "stage1.queue_size=8", "stage2.batch_size=4", "stage2.epochs=1", "progress=false",
        "log_interval=1", "threads=1"])
    report = train.run(cfg, str(tmp_path / "out"))
    losses = [line for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 4  # two iterations of each stage
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert state["position"]["global_step"] == 4 and len(state["bank"]["labels"]) == 8
    assert (state["bank"]["labels"] >= 0).all()  # warmed up, then refilled by the two steps
    assert state["model"]["query_encoder.head.weight"].shape == (128, 2048)
    assert 0.0 <= report["top1"] <= 100.0 and report["train_counts"] == [4, 4]
