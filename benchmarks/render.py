"""Renders the committed benchmark tables into the README's benchmark section and two plots.

  python -m benchmarks.render [--results benchmarks/results] [--readme README.md]
                              [--report docs/benchmark_results.md]

For each benchmarks/results/<profile>.csv (with <profile>.meta.json beside it, written by
`python -m benchmarks.publish`): a table of time and peak extra memory against Q per
implementation, the speed-ups of the fused op over what users write instead (the dense loss eager
and compiled, SupCon's form, the chunked eager algorithm) and over the peers, measured in the same
run, with its distance to the GEMM bound, the rates at the headline shape beside the run's
ceilings, the scaling of the fused op in Q, and the plots
benchmarks/results/<profile>_time_vs_q.png and <profile>_memory_vs_q.png. All of it goes into the
report (docs/benchmark_results.md, rewritten whole); the README gets the headline only (the
speed-ups at N=256, Q=65536 and the time plot) between its two BENCHMARKS markers, and everything
else in the README is left as it is.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os

from benchmarks import results_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- BENCHMARKS:BEGIN (python -m benchmarks.render) -->", "<!-- BENCHMARKS:END -->"
HEADLINE = {"n": 256, "q": 65536, "d": 128, "dtype": "float32"}
MODES = ("forward", "forward+backward")
FUSED = ("fused_cpu", "cuda", "triton")
LABEL = {"fused_cpu": "fused C++ (CPU)", "cuda": "fused CUDA", "triton": "fused Triton",
         "reference": "reference (dense, eager)", "dense": "dense loss, eager",
         "dense_compiled": "dense loss, torch.compile", "supcon_mask": "SupCon mask form, eager",
         "supcon_mask_compiled": "SupCon mask form, torch.compile",
         "chunked": "chunked eager (same algorithm)", "pml_supcon": "PML SupConLoss",
         "inf_cl": "inf-cl", "cut_ce": "KCL on cut-cross-entropy"}
# The speed-up table compares the fused op with these, in this order (those measured).
OTHERS = ("dense", "dense_compiled", "supcon_mask", "supcon_mask_compiled", "chunked",
          "pml_supcon", "inf_cl", "cut_ce")


def load(path: str) -> dict:
    """One run: its measured rows, its skipped points and its metadata, from a committed table
    (<profile>.csv beside <profile>.meta.json) or straight from a run's pytest-benchmark JSON (as
    tools/gpu_report.py reads the GPU check's)."""
    if path.endswith(".json"):
        with open(path) as f:
            rows, meta = results_table.from_pytest_benchmark(json.load(f))
    else:
        rows, meta = results_table.read(path)
    kcl = {key: value for key, value in meta.items() if key != "machine"}
    kcl["skipped"] = [{**row, "reason": row["skip_reason"]} for row in rows
                      if row["status"] == "skipped"]
    return {"path": path, "rows": [row for row in rows if row["status"] == "measured"],
            "kcl": kcl, "machine": meta.get("machine", {})}


def _key(row) -> tuple:
    return (row["impl"], row["k"])


def _grads(row) -> str:
    return row.get("grads", "query")


def _mode_label(row_or_mode, grads: str = "query") -> str:
    mode = row_or_mode["mode"] if isinstance(row_or_mode, dict) else row_or_mode
    if isinstance(row_or_mode, dict):
        grads = _grads(row_or_mode)
    if mode == "forward":
        return "forward"
    return "forward+backward (query)" if grads == "query" else "forward+backward (all grads)"


def _series_name(impl: str, k: int) -> str:
    return f"{LABEL.get(impl, impl)}, k={k}"


def _mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ms(seconds) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _find(rows, impl, k, mode, grads="query", **shape):
    for row in rows:
        if (row["impl"], row["k"], row["mode"]) == (impl, k, mode) and \
                (mode == "forward" or _grads(row) == grads) and all(
                row[name] == value for name, value in shape.items()):
            return row
    return None


