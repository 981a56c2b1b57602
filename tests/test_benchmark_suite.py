"""The benchmark suite's own logic, on tiny shapes: the exact peer mappings, kpos_loss written on
cut-cross-entropy, the agreement check (including that it fails on a wrong implementation), the
work counting, the grid's budget, the published tables (CSV and metadata) and the README
rendering. No timing here: timings live in benchmarks/.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

import kcl_ext
from benchmarks import grid, peers, publish, render, results_table, throughput_table
from benchmarks.agreement import check_agreement
from benchmarks.impls import IMPLS, SEED, TEMPERATURE
from benchmarks.loss_run import make_inputs
from benchmarks.workload import counted_bytes, counted_flops, measure_in_cache_gemm


def _inputs(n=12, q=300, d=16, classes=7, dtype=torch.float64, seed=3):
    inputs = make_inputs(n, q, d, dtype, classes=classes, seed=seed)
    query, key, queue, query_labels, queue_labels = inputs
    query_labels = query_labels.clone()
    query_labels[0] = classes + 5          # a class absent from the queue: no positive at all
    return query, key, queue, query_labels, queue_labels


def _reference_rows(inputs, k):
    return kcl_ext.kpos_loss_reference(*inputs, k=k, temperature=TEMPERATURE, reduction="none",
                                       seed=SEED)


def test_supcon_rows_follow_exactly_from_kpos_rows():
    from pytorch_metric_learning.losses import SupConLoss
    from pytorch_metric_learning.reducers import DoNothingReducer

    inputs = _inputs()
    query, key, queue, query_labels, queue_labels = (t.detach() for t in inputs)
    mapped = peers.supcon_rows_from_kpos(
        _reference_rows(inputs, 0).detach(), _reference_rows(inputs, -1).detach(),
        peers.own_logits(query, key, TEMPERATURE), peers.match_counts(query_labels, queue_labels))
    per_row = SupConLoss(temperature=TEMPERATURE, reducer=DoNothingReducer())(
        query, query_labels, ref_emb=queue, ref_labels=queue_labels)["loss"]["losses"]
    assert mapped[0] == 0 and per_row[0] == 0          # no positive: SupConLoss gives 0
    assert (mapped[1:] > 0).all()
    # SupConLoss normalises the features again; made unit-norm in float32, they are unit-norm to
    # about 1e-8 in float64, hence the tolerance.
    torch.testing.assert_close(per_row.double(), mapped, rtol=1e-6, atol=1e-6)
    reduced = SupConLoss(temperature=TEMPERATURE)(query, query_labels, ref_emb=queue,
                                                  ref_labels=queue_labels)
    torch.testing.assert_close(reduced.double(), peers.supcon_mean(mapped), rtol=1e-6, atol=1e-6)


def test_supcon_differs_from_kpos_all_positives():
    # The mapping is not the identity: the own key changes the loss, so comparing the raw values
    # would be wrong.
    inputs = _inputs()
    rows = _reference_rows(inputs, -1).detach()
    query, key, queue, query_labels, queue_labels = (t.detach() for t in inputs)
    mapped = peers.supcon_rows_from_kpos(
        _reference_rows(inputs, 0).detach(), rows, peers.own_logits(query, key, TEMPERATURE),
        peers.match_counts(query_labels, queue_labels))
    assert (mapped[1:] - rows[1:]).abs().max() > 1e-3


def test_inf_cl_rows_follow_exactly_from_kpos_rows():
    # cal_flash_loss row i is lse_c(q_i . col_c * scale) - q_i . col_{target_i} * scale (its
    # source: `loss = -numerator + lse`); written out here since inf-cl runs on CUDA only.
    query, key, queue, _, _ = (t.detach() for t in _inputs())
    bank = torch.cat([key, queue])
    logits = query @ bank.t() / TEMPERATURE
    flash_rows = torch.logsumexp(logits, 1) - logits[torch.arange(len(query)), torch.arange(
        len(query))]
    kpos_rows = kcl_ext.kpos_loss_reference(
        query, key, bank, torch.zeros(len(query), dtype=torch.int64),
        torch.zeros(len(bank), dtype=torch.int64), k=0, temperature=TEMPERATURE,
        reduction="none", seed=SEED)
    torch.testing.assert_close(peers.inf_cl_rows_from_kpos(kpos_rows), flash_rows, rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("name,k,grads", [
    ("fused_cpu", 6, ("query",)), ("fused_cpu", -1, ()), ("reference", 6, ("query",)),
    ("pml_supcon", -1, ()), ("dense", 6, ("query", "key", "queue")), ("dense", -1, ("query",)),
    ("supcon_mask", -1, ("query",)), ("chunked", 6, ("query", "key")), ("chunked", -1, ()),
    ("fused_cpu", 0, ("query", "key", "queue")), ("cut_ce", 6, ("query", "key", "queue")),
    ("cut_ce", -1, ()), ("cut_ce", 0, ("query",))])
def test_agreement_check_passes_on_correct_implementations(name, k, grads):
    inputs = make_inputs(80, 512, 32, torch.float32, classes=9)
    report = check_agreement(IMPLS[name], inputs, k, grads, "cpu")
    assert report["check_rows"] == 64
    assert report["check_loss_error"] <= report["check_tolerance"]
    if grads:
        assert report["check_grad_error"] <= report["check_tolerance"]


def test_dense_user_loss_draws_random_positives_when_timed():
    # The timed dense loss picks its own random positives (topk on random priorities): its value
    # differs from kpos_loss's at k > 0, which is why the check hands it kpos_loss's selection.
    inputs = make_inputs(64, 512, 32, torch.float32, classes=3)
    with torch.no_grad():
        timed = IMPLS["dense"].build(6, "cpu")(*inputs)
        checked = IMPLS["dense"].build_check(6, "cpu")(*inputs)
        fused = kcl_ext.kpos_loss(*inputs, k=6, temperature=TEMPERATURE, seed=SEED)
    assert torch.allclose(checked, fused, rtol=1e-5) and not torch.allclose(timed, fused,
                                                                             rtol=1e-5)


@pytest.mark.parametrize("k", [6, -1, 0])
def test_cut_cross_entropy_form_is_kpos_loss_with_empty_slots(k):
    # Empty slots (label -1) must leave the log-sum-exp: the form gathers the valid queue rows.
    # Float32, as cut-cross-entropy computes its logits in float32 whatever the input dtype.
    query, key, queue, query_labels, queue_labels = make_inputs(
        12, 300, 16, torch.float32, classes=7, seed=3, grads=("query", "queue"))
    queue_labels = queue_labels.clone()
    queue_labels[::3] = -1
    query_labels = query_labels.clone()
    query_labels[0] = 11                       # no positive in the queue
    inputs = (query, key, queue, query_labels, queue_labels)
    got = peers.cce_kpos_loss(*inputs, k, TEMPERATURE, SEED, "torch_compile")
    expected = kcl_ext.kpos_loss_reference(*inputs, k=k, temperature=TEMPERATURE, seed=SEED)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad(got, [query, queue])
    expected_grads = torch.autograd.grad(expected, [query, queue])
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert got_grads[1][::3].abs().max() == 0      # empty slots get no gradient
    # every slot empty: only the own key is left, and its row loss is 0
    none = torch.full_like(queue_labels, -1)
    assert peers.cce_kpos_loss(query, key, queue, query_labels, none, k, TEMPERATURE, SEED,
                               "torch_compile").item() == 0


def test_cut_cross_entropy_form_without_the_target_logit_fails_the_check(monkeypatch):
    # linear_cross_entropy gives lse - s_target; forgetting to add back s_target is the easy
    # mistake, and the agreement check must catch it.
    import cut_cross_entropy
    linear_cross_entropy = cut_cross_entropy.linear_cross_entropy

    def lse_minus_target_as_lse(e, c, targets, **kwargs):
        return linear_cross_entropy(e, c, targets, **kwargs) - (e * c[targets]).sum(1)

    monkeypatch.setattr(cut_cross_entropy, "linear_cross_entropy", lse_minus_target_as_lse)
    inputs = make_inputs(16, 256, 32, torch.float32, classes=5)
    with pytest.raises(AssertionError, match="cut_ce loss: relative error"):
        check_agreement(IMPLS["cut_ce"], inputs, 6, (), "cpu")


def test_agreement_check_fails_on_a_wrong_implementation():
    def wrong_build(k, device):
        def loss(query, key, queue, query_labels, queue_labels):   # temperature off by 1%
            return kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=k,
                                     temperature=TEMPERATURE * 1.01, seed=SEED, backend="cpu")
        return loss

    wrong = dataclasses.replace(IMPLS["fused_cpu"], name="wrong", build=wrong_build)
    inputs = make_inputs(16, 256, 32, torch.float32, classes=5)
    with pytest.raises(AssertionError, match="relative error"):
        check_agreement(wrong, inputs, 6, ("query",), "cpu")


def test_work_counting():
    n, q, d = 256, 65536, 128
    assert counted_flops(q + 1, n, d, "forward") == 2 * n * (q + 1) * d
    assert counted_flops(q + 1, n, d, "forward+backward") == 4 * n * (q + 1) * d
    assert counted_flops(q + 1, n, d, "forward+backward", ("query", "key", "queue")) == \
        6 * n * (q + 1) * d
    forward = (n + q + 1) * d * 4 + (n + q) * 8
    assert counted_bytes(q + 1, n, q, d, torch.float32, "forward") == forward
    assert counted_bytes(q + 1, n, q, d, torch.bfloat16, "forward+backward") == (
        2 * ((n + q + 1) * d * 2 + (n + q) * 8) + n * d * 2)
    assert counted_bytes(q + 1, n, q, d, torch.float32, "forward+backward", ("query", "key")) == (
        2 * forward + n * d * 4 + (n + q) * d * 4)


def test_cpu_grid_compares_with_what_users_write():
    points = grid.cases("cpu")
    assert all(c.skip is None for c in points)        # the CPU budget holds every dense point
    fused = [c for c in points if c.impl == "fused_cpu" and c.k == 6]
    assert max(c.q for c in fused) == 262144
    assert {c.impl for c in points} == {"fused_cpu", "dense", "dense_compiled", "chunked",
                                        "supcon_mask", "supcon_mask_compiled", "pml_supcon",
                                        "cut_ce"}
    # every fused point of the headline shapes has the dense loss, eager and compiled, beside it
    for c in fused:
        if c.q <= 65536:
            for other in ("dense", "dense_compiled"):
                assert dataclasses.replace(c, impl=other) in points, (c, other)
            # and, in float32, kpos_loss written on cut-cross-entropy
            if c.dtype == "float32":
                assert dataclasses.replace(c, impl="cut_ce") in points, c
    assert {c.grads for c in points if c.mode == "forward+backward"} == {"query", "all"}


def test_dense_points_above_the_budget_are_skipped_with_a_reason():
    points = grid.cases("cuda")
    dense_big = [c for c in points if c.impl in grid.DENSE and c.n * c.q > 2**28]
    assert dense_big and all("budget" in c.skip for c in dense_big)


def test_gpu_check_profile_times_the_compiled_dense_loss_first():
    points = grid.cases("cuda-check")
    assert points[0].impl == "dense_compiled" and points[0].dtype == "bfloat16"
    assert {(c.n, c.q, c.d) for c in points} == {(256, 65536, 128), (4096, 65536, 128)}
    assert {c.k for c in points} == {0, 6, -1}
    assert {"cuda", "triton", "dense", "dense_compiled", "inf_cl", "cut_ce"} == \
        {c.impl for c in points}


def _fake_run(tmp_path):
    """pytest-benchmark's JSON of a run as `python -m benchmarks.run` writes it."""
    benchmarks = []
    for impl, k in (("fused_cpu", 6), ("dense", 6), ("cut_ce", 6), ("fused_cpu", -1),
                    ("pml_supcon", -1)):
        for q in (4096, 65536):
            for mode in ("forward", "forward+backward"):
                slow = {"fused_cpu": 1, "dense": 3, "cut_ce": 2}.get(impl, 3)
                benchmarks.append({"stats": {"median": 1e-6 * q * slow, "iqr": 0.1, "mean": 0.2,
                                             "stddev": 0.3, "min": 0.01, "max": 0.9,
                                             "rounds": 3},
                                   "extra_info": {
                    "impl": impl, "k": k, "mode": mode, "n": 256, "q": q, "d": 128,
                    "dtype": "float32", "classes": 1000, "grads": "query", "device": "cpu",
                    "description": f"{impl} described", "gflops": 1.0, "gbps": 1.0,
                    "fraction_of_matmul_ceiling": 0.01, "fraction_of_copy_ceiling": 0.1,
                    "matmul_ceiling_gflops": 100.0, "gemm_bound_s": 0.5e-6 * q,
                    "first_call_s": 1 / 3, "peak_extra_bytes": 2**20 * (
                        1 if impl == "fused_cpu" else q // 1024),
                    "memory_method": "fresh forked process, ru_maxrss", "threads": 2,
                    "compared_with": "reference", "check_rows": 64, "check_tolerance": 1e-4,
                    "check_loss_error": 1e-7}})
    data = {"benchmarks": benchmarks, "version": "5.3.1", "datetime": "2026-01-01T00:00:01",
            "machine_info": {"cpu_model": "test cpu", "torch_threads": 2, "torch": "2.14.1",
                             "cpu": {"flags": ["avx2"] * 100}},
            "kcl": {"device": "cpu", "profile": "cpu", "commit": "0123456789abcdef",
                    "commit_dirty": False, "date_utc": "2026-01-01",
                    "ceilings": {"matmul_gflops_float32": 100.0, "copy_gbps": 10.0},
                    "skipped": [{"impl": "dense", "k": 6, "mode": "forward", "n": 256,
                                 "q": 262144, "d": 128, "dtype": "float32", "classes": 1000,
                                 "grads": "query", "skip": "budget",
                                 "reason": "dense N x Q implementation above this run's budget"}]}}
    path = tmp_path / "runs" / "cpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


def test_publish_writes_one_flat_csv_and_metadata(tmp_path):
    run = _fake_run(tmp_path)
    results = tmp_path / "results"
    publish.main([str(run), "--results", str(results), "--no-render"])
    assert sorted(os.listdir(results)) == ["cpu.csv", "cpu.meta.json"]   # no raw JSON copied
    rows, meta = results_table.read(str(results / "cpu.csv"))
    measured = [r for r in rows if r["status"] == "measured"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(measured) == 20 and len(skipped) == 1
    assert skipped[0]["skip_reason"].startswith("dense N x Q") and skipped[0]["median_s"] is None
    original = json.loads(run.read_text())["benchmarks"]
    point = next(r for r in measured if (r["impl"], r["q"], r["mode"]) ==
                 ("cut_ce", 65536, "forward"))
    source = next(b for b in original if (b["extra_info"]["impl"], b["extra_info"]["q"],
                                          b["extra_info"]["mode"]) == ("cut_ce", 65536,
                                                                       "forward"))
    assert point["median_s"] == source["stats"]["median"]        # floats read back exactly
    assert point["first_call_s"] == 1 / 3
    assert (point["iqr_s"], point["rounds"], point["k"], point["peak_extra_bytes"]) == \
        (0.1, 3, 6, 64 * 2**20)
    assert (point["device"], point["compared_with"], point["check_loss_error"]) == \
        ("cpu", "reference", 1e-7)
    assert point["check_grad_error"] is None and point["timer_median_s"] is None
    assert meta["commit"] == "0123456789abcdef" and meta["profile"] == "cpu"
    assert meta["machine"] == {"cpu_model": "test cpu", "torch_threads": 2, "torch": "2.14.1"}
    assert meta["ceilings"]["copy_gbps"] == 10.0
    assert meta["implementations"]["cut_ce"] == "cut_ce described"
    header = (results / "cpu.csv").read_text().splitlines()[0]
    assert header == ",".join(results_table.COLUMNS)


def test_results_table_rejects_unknown_columns_and_a_missing_metadata_file(tmp_path):
    with pytest.raises(ValueError, match="outside COLUMNS: \\['speed'\\]"):
        results_table.write(str(tmp_path), [{"impl": "x", "speed": 1}], {"profile": "cpu"})
    (tmp_path / "cpu.csv").write_text(",".join(results_table.COLUMNS) + "\n")
    with pytest.raises(FileNotFoundError, match="no metadata file"):
        results_table.read(str(tmp_path / "cpu.csv"))


def test_render_writes_table_ratios_and_plots(tmp_path):
    run_json = _fake_run(tmp_path)
    results = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    publish.main([str(run_json), "--results", str(results), "--readme", str(readme),
                  "--note", "a quiet test machine."])
    text = readme.read_text()
    full = (tmp_path / "docs" / "benchmark_results.md").read_text()
    assert "\nConditions: a quiet test machine.\n" in text
    assert text.startswith("# project\n\nintro\n") and render.BEGIN in text
    assert "commit `0123456789`" in text and "commit `0123456789`" in full
    assert "[`results/cpu.csv`](results/cpu.csv)" in text
    assert "[`../results/cpu.csv`](../results/cpu.csv)" in full and "skipped" in full
    assert "[docs/benchmark_results.md](docs/benchmark_results.md)" in text
    # the time / memory tables are in the report only; the README has the headline speed-ups
    assert "| KCL on cut-cross-entropy, k=6 | 8.19 / 4.0 | 131 / 64.0 |" in full
    assert "8.19 / 4.0" not in text and "| 4096 |" not in text
    # the dense loss takes 3x the fused op and 64x its memory at Q=65536, cut-cross-entropy 2x,
    # as put in the fake run; the fused op is at twice its GEMM bound
    run = render.load(str(results / "cpu.csv"))
    found = {(e["k"], e["mode"], e["q"]): e for e in render.ratios(run)}
    headline = found[(6, "forward", 65536)]
    assert headline["others"]["dense"]["speedup"] == pytest.approx(3)
    assert headline["others"]["cut_ce"]["speedup"] == pytest.approx(2)
    assert headline["gemm_bound"] == pytest.approx(2)
    assert found[(-1, "forward+backward", 65536)]["others"]["pml_supcon"]["memory"] == \
        pytest.approx(1 / 64)
    assert "3.00×" in text and "2.00×" in text and "3.00×" in full
    assert (results / "cpu_time_vs_q.png").stat().st_size > 0
    assert (results / "cpu_memory_vs_q.png").stat().st_size > 0
    render.main(["--results", str(results), "--readme", str(readme)])   # idempotent
    assert readme.read_text() == text
    assert (tmp_path / "docs" / "benchmark_results.md").read_text() == full


def test_documented_throughput_rows_are_the_committed_table():
    """docs/training.md's CPU throughput table and its R_kcl / R_ce are the rows of
    throughput.csv."""
    rows = throughput_table.read()
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs",
                               "training.md")).read()
    for variant, cells in (("data_workers0", "(none) | Fashion-MNIST-LT | 0"),
                           ("synthetic_workers0", "`--synthetic` | synthetic 28 px, 1 channel | 0"),
                           ("synthetic_workers1", "`--synthetic --num-workers 1` | synthetic 28 "
                                                  "px, 1 channel | 1")):
        runs = [rows[f"cpu_fmnist_kcl_{variant}_run{i}"] for i in (1, 2, 3)]
        rates = [float(r["images_per_s"]) for r in runs]
        waits = [100 * float(r["data_wait_fraction"]) for r in runs]
        median_rate, median_wait = sorted(rates)[1], sorted(waits)[1]
        line = (f"| {cells} | {median_rate:.0f} ({', '.join(f'{x:.0f}' for x in rates)}) | "
                f"{median_wait:.0f} % ({', '.join(f'{x:.1f}' for x in waits)}) |")
        assert line in readme, line
        assert all(r["config_queue_size"] == "1024" and r["steps"] == "30" for r in runs)
    r_kcl = float(rows["cpu_r50_kcl_synthetic_workers0"]["images_per_s"])
    r_ce = float(rows["cpu_r50_ce_synthetic_workers0"]["images_per_s"])
    assert re.search(rf"R_kcl = {r_kcl:.1f} and R_ce = {r_ce:.1f}\s+images/s", readme)


