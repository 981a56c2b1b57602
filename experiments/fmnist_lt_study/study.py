"""A paired study of several stage-1 losses on Fashion-MNIST-LT, on the recipe's functions.

    python experiments/fmnist_lt_study/study.py --config experiments/fmnist_lt_study/study.yaml \
        --out runs/demo [--overwrite] [--jobs N]                                    (make demo)

The trainings are references/kcl/train.py's `train`; the committed results of `make demo` are in
results/ beside this file.

What it does (docs/training.md, "The study"):
1. Difficulty control: the control method (the CE baseline) is trained on a BALANCED set of the
   same total size as the long-tailed one, for each control seed; its class accuracies, averaged
   over the seeds, are every class's reference accuracy.
2. Class orderings, from the reference: classes ranked from hardest to easiest are interleaved
   (hardest, easiest, 2nd hardest, 2nd easiest, ...) and the sequence is rotated so that
   ordering j puts the pair (j-th hardest, j-th easiest) into the Few group (`interleaved_orderings`);
   the r-th largest size of the long-tail profile goes to class order[r]. Every class whose
   reference accuracy is below the mean ("hard") must land in Few at least once, else the
   study stops and says how many orderings it needs.
3. Cells: every method x ordering x seed is one training (stage 1, then the config's stage 2,
   the class-balanced cRT-style classifier, for Many / Medium / Few / All), with the same
   orderings, seeds and data subsets for every method (paired). On its cached features each
   cell also gets the β protocol (a linear classifier trained on a balanced held-out split:
   β, std of class accuracies, worst class; balance.feature_balance) and an instance-balanced
   classifier (the positive control). Cells run in `jobs` worker processes, one thread each:
   a cell's numbers do not depend on which worker runs it or when.
4. Analysis: paired differences of each claim (e.g. KCL - CE) in each metric, 95 % Student-t
   intervals (sample standard deviation) and sign counts; a claim is supported only if its
   interval excludes 0 on the predicted side (stats.verdict). Positive control: class-balanced
   minus instance-balanced classifier on the control method's features, in Few: if its
   interval does not exclude 0 upwards, the study says it is not sensitive enough.

Outputs in --out: `study.json` (design, every cell, the analysis, provenance, timing, and a
digest of the numbers), `verdict.md` (the printed tables), `differences.png`, `cells.png`, and
the runs under `control/` and `cells/`.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import json
import math
import multiprocessing
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "..", "..", "references", "kcl")
sys.path[:0] = [p for p in (HERE, os.path.normpath(RECIPE)) if p not in sys.path]

import balance as kbalance  # noqa: E402  (the recipe's modules, found through sys.path)
import metrics as kmetrics  # noqa: E402
import stats as kstats  # noqa: E402
from config import (differences, find_config, format_differences, load_config,  # noqa: E402
                    read_yaml)
from errors import ConfigError, DataError, OutputError, run_command  # noqa: E402

# Metrics of a cell: where they come from, how they are printed, and which way is "better"
# relative to the claim's metric (class_std falls when beta rises).
METRICS = {
    "beta": ("β (balanced-split classifier)", ".3f"),
    "class_std": ("std of class accuracies (balanced-split classifier, points)", ".2f"),
    "worst": ("worst-class accuracy (balanced-split classifier, %)", ".1f"),
    "few": ("Few (class-balanced classifier, %)", ".1f"),
    "few_relative": ("Few relative to balanced CE (%)", ".1f"),
    "many": ("Many (class-balanced classifier, %)", ".1f"),
    "medium": ("Medium (class-balanced classifier, %)", ".1f"),
    "all": ("All (class-balanced classifier, top-1 %)", ".1f"),
    "few_ib": ("Few (instance-balanced classifier, %)", ".1f"),
}
# Claims are made in beta and few; the σ-free companions follow their claim's direction.
COMPANIONS = {"beta": (("class_std", "opposite"), ("worst", "same")),
              "few": (("few_relative", "same"),)}
PRIMARY = ("beta", "few")
UNDEFINED = "undefined (a cell has no value)"
DIRECTION_WORDS = ("higher", "lower", None)

STUDY_KEYS = {"methods", "seeds", "orderings", "control_seeds", "balanced_per_class", "claims",
              "control", "jobs", "set", "confidence"}


# ----------------------------------------------------------------------------------------------
# The study file
# ----------------------------------------------------------------------------------------------
def load_study(path: str, jobs: int | None = None) -> dict:
    """The study file, checked: every method's config loads, the configs differ only in
    stage1.loss and stage1.k, seeds and orderings are enough for intervals, claims name known
    methods. Config paths are relative to the study file."""
    raw = read_yaml(path)
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown study keys {sorted(unknown)} (known: "
                          f"{', '.join(sorted(STUDY_KEYS))})")
    folder = os.path.dirname(os.path.abspath(path))

    def need(key, kind, check, expected):
        if key not in raw:
            raise ConfigError(f"{path}: the study needs `{key}` ({expected})")
        value = raw[key]
        if not isinstance(value, kind) or not check(value):
            raise ConfigError(f"{path}: `{key}` must be {expected}, got {value!r}")
        return value

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    methods = need("methods", dict, lambda m: len(m) >= 2 and all(
        isinstance(k, str) and isinstance(v, str) for k, v in m.items()),
        "a mapping of at least two method names to config files")
    seeds = need("seeds", list, lambda s: len(s) >= 1 and all(is_int(x) and x >= 0 for x in s)
                 and len(set(s)) == len(s), "a list of distinct seeds >= 0")
    orderings = need("orderings", int, lambda n: is_int(n) and n >= 1, "an integer >= 1")
    if len(seeds) * orderings < 2:
        raise ConfigError(f"{path}: {len(seeds)} seed(s) x {orderings} ordering(s) give "
                          f"{len(seeds) * orderings} pair(s); a t-interval needs at least 2")
    control_seeds = need("control_seeds", list, lambda s: len(s) >= 1 and all(
        is_int(x) and x >= 0 for x in s), "a list of seeds >= 0")
    balanced_per_class = need("balanced_per_class", int, lambda n: is_int(n) and n >= 1,
                              "an integer >= 1 (images per class of the held-out split)")
    control = need("control", str, lambda c: c in methods,
                   f"one of the methods {sorted(methods)}: the baseline trained on balanced "
                   f"data and the features of the positive control")
    claims = need("claims", list, lambda c: len(c) >= 1, "a list of claims")
    checked_claims = []
    for claim in claims:
        if not isinstance(claim, dict) or set(claim) - {"a", "b", *PRIMARY} or \
                claim.get("a") not in methods or claim.get("b") not in methods or \
                claim["a"] == claim["b"] or \
                any(claim.get(m) not in DIRECTION_WORDS for m in PRIMARY):
            raise ConfigError(
                f"{path}: a claim is {{a: METHOD, b: METHOD, beta: higher|lower|null, few: "
                f"higher|lower|null}} with two different methods of {sorted(methods)}, "
                f"got {claim!r}")
        checked_claims.append({"a": claim["a"], "b": claim["b"],
                               **{m: claim.get(m) for m in PRIMARY}})
    overrides = raw.get("set", [])
    if not isinstance(overrides, list) or not all(isinstance(x, str) for x in overrides):
        raise ConfigError(f"{path}: `set` must be a list of KEY=VALUE strings, got {overrides!r}")
    jobs = jobs if jobs is not None else raw.get("jobs", 1)
    if not is_int(jobs) or jobs < 1:
        raise ConfigError(f"study jobs must be an integer >= 1, got {jobs!r}")
    confidence = raw.get("confidence", 0.95)
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ConfigError(f"{path}: `confidence` must be a number in (0, 1), got {confidence!r}")

    configs = {}
    for name, file in methods.items():
        # Beside the study file, else the recipe's (references/kcl/configs/).
        beside = os.path.join(folder, file)
        configs[name] = load_config(beside if os.path.isfile(beside) else find_config(file),
                                    overrides)
    first_name = next(iter(configs))
    for name, cfg in configs.items():
        if cfg.data.kind != "fashion_mnist_lt":
            raise ConfigError(f"{name}: the study builds class orderings of Fashion-MNIST-LT; "
                              f"data.kind is {cfg.data.kind!r}")
        diffs = [d for d in differences(configs[first_name], cfg)
                 if d[0] not in ("stage1.loss", "stage1.k")]
        if diffs:
            raise ConfigError(f"the methods' configs may differ only in stage1.loss and "
                              f"stage1.k (the study compares stage-1 losses); {first_name} and "
                              f"{name} differ in:\n"
                              f"{format_differences(diffs, first_name, name)}")
    return {"path": os.path.abspath(path), "methods": configs, "files": methods, "seeds": seeds,
            "orderings": orderings, "control_seeds": control_seeds,
            "balanced_per_class": balanced_per_class, "control": control,
            "claims": checked_claims, "jobs": jobs, "set": overrides, "confidence": confidence}


# ----------------------------------------------------------------------------------------------
# Orderings
# ----------------------------------------------------------------------------------------------
def few_ranks(counts_by_rank, few_threshold: int) -> list[int]:
    """The ranks (positions in the size profile) whose size makes a class Few."""
    return [r for r, n in enumerate(counts_by_rank) if n < few_threshold]


def interleave(ranking) -> list[int]:
    """(hardest, easiest, 2nd hardest, 2nd easiest, ...) of a ranking from hardest to easiest."""
    ranking = list(ranking)
    classes = len(ranking)
    sequence = []
    for i in range((classes + 1) // 2):
        sequence.append(ranking[i])
        if classes - 1 - i != i:
            sequence.append(ranking[classes - 1 - i])
    return sequence


def interleaved_orderings(ranking, few: list[int], n: int) -> list[list[int]]:
    """`n` class orderings (order[r] = the class that gets the r-th largest size).

    `ranking` lists the classes from hardest to easiest; the sequence S = `interleave(ranking)`
    is rotated so that ordering j puts S[F j], ..., S[F j + F - 1] on the F Few ranks `few`
    (the last F ranks of the profile), and the rest of S, in its cyclic order, on the ranks
    before them. With two Few ranks, ordering j makes the j-th hardest and the j-th easiest
    class Few; every class moves through the shot groups."""
    ranking = list(ranking)
    classes = len(ranking)
    if sorted(ranking) != list(range(classes)):
        raise DataError(f"the difficulty ranking must name every class once, got {ranking}")
    f = len(few)
    if f == 0:
        raise DataError("the long-tail profile has no Few class (raise data.imbalance_factor "
                        "or eval.few_threshold): orderings cannot move classes into Few")
    if few != list(range(classes - f, classes)):
        raise DataError(f"the Few ranks must be the last ones of a decreasing profile, got {few}")
    if not 1 <= n <= classes // f:
        raise DataError(f"{n} orderings requested; with {classes} classes and {f} Few ranks "
                        f"there are 1..{classes // f} orderings with distinct Few groups")
    sequence = interleave(ranking)
    out = []
    for j in range(n):
        start = f * j + f  # S[start ...] fills ranks 0.. so that S[f j ...] lands on the Few ranks
        out.append([sequence[(start + r) % classes] for r in range(classes)])
    return out


def hard_classes(reference) -> list[int]:
    """Classes whose reference accuracy is below the mean reference accuracy."""
    mean = math.fsum(reference) / len(reference)
    return [c for c, a in enumerate(reference) if a < mean]


def check_coverage(orderings, few: list[int], hard: list[int], ranking) -> None:
    """Every hard class must be Few in at least one ordering; the error says how many
    orderings would make it so."""
    covered = {order[r] for order in orderings for r in few}
    missing = [c for c in hard if c not in covered]
    if missing:
        sequence, f = interleave(ranking), len(few)
        needed = max(sequence.index(c) // f for c in hard) + 1
        if needed * f > len(sequence):
            advice = (f"no number of orderings with {f} Few ranks reaches them all: change "
                      f"data.imbalance_factor or eval.few_threshold")
        else:
            advice = f"the study needs orderings: {needed} or more"
        raise DataError(f"classes {missing} are hard (below the mean balanced-CE accuracy) but "
                        f"never Few in {len(orderings)} orderings; {advice}")


# ----------------------------------------------------------------------------------------------
# One training (runs in a worker process)
# ----------------------------------------------------------------------------------------------
def _cell_config(base, out: str, seed: int, **data) -> dict:
    """The mapping form of one cell's config (it goes to a worker process), with `_out`."""
    cfg = base.to_dict()
    cfg["seed"] = seed
    cfg["data"]["subset_seed"] = seed
    cfg["data"].update(data)
    cfg["progress"] = "none"
    cfg["tensorboard"] = False
    cfg["eval"]["save_features"] = True
    cfg["eval"]["plot"] = False
    cfg["_out"] = out
    return cfg