def _machine_line(run) -> str:
    m, kcl = run["machine"], run["kcl"]
    device = m.get("gpu") if kcl.get("device") == "cuda" else (
        f"{m.get('cpu_model', '?')}, {m.get('torch_threads', '?')} threads")
    load = m.get("load_average_at_start")
    load_text = f", 1-min load average {load[0]:.1f} at start" if load else ""
    if m.get("omp_wait_policy"):
        load_text += f", OMP_WAIT_POLICY={m['omp_wait_policy']}"
    dirty = " (with uncommitted changes)" if kcl.get("commit_dirty") else ""
    return (f"{device}; torch {m.get('torch', '?')}; commit `{kcl.get('commit', '?')[:10]}`{dirty}; "
            f"{kcl.get('date_utc', '?')}{load_text}")


def _time_memory_table(run, mode: str) -> list[str]:
    def wanted(r):
        return (r["mode"] == mode and r["n"] == HEADLINE["n"] and r["dtype"] == HEADLINE["dtype"]
                and (mode == "forward" or r.get("grads", "query") == "query"))

    rows = [r for r in run["rows"] if wanted(r)]
    skipped = [s for s in run["kcl"].get("skipped", []) if wanted(s)]
    qs = sorted({r["q"] for r in rows} | {s["q"] for s in skipped})
    series = sorted({_key(r) for r in rows} | {(s["impl"], s["k"]) for s in skipped},
                    key=lambda key: (key[1] != 6, key[0] not in FUSED, key[0]))
    lines = [f"**{_mode_label(mode)}**, N={HEADLINE['n']}, D={HEADLINE['d']}, {HEADLINE['dtype']}: "
             "median time in ms / peak extra memory in MiB", "",
             "| implementation | " + " | ".join(f"Q={q}" for q in qs) + " |",
             "|---|" + "---|" * len(qs)]
    for impl, k in series:
        cells = []
        for q in qs:
            row = _find(rows, impl, k, mode, q=q)
            if row is None:
                cells.append("skipped")
            else:
                cells.append(f"{_ms(row['median_s'])} / {_mib(row.get('peak_extra_bytes'))}")
        lines.append(f"| {_series_name(impl, k)} | " + " | ".join(cells) + " |")
    return lines