def test_throughput_table_keeps_the_json_numbers_exactly(tmp_path):
    run = {"images_per_s": 1101.33, "data_wait_fraction": 0.1037, "data_wait_ms_median": 6.019,
           "step_ms_median_host": 57.242, "wall_s": 1.743, "steps": 2, "warmup_steps": 1,
           "global_batch": 64, "processes": 1,
           "per_step": [{"data_wait_ms": 6.136, "host_ms": 57.773},
                        {"data_wait_ms": 5.87, "host_ms": 55.479}],
           "config": {"arch": "small_resnet", "queue_size": 1024, "channels_last": False},
           "provenance": {"commit": "abc", "versions": {"torch": "2.14.1"},
                          "device": {"name": "cpu x", "threads": 2},
                          "argv": ["references/kcl/throughput.py", "--json", "a.json"]}}
    (tmp_path / "a_run1.json").write_text(json.dumps(run))
    table = tmp_path / "throughput.csv"
    throughput_table.main([str(tmp_path / "a_run1.json"), "--table", str(table)])
    throughput_table.main([str(tmp_path / "a_run1.json"), "--table", str(table)])  # replaced
    rows = throughput_table.read(str(table))
    assert list(rows) == ["a_run1"]
    row = rows["a_run1"]
    assert float(row["images_per_s"]) == 1101.33 and row["data_wait_fraction"] == "0.1037"
    assert row["per_step_host_ms"] == "57.773 55.479" and row["config_channels_last"] == "false"
    assert (row["torch"], row["device_name"], row["argv"]) == (
        "2.14.1", "cpu x", "references/kcl/throughput.py --json a.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a `throughput.py --json` result"):
        throughput_table.main([str(tmp_path / "bad.json"), "--table", str(table)])


