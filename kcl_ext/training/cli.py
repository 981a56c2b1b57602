"""`kcl-train`: train, check data, evaluate, export, measure throughput, compare reports.

    kcl-train --config configs/X.yaml --out DIR [--resume | --overwrite] [--stage1 RUN]
              [--set KEY=VALUE ...]                  train both stages (the default command)
    kcl-train check-data --config X [--decode]     check split lists and images
    kcl-train evaluate --out DIR [--which best|last] evaluate a saved classifier on the test set
    kcl-train export --out DIR --to FILE [--which best|last|stage1]
                                                   the backbone as a torchvision state dict
    kcl-train throughput [--synthetic] ...         stage-1 images/s and data-wait fraction
    kcl-train compare NAME=report.json ...         one table of several runs
    kcl-train study --config S.yaml --out DIR      a paired study of several losses (make demo)

`python -m kcl_ext.train` is the same command. Every config value is checked before anything
trains; errors in the config, the data or the output folder are reported in one line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import TrainingError

# The packages of the `train` extra (pip install 'kcl_ext[train]'): module -> distribution.
TRAIN_EXTRA = {"yaml": "pyyaml", "torchvision": "torchvision", "tqdm": "tqdm",
               "matplotlib": "matplotlib"}
COMMANDS = ("train", "check-data", "evaluate", "export", "throughput", "compare", "study")


def missing_extras() -> list[str]:
    missing = []
    for module, distribution in TRAIN_EXTRA.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    return missing


def run_command(fn, argv) -> int:
    """Runs a command's main: missing extras and user errors become one line and status 2."""
    missing = missing_extras()
    if missing:
        print(f"kcl-train: error: the training harness needs the packages of the `train` extra, "
              f"missing here: {', '.join(missing)}. Install them with: "
              f"pip install 'kcl_ext[train]'", file=sys.stderr)
        return 2
    try:
        return fn(argv)
    except TrainingError as e:
        print(f"kcl-train: error: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kcl-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (configs/*.yaml); keys not given keep defaults")
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in OUT from its checkpoint.pt (a fresh start when "
                           "there is none); the config must be the run's, apart from settings "
                           "that cannot change results (num_workers, progress, ...)")
    mode.add_argument("--overwrite", action="store_true",
                      help="start afresh in a non-empty OUT, replacing the outputs of the run "
                           "there")
    p.add_argument("--stage1", metavar="RUN",
                   help="skip stage 1: take the backbone of a finished stage 1 (a run folder or "
                        "its stage1.pt) and train only the stage-2 classifier "
                        "(sets stage1.checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.epochs=3 (repeatable)")
    # Test-only: SIGKILL the process right after global step N (the kill/resume test).
    p.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _default_out(config: str | None) -> str:
    return os.path.join("runs", os.path.splitext(os.path.basename(config or "default"))[0])


def train_main(argv) -> int:
    from .. import distributed as kdist
    from . import metrics as kmetrics
    from .config import load_config
    from .trainer import run
    args = train_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.stage1:
        overrides.append(f"stage1.checkpoint={os.path.abspath(args.stage1)}")
    cfg = load_config(args.config, overrides)
    out = args.out or _default_out(args.config)
    try:
        report = run(cfg, out, args.resume, args.stop_at_step, overwrite=args.overwrite)
        if report is not None:
            print(kmetrics.format_table({f"{cfg['stage1']['loss']} (seed {cfg['seed']})": report}))
            print(f"report: {os.path.join(out, 'report.json')}")
    finally:
        if kdist.is_distributed():
            import torch
            torch.distributed.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------
# check-data
# ----------------------------------------------------------------------------------------------
def check_data_main(argv) -> int:
    from .config import load_config
    from .datacheck import PUBLISHED, check_data
    p = argparse.ArgumentParser(
        prog="kcl-train check-data",
        description="Checks the split lists of a config against the published figures of "
                    "data.dataset and against the images under data.image_root; every problem "
                    "names the list file and line.")
    p.add_argument("--config", required=True, help="YAML config with data.kind: split_list")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-images", action="store_true", help="check the lists only")
    p.add_argument("--decode", action="store_true", help="also decode every image (slow)")
    p.add_argument("--max-problems", type=int, default=30,
                   help="problems printed per list (default 30)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    d = cfg["data"]
    reports = check_data(d, check_images=not args.no_images, decode=args.decode)
    if d["dataset"]:
        published = PUBLISHED[d["dataset"]]
        print(f"data.dataset: {published.title} ({published.num_classes} classes); lists: "
              f"{published.lists}; layout: {published.layout}")
    else:
        print("data.dataset is null: no published figures to compare with")
    failed = 0
    for report in reports:
        print(report.summary())
        for problem in report.problems[:args.max_problems]:
            print(f"  {problem}")
        if len(report.problems) > args.max_problems:
            print(f"  ... and {len(report.problems) - args.max_problems} more problems")
        failed += len(report.problems)
    print(f"{failed} problem(s)" if failed else "all lists agree" +
          (" with the published figures" if d["dataset"] else "") +
          ("" if args.no_images else " and every image is there"))
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# evaluate, export
# ----------------------------------------------------------------------------------------------
def evaluate_main(argv) -> int:
    from . import checkpoint as ckpt
    from . import metrics as kmetrics
    from .config import load_config
    from .trainer import Trainer
    p = argparse.ArgumentParser(
        prog="kcl-train evaluate",
        description="Evaluates the classifier of a run on the test set (evaluate-only) and "
                    "writes OUT/report_<which>.json; the run's own config, with --set changes "
                    "(for instance data.test_list or data.image_root).")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--which", choices=("best", "last"), default="last",
                   help="best.pt (best periodic evaluation) or checkpoint.pt (default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    name = ckpt.BEST if args.which == "best" else ckpt.LAST
    saved = ckpt.load(os.path.join(args.out, name), f"{args.which} checkpoint")["config"]
    cfg = load_config(base=saved, overrides=args.overrides + ["stage1.checkpoint=null"])
    report = Trainer(cfg, args.out).evaluate_saved(args.which)
    if report is not None:
        print(kmetrics.format_table({f"{cfg['stage1']['loss']} ({args.which})": report}))
        print(f"report: {os.path.join(args.out, f'report_{args.which}.json')}")
    return 0


def export_main(argv) -> int:
    from .checkpoint import export
    p = argparse.ArgumentParser(
        prog="kcl-train export",
        description="Writes the backbone of a run as a state dict that torchvision's ResNet "
                    "loads: with --which best|last the stage-2 classifier is its fc "
                    "(torchvision.models.resnet50(num_classes=C).load_state_dict(...)); with "
                    "--which stage1 the backbone alone (load with strict=False: fc is missing).")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--to", required=True, help="file to write (e.g. resnet50_kcl.pt)")
    p.add_argument("--which", choices=("best", "last", "stage1"), default="last")
    args = p.parse_args(argv)
    info = export(args.out, args.which, args.to)
    print(f"wrote {args.to}: {info['arch']}, {info['tensors']} tensors"
          + (f", fc with {info['classes']} classes" if info["classes"] else ", no fc"))
    return 0


def _throughput_main(argv) -> int:
    from .throughput import main
    return main(argv)


def _compare_main(argv) -> int:
    from .compare import main
    return main(argv)


def _study_main(argv) -> int:
    from .study import main
    return main(argv)


HANDLERS = {"train": train_main, "check-data": check_data_main, "evaluate": evaluate_main,
            "export": export_main, "throughput": _throughput_main, "compare": _compare_main,
            "study": _study_main}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    return run_command(HANDLERS[command], argv)


if __name__ == "__main__":
    sys.exit(main())
