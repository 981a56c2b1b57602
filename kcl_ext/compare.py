"""Prints one table of Many / Medium / Few / All and beta for several runs' report.json files:
`python -m kcl_ext.compare NAME=runs/x/report.json NAME2=runs/y/report.json [--markdown FILE]`."""
from __future__ import annotations

import argparse
import json
import sys

from .metrics import format_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("reports", nargs="+", metavar="NAME=REPORT_JSON")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    rows = {}
    for item in args.reports:
        name, sep, path = item.partition("=")
        if not sep:
            p.error(f"expected NAME=REPORT_JSON, got {item!r}")
        with open(path, encoding="utf-8") as f:
            rows[name] = json.load(f)
    table = format_table(rows)
    first = next(iter(rows.values()))
    note = (f"Shot groups by training images: Many {first['thresholds']['many']}, Medium "
            f"{first['thresholds']['medium']}, Few {first['thresholds']['few']}; accuracies in %, "
            f"beta of eq. 3 with sigma = {first['sigma']} (class accuracies as fractions).")
    print(table)
    print(note)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n\n" + note + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