def run_cell(cfg: dict) -> dict:
    """Trains one cell and returns its metrics: the report's (class-balanced stage 2, feature
    balance) and those of an instance-balanced classifier on the same cached features."""
    import torch

    import checkpoint as ckpt
    import train
    started, cpu_started = time.time(), time.process_time()
    out = cfg.pop("_out")
    cfg = load_config(base=cfg)
    report = train.train(cfg, out, overwrite=True)
    saved = torch.load(os.path.join(out, ckpt.FEATURES), weights_only=True)
    classifier = kbalance.fit_linear_classifier(
        saved["train_features"], saved["train_labels"], saved["num_classes"], cfg.stage2,
        cfg.seed, class_balanced=False)
    predictions = kbalance.predict_classes(classifier, saved["test_features"],
                                           cfg.eval.batch_size)
    e = cfg.eval
    instance = kmetrics.evaluate(predictions, saved["test_labels"], report["train_counts"],
                                 many_threshold=e.many_threshold,
                                 few_threshold=e.few_threshold, sigma=e.sigma)
    fb = report.get("feature_balance") or {}
    return {
        "out": out, "train_counts": report["train_counts"], "groups": report["groups"],
        "many": report["many"], "medium": report["medium"], "few": report["few"],
        "all": report["top1"], "class_accuracy": report["class_accuracy"],
        "beta": fb.get("beta"), "class_std": fb.get("class_std"),
        "worst": fb.get("worst_class_accuracy"), "worst_class": fb.get("worst_class"),
        "balanced_class_accuracy": fb.get("class_accuracy"),
        "few_ib": instance["few"], "many_ib": instance["many"], "all_ib": instance["top1"],
        "seconds": round(time.time() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
    }


def _worker_init() -> None:
    # Threads that sleep instead of spinning while they wait: on a shared CPU spinning costs
    # several-fold; it cannot change results.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------
class Study:
    def __init__(self, study: dict, out: str, log=print):
        self.study, self.out, self.log = study, out, log
        self.control_cfg = study["methods"][study["control"]]
        self.loads: list[float] = []

    def _load(self) -> float:
        try:
            value = round(os.getloadavg()[0], 2)
        except OSError:
            return float("nan")
        self.loads.append(value)
        return value

    def _run_all(self, pool, tasks: list[tuple[str, dict]]) -> dict:
        """Runs the (name, config) tasks in the pool, longest first; {name: cell metrics}."""
        results, pending = {}, {}
        for name, cfg in tasks:
            pending[pool.submit(run_cell, cfg)] = name
        done_count = 0
        for future in futures.as_completed(pending):
            name = pending[future]
            results[name] = result = future.result()
            done_count += 1
            self.log(f"  [{done_count:2d}/{len(tasks)}] {name}: Few {_fmt(result['few'], '.1f')}"
                     f"  beta {_fmt(result['beta'], '.3f')}  All {result['all']:.1f}  "
                     f"({result['seconds']:.0f} s, load {self._load():.1f})", flush=True)
        return results

    def run(self) -> dict:
        s = self.study
        started, load_start = time.time(), self._load()
        cfg = self.control_cfg
        d, e = cfg.data, cfg.eval
        from data import long_tailed_counts
        profile = long_tailed_counts(10, d.max_per_class, d.imbalance_factor)
        total = sum(profile)
        balanced = kbalance.balanced_counts(total, 10)
        few = few_ranks(profile, e.few_threshold)
        context = multiprocessing.get_context("spawn")
        self.log(f"study {s['path']}: {len(s['methods'])} methods x {s['orderings']} orderings "
                 f"x {len(s['seeds'])} seeds, control on {len(s['control_seeds'])} balanced "
                 f"sets, {s['jobs']} worker(s)", flush=True)
        with futures.ProcessPoolExecutor(s["jobs"], mp_context=context,
                                         initializer=_worker_init) as pool:
            # 1. The difficulty control.
            self.log(f"difficulty control: {s['control']} on a balanced set of {total} images "
                     f"({balanced[0]} or {balanced[-1]} per class)", flush=True)
            control_tasks = [
                (f"control seed {seed}", _cell_config(
                    cfg, os.path.join(self.out, "control", f"seed{seed}"), seed,
                    class_counts=balanced, class_order=None,
                    balanced_per_class=s["balanced_per_class"]))
                for seed in s["control_seeds"]]
            control = self._run_all(pool, control_tasks)
            control = [control[name] for name, _ in control_tasks]
            reference = kbalance.mean_class_accuracy([c["class_accuracy"] for c in control])
            ranking = kbalance.difficulty_ranking(reference)
            hard = hard_classes(reference)
            # 2. The orderings.
            orderings = interleaved_orderings(ranking, few, s["orderings"])
            check_coverage(orderings, few, hard, ranking)
            names = _class_names()
            for j, order in enumerate(orderings):
                self.log(f"ordering {j}: Few = {', '.join(names[order[r]] for r in few)}; "
                         f"sizes by class " + ", ".join(
                             f"{names[c]} {profile[order.index(c)]}" for c in range(10)),
                         flush=True)
            # 3. The cells, the longest (contrastive) first so that the workers finish together.
            tasks = []
            for method, mcfg in sorted(s["methods"].items(),
                                       key=lambda kv: kv[1].stage1.loss == "ce"):
                for j, order in enumerate(orderings):
                    for seed in s["seeds"]:
                        out = os.path.join(self.out, "cells", f"ordering{j}-seed{seed}", method)
                        tasks.append((f"{method} ordering {j} seed {seed}", _cell_config(
                            mcfg, out, seed, class_order=order, class_counts=None,
                            balanced_per_class=s["balanced_per_class"])))
            self.log(f"{len(tasks)} trainings", flush=True)
            results = self._run_all(pool, tasks)
        wall = time.time() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        for record in list(results.values()) + control:  # paths relative to --out
            record["out"] = os.path.relpath(record["out"], self.out)
        cells = {method: [results[f"{method} ordering {j} seed {seed}"]
                          for j in range(len(orderings)) for seed in s["seeds"]]
                 for method in s["methods"]}
        pairs = [{"ordering": j, "seed": seed} for j in range(len(orderings))
                 for seed in s["seeds"]]
        for method_cells in cells.values():
            for cell in method_cells:
                relative = kbalance.relative_accuracy(cell["class_accuracy"], reference)
                few_relative = kbalance.group_mean(relative, cell["groups"]["few"])
                cell["few_relative"] = None if few_relative is None else 100.0 * few_relative
        analysis = analyse(cells, s["claims"], s["control"], s["confidence"])
        design = {
            "classes": names, "profile": profile, "few_ranks": few,
            "shot_groups": {"many": f"> {e.many_threshold}",
                            "medium": f"{e.few_threshold}..{e.many_threshold}",
                            "few": f"< {e.few_threshold}"},
            "sigma": e.sigma, "balanced_control_counts": balanced,
            "reference_class_accuracy": reference,
            "control": [{k: c[k] for k in ("out", "class_accuracy", "all", "beta")}
                        for c in control],
            "difficulty_ranking": ranking, "hard_classes": hard, "orderings": orderings,
            "seeds": s["seeds"], "control_seeds": s["control_seeds"],
            "balanced_per_class": s["balanced_per_class"], "pairs": pairs,
            "methods": {m: {"config": s["files"][m], "loss": c.stage1.loss, "k": c.stage1.k}
                        for m, c in s["methods"].items()},
            "stage1_epochs": cfg.stage1.epochs, "confidence": s["confidence"],
            "set": s["set"],
        }
        results_part = {"design": design, "cells": _strip(cells), "analysis": analysis}
        digest = hashlib.sha256(json.dumps(results_part, sort_keys=True).encode()).hexdigest()
        from provenance import describe
        import torch
        provenance = describe(torch.device("cpu"))
        provenance["device"]["threads"] = cfg.threads
        timing = {
            "wall_seconds": round(wall, 1),
            "cpu_seconds_workers": round(usage.ru_utime + usage.ru_stime, 1),
            "cpu_seconds_main": round(own.ru_utime + own.ru_stime, 1),
            "jobs": s["jobs"],
            # None where the load average is unobtainable (os.getloadavg raised OSError)
            "load_average_1min_start": None if math.isnan(load_start) else load_start,
            "load_average_1min_max": max(self.loads, default=None),
            "load_average_1min_mean":
                round(sum(self.loads) / len(self.loads), 2) if self.loads else None,
            "cell_seconds": {m: [c["seconds"] for c in cs] for m, cs in cells.items()},
            "cell_cpu_seconds": {m: [c["cpu_seconds"] for c in cs] for m, cs in cells.items()},
        }
        return {**results_part, "digest": digest, "provenance": provenance, "timing": timing}


def _strip(cells: dict) -> dict:
    """Cell records without wall-clock figures (they are in `timing`)."""
    return {m: [{k: v for k, v in c.items() if k not in ("seconds", "cpu_seconds")} for c in cs]
            for m, cs in cells.items()}


def _class_names() -> list[str]:
    from data import FASHION_MNIST_CLASSES
    return list(FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------
def _companion_direction(direction: str | None, relation: str) -> str | None:
    if direction is None or relation == "same":
        return direction
    return "lower" if direction == "higher" else "higher"


def analyse(cells: dict, claims: list, control: str, confidence: float = 0.95) -> dict:
    """Paired differences, intervals, sign counts and verdicts of every claim, and the
    positive control. `cells[method]` lists the paired cells in the same order for every
    method."""
    rows = []
    for claim in claims:
        a, b = cells[claim["a"]], cells[claim["b"]]
        if len(a) != len(b):
            raise DataError(f"{claim['a']} and {claim['b']} have {len(a)} and {len(b)} cells: "
                            f"not paired")
        for metric in PRIMARY:
            metric_rows = [(metric, claim[metric], True)] + [
                (name, _companion_direction(claim[metric], relation), False)
                for name, relation in COMPANIONS[metric]]
            for name, predicted, primary in metric_rows:
                if any(c[name] is None for c in a + b):  # e.g. a group without classes
                    rows.append({"a": claim["a"], "b": claim["b"], "metric": name,
                                 "primary": primary, "predicted": predicted, "differences": None,
                                 "verdict": UNDEFINED})
                    continue
                diffs = kstats.paired_differences([c[name] for c in a], [c[name] for c in b])
                interval = kstats.t_interval(diffs, confidence)
                rows.append({"a": claim["a"], "b": claim["b"], "metric": name,
                             "primary": primary, "predicted": predicted,
                             "differences": diffs, **interval.as_dict(),
                             "verdict": kstats.verdict(interval, predicted)})
    ctrl = cells[control]
    gap = kstats.paired_differences([c["few"] for c in ctrl], [c["few_ib"] for c in ctrl])
    gap_interval = kstats.t_interval(gap, confidence)
    sensitive = gap_interval.low > 0
    summary = {}
    for method, method_cells in cells.items():
        summary[method] = {}
        for name in METRICS:
            values = [c[name] for c in method_cells]
            if any(v is None for v in values):
                summary[method][name] = None
                continue
            mean = math.fsum(values) / len(values)
            sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
                if len(values) > 1 else float("nan")
            summary[method][name] = {"mean": mean, "sd": sd}
    return {
        "rows": rows, "summary": summary,
        "positive_control": {
            "method": control, "metric": "few",
            "what": "class-balanced minus instance-balanced classifier, Few, on the control "
                    "method's features (paired by cell)",
            "differences": gap, **gap_interval.as_dict(), "sensitive": sensitive},
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def verdict_markdown(result: dict) -> str:
    """The printed tables: per-method means, the paired claims, the positive control."""
    analysis, design = result["analysis"], result["design"]
    conf = round(100 * design["confidence"])
    names = design["classes"]
    pc = analysis["positive_control"]
    lines = ["Verdict (paired " + f"{conf} % t-intervals; a claim holds only if its interval "
             "excludes 0 on the predicted side):"]
    for row in analysis["rows"]:
        if row["primary"]:
            spec = METRICS[row["metric"]][1]
            metric = METRICS[row["metric"]][0].split(" (")[0]
            claim = f"{row['a']} {row['predicted']} than {row['b']} in {metric}" \
                if row["predicted"] else \
                f"{row['a']} − {row['b']} in {metric} (no predicted direction)"
            lines.append(f"- {claim}: {row['verdict'].upper()}"
                         + ("" if row["verdict"] == UNDEFINED else
                            f" ({row['mean']:+{spec}}, [{row['low']:+{spec}}, "
                            f"{row['high']:+{spec}}], signs {row['positive']}/"
                            f"{row['negative']}/{row['zero']})"))
    lines.append(f"- positive control ({pc['method']} features, Few, class-balanced − "
                 f"instance-balanced classifier: {pc['mean']:+.1f}, [{pc['low']:+.1f}, "
                 f"{pc['high']:+.1f}]): " + ("the study is sensitive enough" if pc["sensitive"]
                                            else "NOT SENSITIVE ENOUGH"))
    lines += ["", f"Per method: mean ± sd over {len(design['pairs'])} paired cells "
             f"({len(design['orderings'])} orderings x {len(design['seeds'])} seeds)", "",
             "| method | Many | Medium | Few | All | β | class std | worst class | "
             "Few rel. to balanced CE | Few, instance-balanced |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, summary in analysis["summary"].items():
        cells = []
        for name in ("many", "medium", "few", "all", "beta", "class_std", "worst",
                     "few_relative", "few_ib"):
            s = summary[name]
            spec = METRICS[name][1]
            cells.append("-" if s is None else f"{s['mean']:{spec}} ± {s['sd']:{spec}}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired differences (A − B, same ordering and seed), {conf} % t-interval "
              f"(sample sd), sign count (+/−/0):", "",
              "| claim | metric | predicted | mean | " + f"{conf} % interval | signs | verdict |",
              "|---|---|---|---|---|---|---|"]
    for row in analysis["rows"]:
        if row["verdict"] == UNDEFINED:
            continue
        spec = METRICS[row["metric"]][1]
        metric = METRICS[row["metric"]][0]
        if not row["primary"]:
            metric = "  σ-free: " + metric if row["metric"] != "few_relative" else \
                "  difficulty control: " + metric
        predicted = {"higher": "A > B", "lower": "A < B", None: "none"}[row["predicted"]]
        verdict = row["verdict"]
        if row["primary"]:
            verdict = f"**{verdict}**"
        lines.append(f"| {row['a']} − {row['b']} | {metric} | {predicted} | "
                     f"{row['mean']:+{spec}} | [{row['low']:+{spec}}, {row['high']:+{spec}}] | "
                     f"{row['positive']}/{row['negative']}/{row['zero']} | {verdict} |")
    lines += ["", f"Positive control ({pc['method']} features, Few): class-balanced − "
              f"instance-balanced classifier {pc['mean']:+.1f} points, {conf} % interval "
              f"[{pc['low']:+.1f}, {pc['high']:+.1f}], signs "
              f"{pc['positive']}/{pc['negative']}/{pc['zero']}: " +
              ("the study detects a real Few effect of this size." if pc["sensitive"] else
               "NOT SENSITIVE ENOUGH: the study cannot even see the effect of rebalancing the "
               "classifier; read no verdict above as evidence.")]
    lines += ["", "Orderings (from the balanced-CE difficulty ranking, hardest first: " +
              ", ".join(f"{names[c]} {100 * design['reference_class_accuracy'][c]:.1f}"
                        for c in design["difficulty_ranking"]) + "):"]
    for j, order in enumerate(design["orderings"]):
        lines.append(f"- ordering {j}: Few = " +
                     ", ".join(names[order[r]] for r in design["few_ranks"]) +
                     "; largest to smallest: " + ", ".join(names[c] for c in order))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def plot_differences(result: dict, path: str) -> None:
    """Forest plot: every paired difference with its interval and the cells' values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pc = result["analysis"]["positive_control"]
    rows = result["analysis"]["rows"] + [{
        **pc, "a": "CB", "b": "IB", "metric": "control",
        "verdict": "supported" if pc["sensitive"] else "undecided"}]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    colours = {"supported": "tab:green", "contradicted": "tab:red"}
    titles = {"control": f"positive control: Few, {pc['method']} features"}
    for ax, metric in zip(axes[0], metrics):
        chosen = [r for r in rows if r["metric"] == metric and r["verdict"] != UNDEFINED]
        for y, r in enumerate(chosen):
            colour = colours.get(r["verdict"], "tab:grey")
            ax.plot([r["low"], r["high"]], [y, y], color=colour, lw=2)
            ax.plot([r["mean"]], [y], "o", color=colour)
            ax.plot(r["differences"], [y + 0.18] * len(r["differences"]), "|", color="k",
                    ms=5, alpha=0.6)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(chosen)), [f"{r['a']}−{r['b']}" for r in chosen], fontsize=7)
        ax.set_ylim(-0.6, len(chosen) - 0.4)
        ax.set_title(titles.get(metric) or METRICS[metric][0].split(" (")[0], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("paired differences, 95 % t-intervals (green: supported, red: contradicted)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cells(result: dict, path: str) -> None:
    """β and Few of every cell, the paired cells of the methods joined by lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    methods = list(cells)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.2))
    for ax, metric in zip(axes, ("beta", "few")):
        n = len(cells[methods[0]])
        if any(c[metric] is None for m in methods for c in cells[m]):
            continue
        for i in range(n):
            ax.plot(range(len(methods)), [cells[m][i][metric] for m in methods], "-o",
                    color="tab:blue", alpha=0.35, ms=3)
        means = [math.fsum(c[metric] for c in cells[m]) / n for m in methods]
        ax.plot(range(len(methods)), means, "-s", color="k", ms=6, label="mean")
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(METRICS[metric][0], fontsize=8)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="the study file (experiments/fmnist_lt_study/study.yaml)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the study in a non-empty --out")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: the study file's `jobs`); results do not "
                        "depend on it")
    args = p.parse_args(argv)
    study = load_study(args.config, args.jobs)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise OutputError(f"output folder {args.out} is not empty: pass --overwrite to replace "
                          f"the study there")
    os.makedirs(args.out, exist_ok=True)
    result = Study(study, args.out).run()
    table = verdict_markdown(result)
    kmetrics.write_json(result, os.path.join(args.out, "study.json"))
    with open(os.path.join(args.out, "verdict.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot_differences(result, os.path.join(args.out, "differences.png"))
    plot_cells(result, os.path.join(args.out, "cells.png"))
    t = result["timing"]
    print()
    print(table)
    print()
    print(f"study: {args.out}/study.json, verdict.md, differences.png, cells.png")
    print(f"digest of the numbers: {result['digest']}")
    print(f"wall {t['wall_seconds']:.0f} s, CPU {t['cpu_seconds_workers']:.0f} s in "
          f"{t['jobs']} worker(s) + {t['cpu_seconds_main']:.0f} s main; 1-min load average "
          f"{t['load_average_1min_start']} at the start, at most "
          f"{t['load_average_1min_max']} during the run")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "study.py"))