def test_in_cache_gemm_rate_is_measured_in_the_points_dtype():
    """bfloat16 points are bounded by a bfloat16 product's rate (the CPU kernel's bfloat16 path),
    float16 and float32 points by float32's; the measurement restores the thread count."""
    threads = torch.get_num_threads()
    rates = measure_in_cache_gemm((torch.float32, torch.float16, torch.bfloat16), repeats=2)
    assert torch.get_num_threads() == threads
    assert rates["in_cache_gemm_threads"] == threads
    assert rates["in_cache_gemm_gflops_float16"] == rates["in_cache_gemm_gflops_float32"] > 0
    assert rates["in_cache_gemm_gflops_bfloat16"] > 0
    assert rates["in_cache_gemm_gflops_bfloat16"] != rates["in_cache_gemm_gflops_float32"]


def test_render_reads_a_runs_json_as_its_published_table(tmp_path):
    # tools/gpu_report.py reads the GPU check's JSON where the machine left it, unpublished.
    run_json = _fake_run(tmp_path)
    publish.main([str(run_json), "--results", str(tmp_path / "results"), "--no-render"])
    from_json = render.load(str(run_json))
    from_table = render.load(str(tmp_path / "results" / "cpu.csv"))
    assert render.ratios(from_json) == render.ratios(from_table) != []
    assert from_json["kcl"]["skipped"] == from_table["kcl"]["skipped"] != []


def test_cut_cross_entropy_on_cuda_needs_kcl_exts_cuda_positives():
    # Its positives come from kcl_ext.sample_positives on the labels' device: without kcl_ext's
    # CUDA kernels the GPU point is skipped with that reason instead of failing.
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("kcl::sample_positives",
                                                                       "CUDA")
    reason = IMPLS["cut_ce"].needs("cuda")
    assert (reason is None) == has_cuda_kernels
    assert has_cuda_kernels or "without CUDA kernels" in reason
    assert IMPLS["cut_ce"].needs("cpu") is None
