"""Puts the four Fashion-MNIST IDX files in a folder (default data/fashion-mnist), checked.

    python references/kcl/get_data.py [--out data/fashion-mnist]          (make data)

Where they come from, the first that works:
1. a folder that already holds them (`--from`, default /usr/share/datasets/fashion-mnist, where
   the Debian package dataset-fashion-mnist installs them: `apt-get install dataset-fashion-mnist`
   on Debian or Ubuntu, as root);
2. torchvision's download of FashionMNIST (needs a network; torchvision checks the MD5 of each
   download).
Every file is then checked against datasets.FASHION_MNIST: the size and MD5 of its decompressed
content. Without a source, it says what to do and exits with status 1.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import sys
import tempfile

from datasets import FASHION_MNIST

SYSTEM_FOLDER = "/usr/share/datasets/fashion-mnist"


def problem(path: str) -> str | None:
    """Why the file at `path` is not the Fashion-MNIST file of its name (None: it is)."""
    size, md5 = FASHION_MNIST[os.path.basename(path)]
    try:
        with gzip.open(path, "rb") as f:
            content = f.read()
    except (OSError, EOFError) as e:
        return f"{path}: not a readable gzip file ({e})"
    if len(content) != size or hashlib.md5(content).hexdigest() != md5:
        return (f"{path}: decompressed {len(content)} bytes with MD5 "
                f"{hashlib.md5(content).hexdigest()}, expected {size} bytes with MD5 {md5}")
    return None


def copy_from(folder: str, out: str) -> bool:
    if not all(os.path.isfile(os.path.join(folder, name)) for name in FASHION_MNIST):
        return False
    for name in FASHION_MNIST:
        shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))
    print(f"copied the Fashion-MNIST files from {folder}")
    return True


def download(out: str) -> bool:
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError:
        print("torchvision is not installed: cannot download", file=sys.stderr)
        return False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for train in (True, False):
                FashionMNIST(tmp, train=train, download=True)
        except Exception as e:  # the network, a mirror, a checksum: all end here
            print(f"torchvision could not download Fashion-MNIST: {e}", file=sys.stderr)
            return False
        raw = os.path.join(tmp, "FashionMNIST", "raw")
        return copy_from(raw, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="get_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/fashion-mnist", help="folder to fill")
    p.add_argument("--from", dest="source", default=SYSTEM_FOLDER,
                   help=f"a folder holding the four .gz files (default {SYSTEM_FOLDER})")
    p.add_argument("--no-download", action="store_true", help="never download")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    targets = [os.path.join(args.out, name) for name in FASHION_MNIST]
    if all(os.path.isfile(t) for t in targets) and not any(map(problem, targets)):
        print(f"{args.out}: the four Fashion-MNIST files are there and check out")
        return 0
    if not copy_from(args.source, args.out) and \
            (args.no_download or not download(args.out)):
        print(f"get_data.py: error: no Fashion-MNIST files: none in {args.source} and no "
              f"download. Either install the Debian package (as root: apt-get install "
              f"dataset-fashion-mnist), or allow the download through torchvision (a "
              f"network), or put {', '.join(FASHION_MNIST)} into {args.out} yourself.",
              file=sys.stderr)
        return 1
    problems = [x for x in map(problem, targets) if x]
    if problems:
        print("get_data.py: error: " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"{args.out}: the four Fashion-MNIST files check out (sizes and MD5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
