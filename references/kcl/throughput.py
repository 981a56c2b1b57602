"""Stage-1 training throughput: images/s and the fraction of each step spent waiting for data.

    python references/kcl/throughput.py --synthetic --arch resnet50 --amp bf16 \\
        --batch-size 256 --device cuda --steps 40 --json throughput.json

It builds the run of a config (train.setup) (`--config`, default: the built-in defaults) and runs
`--warmup` + `--steps` stage-1 steps of the real pipeline: loader workers cropping, resizing and
flipping uint8 images, collation (into pinned memory on CUDA), the non-blocking copy, the
normalisation on the device, the encoders (channels_last, cudnn.benchmark, AMP, optionally
torch.compile as the config says), the loss and the optimiser step. The bank is filled with
random unit keys instead of the warm-up passes. `--synthetic` feeds seeded random images
(`data.kind: synthetic`, no file reading or JPEG decoding); without it the config's own data set
is read. Synthetic images take the shape of the config's data set (Fashion-MNIST: 1 channel,
28 px, 10 classes; otherwise, and without --config, 3 channels at image_size / 0.875,
data.num_classes or 1000 classes).

Measured over the timed steps only (the warm-up steps absorb cudnn.benchmark's search and the
compilation): images/s = steps * global batch / wall time, with the device synchronised at both
ends and nowhere in between; data wait = the time the host blocks in the loader's next(), per
step and as a fraction of the wall time. The JSON also holds the device, the versions, the
commit and the 1-minute load average.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from kcl_ext import distributed as kdist
import data as kdata
import provenance
import train
from config import load_config
from errors import run_command


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, steps: int, warmup: int) -> dict:
    """Runs warmup + steps stage-1 steps of `cfg`; returns the measurement."""
    run = train.setup(cfg, out_dir=None)
    s1 = cfg.stage1
    views = train.stage1_views(run)
    if run.contrastive:
        bank = run.model.bank
        g = torch.Generator().manual_seed(cfg.seed)
        keys = torch.nn.functional.normalize(torch.randn(bank.keys.shape, generator=g), dim=1)
        labels = torch.randint(0, run.data.num_classes, (bank.size,), generator=g)
        bank.enqueue(keys.to(run.device), labels.to(run.device))
    total = warmup + steps
    batches = []
    epoch = 0
    while len(batches) < total:
        batches += kdata.shuffled_batches(len(views), s1.batch_size,
                                          cfg.seed, epoch)
        epoch += 1
    local = train.local_batches(run, batches[:total])
    loader = run.pool.get("stage1", views, local, epoch=0)
    run.model.train()
    waits, step_times = [], []
    iterator = iter(loader)
    started = None
    last = time.perf_counter()
    for step in range(total):
        if step == warmup:
            _sync(run.device)
            kdist.barrier()
            started = last = time.perf_counter()
        t0 = time.perf_counter()
        item = next(iterator)
        wait = time.perf_counter() - t0
        train.train_step(run, item)
        if step >= warmup:
            now = time.perf_counter()
            waits.append(wait)
            step_times.append(now - last)
            last = now
    _sync(run.device)
    wall = time.perf_counter() - started
    run.pool.close()
    images = steps * s1.batch_size
    return {
        "images_per_s": round(images / wall, 2),
        "data_wait_fraction": round(sum(waits) / wall, 4),
        "data_wait_ms_median": round(1000 * statistics.median(waits), 3),
        "step_ms_median_host": round(1000 * statistics.median(step_times), 3),
        "wall_s": round(wall, 3),
        "steps": steps, "warmup_steps": warmup, "global_batch": s1.batch_size,
        "processes": kdist.world_size(),
        "per_step": [{"data_wait_ms": round(1000 * w, 3), "host_ms": round(1000 * t, 3)}
                     for w, t in zip(waits, step_times)],
        "config": {"arch": cfg.model.arch, "loss": s1.loss, "k": s1.k,
                   "queue_size": s1.queue_size, "image_size": cfg.data.image_size,
                   "data": cfg.data.kind, "num_workers": cfg.data.num_workers,
                   "amp": cfg.amp if run.device.type == "cuda" else "off (CPU)",
                   "channels_last": run.channels_last, "compile": cfg.compile,
                   "bn_splits": cfg.model.bn_splits, "backend": s1.backend,
                   "device": str(run.device)},
        "provenance": provenance.describe(run.device, kdist.world_size()),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the built-in defaults)")
    p.add_argument("--synthetic", action="store_true",
                   help="seeded random images instead of the config's data set")
    p.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--arch", help="model.arch (small_resnet, resnet50, ...)")
    p.add_argument("--batch-size", type=int, help="stage1.batch_size (global)")
    p.add_argument("--image-size", type=int, help="data.image_size")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), help="amp")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device")
    p.add_argument("--num-workers", type=int, help="data.num_workers")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config value (repeatable)")
    p.add_argument("--json", help="also write the result to this JSON file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        build_parser().error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, "
                             f"{args.warmup}")
    overrides = ["progress=none", "tensorboard=false"]
    if args.synthetic:
        # Synthetic images shaped like the config's data set.
        own = load_config(args.config, args.overrides).data
        overrides += ["data.kind=synthetic", "data.dataset=null"]
        if args.config and own.kind == "fashion_mnist_lt":
            overrides += ["data.num_classes=10", "data.synthetic_channels=1",
                          f"data.synthetic_source_size={own.image_size}"]
        elif own.num_classes is None:
            overrides.append("data.num_classes=1000")
    for flag, key in (("arch", "model.arch"), ("batch_size", "stage1.batch_size"),
                      ("image_size", "data.image_size"), ("amp", "amp"), ("device", "device"),
                      ("num_workers", "data.num_workers")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.compile:
        overrides.append("compile=true")
    cfg = load_config(args.config, overrides + args.overrides)
    if args.synthetic and cfg.data.synthetic_images < cfg.stage1.batch_size:
        cfg.data.synthetic_images = cfg.stage1.batch_size
    result = measure(cfg, args.steps, args.warmup)
    if kdist.is_main():
        c = result["config"]
        print(f"{c['arch']} {c['image_size']} px, {c['loss']} (k={c['k']}, queue "
              f"{c['queue_size']}), global batch {result['global_batch']}, {c['device']} "
              f"({result['provenance']['device'].get('name')}), amp {c['amp']}, "
              f"{c['num_workers']} workers, {c['data']} data: "
              f"{result['images_per_s']:.1f} images/s, data wait "
              f"{result['data_wait_fraction']:.1%} of {result['wall_s']:.1f} s over "
              f"{result['steps']} steps")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
    if kdist.is_distributed():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "throughput.py"))
