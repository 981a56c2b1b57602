"""Prints one table of Many / Medium / Few / All and beta for several runs' report.json files:
`python references/kcl/compare.py NAME=runs/x/report.json NAME2=runs/y/report.json
[--markdown FILE]`.

A NAME may name several reports (`NAME=a/report.json,b/report.json`, e.g. one per seed): the
table then has a row per report and a row with their mean and standard deviation. A shot group
without classes (or without a value in any report) shows as "-"."""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from metrics import format_table

COLUMNS = ("many", "medium", "few", "top1", "beta")


def mean_row(reports: list) -> dict:
    """{column: "mean ± std"} over reports (population std of the seeds' values); "-" where no
    report has a value."""
    row = {}
    for col in COLUMNS:
        values = [r[col] for r in reports if r.get(col) is not None]
        if not values:
            row[col] = "-"
            continue
        fmt = ".3f" if col == "beta" else ".1f"
        row[col] = f"{statistics.fmean(values):{fmt}} ± {statistics.pstdev(values):{fmt}}"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", metavar="NAME=REPORT_JSON[,REPORT_JSON...]")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    groups = {}
    for item in args.reports:
        name, sep, paths = item.partition("=")
        if not sep or not paths:
            p.error(f"expected NAME=REPORT_JSON[,REPORT_JSON...], got {item!r}")
        groups[name] = []
        for path in paths.split(","):
            try:
                with open(path, encoding="utf-8") as f:
                    groups[name].append(json.load(f))
            except (OSError, json.JSONDecodeError) as e:
                p.error(f"{name}: cannot read report {path}: {e}")
    rows = {}
    for name, reports in groups.items():
        for r in reports:
            rows[f"{name} (seed {r.get('seed', '?')})" if len(reports) > 1 else name] = r
    table = format_table(rows)
    if any(len(reports) > 1 for reports in groups.values()):
        lines = ["", "| run | Many | Medium | Few | All | beta |", "|---|---|---|---|---|---|"]
        for name, reports in groups.items():
            m = mean_row(reports)
            lines.append(f"| {name}, mean ± std over {len(reports)} seeds | {m['many']} | "
                         f"{m['medium']} | {m['few']} | {m['top1']} | {m['beta']} |")
        table += "\n" + "\n".join(lines)
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
