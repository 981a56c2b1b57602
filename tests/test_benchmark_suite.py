"""The benchmark suite's own logic, on tiny shapes: the exact peer mappings, the agreement check
(including that it fails on a wrong implementation), the work counting, the grid's budget and the
README rendering. No timing here: timings live in benchmarks/.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import kcl_ext
from benchmarks import grid, peers, render
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
    ("fused_cpu", 0, ("query", "key", "queue"))])
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
                                        "supcon_mask", "supcon_mask_compiled", "pml_supcon"}
    # every fused point of the headline shapes has the dense loss, eager and compiled, beside it
    for c in fused:
        if c.q <= 65536:
            for other in ("dense", "dense_compiled"):
                assert dataclasses.replace(c, impl=other) in points, (c, other)
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
    assert {"cuda", "triton", "dense", "dense_compiled", "inf_cl"} == {c.impl for c in points}


def _fake_run(tmp_path):
    benchmarks = []
    for impl, k in (("fused_cpu", 6), ("dense", 6), ("fused_cpu", -1), ("pml_supcon", -1)):
        for q in (4096, 65536):
            for mode in ("forward", "forward+backward"):
                slow = 1 if impl == "fused_cpu" else 3
                benchmarks.append({"stats": {"median": 1e-6 * q * slow, "iqr": 0.0, "rounds": 3},
                                   "extra_info": {
                    "impl": impl, "k": k, "mode": mode, "n": 256, "q": q, "d": 128,
                    "dtype": "float32", "grads": "query", "gflops": 1.0, "gbps": 1.0,
                    "fraction_of_matmul_ceiling": 0.01, "fraction_of_copy_ceiling": 0.1,
                    "gemm_bound_s": 0.5e-6 * q,
                    "peak_extra_bytes": 2**20 * (1 if impl == "fused_cpu" else q // 1024),
                    "compared_with": "reference", "check_loss_error": 1e-7}})
    data = {"benchmarks": benchmarks, "machine_info": {"cpu_model": "test cpu", "torch_threads": 2},
            "kcl": {"device": "cpu", "commit": "0123456789abcdef", "date_utc": "2026-01-01",
                    "ceilings": {"matmul_gflops_float32": 100.0, "copy_gbps": 10.0},
                    "skipped": [{"impl": "dense", "k": 6, "mode": "forward", "n": 256,
                                 "q": 262144, "dtype": "float32", "grads": "query",
                                 "reason": "dense N x Q implementation above this run's budget"}]}}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    return path


def test_render_writes_table_ratios_and_plots(tmp_path):
    _fake_run(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    render.main(["--results", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n") and render.BEGIN in text
    assert "commit `0123456789`" in text and "skipped" in text
    # the dense loss takes 3x the fused op and 64x its memory at Q=65536, as put in the fake run;
    # the fused op is at twice its GEMM bound
    run = render.load(str(tmp_path / "cpu.json"))
    found = {(e["k"], e["mode"], e["q"]): e for e in render.ratios(run)}
    headline = found[(6, "forward", 65536)]
    assert headline["others"]["dense"]["speedup"] == pytest.approx(3)
    assert headline["gemm_bound"] == pytest.approx(2)
    assert found[(-1, "forward+backward", 65536)]["others"]["pml_supcon"]["memory"] == \
        pytest.approx(1 / 64)
    assert "3.00×" in text
    assert (tmp_path / "cpu_time_vs_q.png").stat().st_size > 0
    assert (tmp_path / "cpu_memory_vs_q.png").stat().st_size > 0
    render.main(["--results", str(tmp_path), "--readme", str(readme)])   # idempotent
    assert readme.read_text() == text


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