def _rates_table(run) -> list[str]:
    ceilings = run["kcl"].get("ceilings", {})
    lines = [f"Rates at N={HEADLINE['n']}, Q={HEADLINE['q']}, D={HEADLINE['d']}, "
             f"{HEADLINE['dtype']}, from counted FLOPs and bytes (docs/benchmarks.md); ceilings "
             f"measured in the same run: matmul {ceilings.get('matmul_gflops_float32', 0):.0f} "
             f"GFLOP/s ({ceilings.get('matmul_size', '?')}² float32), copy "
             f"{ceilings.get('copy_gbps', 0):.1f} GB/s" +
             (f", in-cache GEMM {ceilings['in_cache_gemm_gflops_float32']:.0f} GFLOP/s float32" +
              (f", {ceilings['in_cache_gemm_gflops_bfloat16']:.0f} GFLOP/s bfloat16"
               if ceilings.get("in_cache_gemm_gflops_bfloat16") else "") +
              f" ({ceilings.get('in_cache_gemm_shape', '')})"
              if ceilings.get("in_cache_gemm_gflops_float32") else "") + ".", "",
             "| implementation | mode | ms | GFLOP/s | % of matmul | GB/s | % of copy | "
             "checked against | max rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    shape = {key: HEADLINE[key] for key in ("n", "q", "d", "dtype")}
    rows = [r for r in run["rows"] if all(r[key] == value for key, value in shape.items())]
    rows.sort(key=lambda r: (r["mode"], _grads(r), r["k"] != 6, r["impl"] not in FUSED,
                             r["impl"]))
    for r in rows:
        error = max(r.get("check_loss_error") or 0, r.get("check_grad_error") or 0)
        lines.append(
            f"| {_series_name(r['impl'], r['k'])} | {_mode_label(r)} | {_ms(r['median_s'])} | "
            f"{r['gflops']:.1f} | {100 * (r.get('fraction_of_matmul_ceiling') or 0):.1f} | "
            f"{r['gbps']:.2f} | {100 * (r.get('fraction_of_copy_ceiling') or 0):.2f} | "
            f"{r.get('compared_with', '?')} | {error:.1e} |")
    return lines


def ratios(run) -> list[dict]:
    """Per measured point of a fused op: its time, each other implementation's time at the same
    point (same run), the speed-up other / fused, the memory ratio fused / other, and the fused
    time over the point's GEMM bound."""
    out = []
    for mine in run["rows"]:
        if mine["impl"] not in FUSED:
            continue
        shape = {key: mine[key] for key in ("n", "q", "d", "dtype")}
        entry = {"fused": mine["impl"], "k": mine["k"], "mode": mine["mode"],
                 "grads": _grads(mine), **shape, "time_s": mine["median_s"],
                 "gemm_bound": (mine["median_s"] / mine["gemm_bound_s"]
                                if mine.get("gemm_bound_s") else None), "others": {}}
        for other in OTHERS:
            theirs = _find(run["rows"], other, mine["k"], mine["mode"], _grads(mine), **shape)
            if theirs is None:
                continue
            memory = None
            if mine.get("peak_extra_bytes") and theirs.get("peak_extra_bytes"):
                memory = mine["peak_extra_bytes"] / theirs["peak_extra_bytes"]
            entry["others"][other] = {"time_s": theirs["median_s"],
                                      "speedup": theirs["median_s"] / mine["median_s"],
                                      "memory": memory}
        if entry["others"] or entry["gemm_bound"]:
            out.append(entry)
    out.sort(key=lambda e: (e["fused"], e["dtype"] != "float32", e["n"], e["k"] != 6, e["k"],
                            e["mode"], e["grads"], e["q"]))
    return out


def _ratio_lines(run, headline_only: bool = False) -> list[str]:
    found = ratios(run)
    if headline_only:
        found = [e for e in found if e["n"] == HEADLINE["n"] and e["q"] == HEADLINE["q"]]
    if not found:
        return []
    others = [o for o in OTHERS if any(o in e["others"] for e in found)]
    lines = ["Speed-up of the fused op over what users write instead, measured side by side in "
             "this run (other's median time / fused median time; above 1: the fused op is "
             "faster), and the fused time over the GEMM bound (the point's counted GEMM FLOPs at "
             "the in-cache GEMM rate; 1 is the limit):", "",
             "| fused | k | mode | N | Q | dtype | fused ms | " +
             " | ".join(LABEL[o] for o in others) + " | fused / GEMM bound |",
             "|---|---|---|---|---|---|---|" + "---|" * len(others) + "---|"]
    for e in found:
        cells = [f"{e['others'][o]['speedup']:.2f}×" if o in e["others"] else "–"
                 for o in others]
        bound = f"{e['gemm_bound']:.2f}" if e["gemm_bound"] else "–"
        lines.append(f"| {LABEL[e['fused']]} | {e['k']} | "
                     f"{_mode_label(e['mode'], e['grads'])} | {e['n']} | {e['q']} | "
                     f"{e['dtype']} | {_ms(e['time_s'])} | " + " | ".join(cells) +
                     f" | {bound} |")
    memory = [(e, o, v["memory"]) for e in found for o, v in e["others"].items()
              if v["memory"] and e["q"] == HEADLINE["q"] and e["n"] == HEADLINE["n"]
              and e["dtype"] == HEADLINE["dtype"] and e["grads"] == "query"]
    if memory:
        lines += ["", f"Peak extra memory, fused / other, at N={HEADLINE['n']}, "
                      f"Q={HEADLINE['q']}, {HEADLINE['dtype']}: " +
                  "; ".join(f"{LABEL[o]} k={e['k']} {e['mode']}: {m:.3g}"
                            for e, o, m in memory) + "."]
    return lines


def scaling(run) -> list[dict]:
    """Per fused series: time and memory at the smallest and largest Q, and the log-log slope."""
    out = []
    for fused in FUSED:
        for k in (6, -1, 0):
            for mode in MODES:
                rows = sorted((r for r in run["rows"] if (r["impl"], r["k"], r["mode"]) ==
                               (fused, k, mode) and r["n"] == HEADLINE["n"]
                               and _grads(r) == "query"
                               and r["dtype"] == HEADLINE["dtype"]), key=lambda r: r["q"])
                if len(rows) < 2:
                    continue
                first, last = rows[0], rows[-1]
                slope = (math.log(last["median_s"] / first["median_s"]) /
                         math.log(last["q"] / first["q"]))
                out.append({"impl": fused, "k": k, "mode": mode, "q0": first["q"],
                            "q1": last["q"], "t0": first["median_s"], "t1": last["median_s"],
                            "slope": slope, "m0": first.get("peak_extra_bytes"),
                            "m1": last.get("peak_extra_bytes")})
    return out


def _scaling_lines(run) -> list[str]:
    found = [s for s in scaling(run) if s["k"] == 6]
    if not found:
        return []
    lines = ["Scaling of the fused op in Q (N=256, D=128, float32, k=6): log-log slope of time "
             "against Q (1 = linear), and its peak extra memory at both ends.", "",
             "| fused | mode | Q range | time | slope | peak extra MiB |", "|---|---|---|---|---|---|"]
    for s in found:
        lines.append(f"| {LABEL[s['impl']]} | {s['mode']} | {s['q0']}–{s['q1']} | "
                     f"{_ms(s['t0'])} → {_ms(s['t1'])} ms | {s['slope']:.2f} | "
                     f"{_mib(s['m0'])} → {_mib(s['m1'])} |")
    return lines


def plot(run, out_prefix: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run["rows"] if r["n"] == HEADLINE["n"] and r["dtype"] == HEADLINE["dtype"]
            and _grads(r) == "query"]
    files = []
    for what, value, ylabel in (("time", lambda r: r["median_s"] * 1e3, "median time (ms)"),
                                ("memory", lambda r: max(r.get("peak_extra_bytes") or 0, 2**10)
                                 / 2**20, "peak extra memory (MiB)")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
        for axis, mode in zip(axes, MODES):
            series = sorted({_key(r) for r in rows if r["mode"] == mode},
                            key=lambda key: (key[1] != 6, key[0] not in FUSED, key[0]))
            for impl, k in series:
                points = sorted((r for r in rows if (r["impl"], r["k"], r["mode"]) ==
                                 (impl, k, mode)), key=lambda r: r["q"])
                style = "-" if impl in FUSED else "--"
                axis.plot([r["q"] for r in points], [value(r) for r in points], style,
                          marker="o", label=_series_name(impl, k))
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("queue size Q")
            axis.set_title(f"{_mode_label(mode)}, N={HEADLINE['n']}, D={HEADLINE['d']}, "
                           f"{HEADLINE['dtype']}")
            axis.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(ylabel)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"kpos_loss {what} against Q — {_machine_line(run)}".replace("`", ""),
                     fontsize=8)
        fig.tight_layout()
        path = f"{out_prefix}_{what}_vs_q.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def _run_heading(run, base_dir: str) -> list[str]:
    kcl = run["kcl"]
    rel = os.path.relpath(run["path"], base_dir)
    rel_meta = rel[: -len(".csv")] + ".meta.json"
    lines = [f"### {kcl.get('device', '?').upper()}: {os.path.basename(run['path'])}", "",
             f"Machine: {_machine_line(run)}. Source: [`{rel}`]({rel}) "
             f"([metadata]({rel_meta})).", ""]
    if kcl.get("note"):
        lines += [f"Conditions: {kcl['note']}", ""]
    return lines


def report(runs, report_dir: str) -> str:
    """The whole benchmark report: every table of every run (docs/benchmark_results.md)."""
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.render` (run by `make bench-publish`) from the "
             "committed tables in `benchmarks/results/`; do not edit. Measured by `make bench` "
             "(`python -m benchmarks.run`, a pytest-benchmark suite); every point first checks "
             "that the implementation agrees with its counterpart on the same inputs. How FLOPs, "
             "bytes and memory are counted, which points a CPU run skips and how the peers map "
             "onto kpos_loss: [benchmarks.md](benchmarks.md).", ""]
    for run in runs:
        lines += _run_heading(run, report_dir)
        for mode in MODES:
            lines += _time_memory_table(run, mode) + [""]
        skipped = run["kcl"].get("skipped", [])
        if skipped:
            reasons = sorted({s["reason"] for s in skipped})
            lines += ["Skipped points: " + "; ".join(reasons) + ".", ""]
        lines += _rates_table(run) + [""]
        lines += _ratio_lines(run) + [""]
        lines += _scaling_lines(run) + [""]
        for path in run.get("plots", []):
            rel_plot = os.path.relpath(path, report_dir)
            lines += [f"![{os.path.basename(path)}]({rel_plot})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def section(runs, readme_dir: str, report_path: str) -> str:
    """The README's headline: per run, the speed-ups at N=256, Q=65536 and the time plot."""
    rel_report = os.path.relpath(report_path, readme_dir)
    lines = [BEGIN, "", "## Benchmarks", "",
             "The fused op against what users would write instead, side by side in one run "
             "(`make bench`, published by `make bench-publish`); every point first checks that "
             "the implementations agree. Every table, the rates and memory: "
             f"[{rel_report}]({rel_report}); how it is measured: "
             "[docs/benchmarks.md](docs/benchmarks.md).", ""]
    for run in runs:
        lines += _run_heading(run, readme_dir)
        lines += _ratio_lines(run, headline_only=True) + [""]
        for path in run.get("plots", [])[:1]:
            rel_plot = os.path.relpath(path, readme_dir)
            lines += [f"![{os.path.basename(path)}]({rel_plot})", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def update_readme(readme: str, text: str):
    old = open(readme).read() if os.path.exists(readme) else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + text + tail
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + text
    with open(readme, "w") as f:
        f.write(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="folder of the published tables <profile>.csv (subfolders are not read)")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--report", default=None,
                   help="the full report (default: docs/benchmark_results.md beside the README)")
    args = p.parse_args(argv)
    report_path = args.report or os.path.join(os.path.dirname(os.path.abspath(args.readme)),
                                              "docs", "benchmark_results.md")
    paths = sorted((path for path in glob.glob(os.path.join(args.results, "*.csv"))
                    if os.path.exists(path[: -len(".csv")] + ".meta.json")),
                   key=lambda path: (os.path.basename(path) != "cpu.csv", path))
    runs = []
    for path in paths:
        run = load(path)
        if not run["rows"]:
            continue
        run["plots"] = plot(run, os.path.splitext(path)[0])
        runs.append(run)
    if not runs:
        raise SystemExit(f"no benchmark results in {args.results}")
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path, "w") as f:
        f.write(report(runs, os.path.dirname(os.path.abspath(report_path))))
    update_readme(args.readme, section(runs, os.path.dirname(os.path.abspath(args.readme)),
                                       report_path))
    for run in runs:
        for e in ratios(run):
            speedups = ", ".join(f"{o} {v['speedup']:.2f}x" for o, v in e["others"].items())
            print(f"{run['kcl'].get('device')}: {e['fused']} k={e['k']} {e['mode']} "
                  f"({e['grads']}) N={e['n']} Q={e['q']} {e['dtype']}: {speedups}"
                  + (f"; {e['gemm_bound']:.2f} x GEMM bound" if e["gemm_bound"] else ""))
    print(f"rendered {len(runs)} result file(s) into {report_path} and {args.readme}")


if __name__ == "__main__":
    main()
