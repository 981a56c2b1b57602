"""The backbone of a run as a state dict that torchvision's ResNet loads.

    python references/kcl/export.py --out runs/kcl --to resnet50_kcl.pt [--which best|last|stage1]
"""
from __future__ import annotations

import argparse
import sys

from checkpoint import export
from errors import run_command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="export.py",
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


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "export.py"))
