"""DDP on 2 gloo processes (loopback): equality with 1 process, and shuffle-BN.

The equality test runs twice: with GroupNorm (model.norm: gn), whose statistics are per sample, so
splitting a global batch across processes changes no activation; and with BatchNorm in two BN
groups per global batch (model.bn_splits: 2), which one process forms with split-BN and two
processes form by each normalising its half, the keys shuffled across the groups the same way in
both, and the running statistics averaged over the groups in both. It uses the fcl loss (k = -1,
all same-class entries): kcl's positive draw is keyed by the row index within a process's batch, so
a 2-process run draws other (equally uniform) positives than a 1-process run. What remains
different is the order of floating-point sums (gradient all-reduce versus one batch mean), hence a
tolerance instead of bitwise equality.
"""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from _harness import RECIPE, ROOT, free_port, init_gloo, make_fashion_idx, tiny_config

import kcl_ext
import train
from config import load_config
from models import ContrastiveEncoder, SmallResNet


def _ddp_run(rank, world, port, cfg, out):
    init_gloo(rank, world, port)
    try:
        train.train(cfg, out)
    finally:
        torch.distributed.destroy_process_group()


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, norm):
    root = make_fashion_idx(str(tmp_path / "fm"))
    model = {"norm": "gn", "bn_splits": 1} if norm == "gn" else {"norm": "bn", "bn_splits": 2}
    cfg = load_config(base=tiny_config(root, model=model, stage1={"loss": "fcl"},
                                       eval={"batch_size": 64, "every_epochs": 1}))
    train.train(cfg, str(tmp_path / "one"))
    mp.spawn(_ddp_run, args=(2, free_port(), cfg, str(tmp_path / "two")), nprocs=2)

    one, two = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "two"))
    assert len(one) == len(two) > 10
    for (stage_a, step_a, loss_a), (stage_b, step_b, loss_b) in zip(one, two):
        assert (stage_a, step_a) == (stage_b, step_b)
        assert abs(loss_a - loss_b) <= 1e-4 * max(1.0, abs(loss_a)), (step_a, loss_a, loss_b)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert torch.equal(a["model"]["bank.labels"], b["model"]["bank.labels"])
    assert torch.equal(a["model"]["bank.pointer"], b["model"]["bank.pointer"])
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], atol=1e-4), name
    if norm == "bn":  # the running statistics moved, and equally
        assert not torch.equal(a["model"]["query_encoder.backbone.stem.1.running_var"],
                               torch.ones(4))
    assert torch.allclose(a["classifier"]["weight"], b["classifier"]["weight"], atol=1e-4)
    report_a = json.loads((tmp_path / "one" / "report.json").read_text())
    report_b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report_a["class_accuracy"] == report_b["class_accuracy"]  # sharded evaluation
    assert report_b["provenance"]["device"]["processes"] == 2


def _shuffle_bn_worker(rank, world, port, result):
    init_gloo(rank, world, port)
    try:
        torch.manual_seed(0)  # the same encoder on both processes
        pair = kcl_ext.KCL(ContrastiveEncoder(SmallResNet(1, 4, 1, "bn", 2), 8), 8, queue_size=8)
        images = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(rank))
        everything = torch.cat([torch.randn(3, 1, 12, 12,
                                            generator=torch.Generator().manual_seed(r))
                                for r in range(world)])
        # Eval first, while both processes hold the same BN running statistics (train-mode
        # calls update them with each process's own chunk, as in MoCo).
        pair.eval()
        plain = torch.nn.functional.normalize(pair.key_encoder(images), dim=1)
        shuffled_eval = pair.encode_keys(images, torch.Generator().manual_seed(7))
        pair.train()
        keys = pair.encode_keys(images, torch.Generator().manual_seed(7))
        # Expected: process c encodes the c-th chunk of the permuted global batch with that
        # chunk's BN statistics; the keys come back to the process that holds the images.
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            encoded = torch.cat([pair.key_encoder(chunk) for chunk in everything[perm].chunk(2)])
            encoded = torch.nn.functional.normalize(encoded, dim=1)  # KCL's keys are unit-norm
            unshuffled_train = torch.nn.functional.normalize(pair.key_encoder(images), dim=1)
        expected = torch.empty_like(encoded)
        expected[perm] = encoded
        result[rank] = (keys, expected.chunk(2)[rank], plain, shuffled_eval, unshuffled_train)
    finally:
        torch.distributed.destroy_process_group()


def test_shuffle_bn_encodes_keys_with_another_chunks_statistics():
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_shuffle_bn_worker, args=(2, free_port(), result), nprocs=2)
        result = dict(result)
    for rank in range(2):
        keys, expected, plain, shuffled_eval, unshuffled_train = result[rank]
        assert torch.allclose(keys, expected, atol=1e-6)
        assert torch.allclose(shuffled_eval, plain, atol=1e-6)  # eval BN: the shuffle is exact
        assert not torch.allclose(keys, unshuffled_train, atol=1e-3)  # other batch statistics


def test_cli_under_torchrun_on_loopback(tmp_path):
    """`torchrun references/kcl/train.py`: the run joins the group torchrun describes (gloo),
    and our code prints no warning (torch >= 2.13 deprecates DDP's broadcast_buffers)."""
    import subprocess
    import sys

    import yaml

    root = make_fashion_idx(str(tmp_path / "fm"))
    cfg = tiny_config(root, stage1={"epochs": 1}, stage2={"epochs": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
         os.path.join(RECIPE, "train.py"), "--config", str(tmp_path / "c.yaml"),
         "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| kcl (seed 3) |") == 1  # the table comes from rank 0 only
    assert "Warning" not in done.stderr, done.stderr[-3000:]
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert state["position"]["stage"] == "done" and (state["model"]["bank.labels"] >= 0).all()
