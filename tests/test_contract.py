"""The contract of kpos_loss (docs/kpos_loss.md), written once and run on every backend.

Each test takes a `backend` parameter: `cpu` (the fused C++ kernel), `cuda` (the CUDA kernels,
on a GPU) and `triton` (the Triton kernels: on a GPU, or in Triton's interpreter on the CPU). A
backend that cannot run here is skipped with the reason. Every backend is compared with the dense
reference (kcl_ext/reference.py) on fresh random inputs, with one input factory and one tolerance
table (tests/_backends.py). Backend files (test_cpu.py, test_cuda.py, test_triton.py) keep only
what is specific to one backend.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import kcl_ext
from kcl_ext import reference
from _backends import (Ops, assert_close, backend_params, device_of, grad_weights,
                       interpreted, loss_and_grads, make_inputs, reference_float64)

ALL = backend_params()
KS = [0, 1, 6, -1]
# (N, Q, D): single rows, an empty queue, a one-entry queue, odd sizes that are multiples of no
# block, several queue tiles, D wider than one block; Q = 20000 spans two of the CPU kernel's
# queue chunks (16384), so the chunk merge runs.
SHAPES = [(1, 0, 3), (1, 1, 3), (37, 1, 128), (37, 1031, 3), (37, 1031, 128), (130, 2100, 16),
          (9, 200, 200), (5, 20000, 8)]
# The interpreter runs programs one after another in numpy: small shapes, still several row
# blocks, queue tiles and splits of its launch configuration (blocks of 16 x 32).
INTERPRETED_SHAPES = [(1, 0, 3), (1, 1, 3), (21, 70, 24), (37, 131, 16)]


def shapes_for(backend):
    return INTERPRETED_SHAPES if interpreted(backend) else SHAPES


def inputs_for(backend, n, q, d, **kwargs):
    return make_inputs(n, q, d, device=device_of(backend), **kwargs)


def shape_id(shape):
    return "N%dQ%dD%d" % shape


# ----------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ----------------------------------------------------------------------------------------------
SHAPE_CASES = [pytest.param(p.values[0], shape, id=f"{p.id}-{shape_id(shape)}", marks=p.marks)
               for p in ALL for shape in shapes_for(p.values[0])]


@pytest.mark.parametrize("backend,shape", SHAPE_CASES)
@pytest.mark.parametrize("k", KS)
def test_matches_reference_float32(backend, shape, k):
    n, q, d = shape
    x = inputs_for(backend, n, q, d, seed=n * 1000 + q + d, negative_queries=min(n - 1, 2))
    weights = grad_weights(n, torch.float32, device_of(backend))
    kw = dict(k=k, temperature=0.1, reduction="none", seed=4242)
    loss, grads = loss_and_grads(Ops(backend).loss, x, weights, **kw)
    ref_loss, ref_grads = loss_and_grads(reference_float64, x, weights, **kw)
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    assert_close(loss, ref_loss, backend, torch.float32, f"loss k={k} {shape_id((n, q, d))}")
    for name, g, rg in zip(("query", "key", "queue"), grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == torch.float32, name
        assert_close(g, rg, backend, torch.float32, f"grad of {name} k={k}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, reduction):
    n, q, d = (21, 70, 24) if interpreted(backend) else (45, 700, 32)
    x = inputs_for(backend, n, q, d, seed=7)
    loss, grads = loss_and_grads(Ops(backend).loss, x, k=3, reduction=reduction, seed=5)
    ref_loss, ref_grads = loss_and_grads(reference_float64, x, k=3, reduction=reduction, seed=5)
    assert loss.shape == ()
    assert_close(loss, ref_loss, backend, torch.float32, f"loss, reduction={reduction}")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, backend, torch.float32, f"gradient, reduction={reduction}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("k", [1, 6, -1])
def test_dtypes(backend, dtype, k):
    n, q, d = (21, 70, 24) if interpreted(backend) else (45, 1500, 64)
    x = inputs_for(backend, n, q, d, dtype=dtype, seed=3, negative_queries=1)
    weights = grad_weights(n, dtype, device_of(backend))
    loss, grads = loss_and_grads(Ops(backend).loss, x, weights, k=k, reduction="none", seed=11)
    ref_loss, ref_grads = loss_and_grads(reference_float64, x, weights.double(), k=k,
                                         reduction="none", seed=11)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(loss, ref_loss, backend, dtype, f"loss k={k}")
    for name, g, rg in zip(("query", "key", "queue"), grads, ref_grads):
        assert_close(g, rg, backend, dtype, f"grad of {name} k={k}")


@pytest.mark.parametrize("backend", ALL)
def test_non_contiguous_inputs_give_the_same_result(backend):
    n, q, d = (21, 70, 24) if interpreted(backend) else (33, 700, 20)
    x = inputs_for(backend, n, q, 2 * d, seed=5, requires_grad=(False, False, False))
    # Strided columns, a transposed copy, strided labels.
    query = x[0][:, ::2].requires_grad_()
    key = x[1][:, 1::2].t().contiguous().t().requires_grad_()
    queue = x[2][:, :d].requires_grad_()
    query_labels = torch.stack([x[3], x[3]], 1)[:, 0]
    queue_labels = torch.stack([x[4], x[4]], 1)[:, 1]
    strided = (query, key, queue, query_labels, queue_labels)
    assert not any(t.is_contiguous() for t in (query, queue, query_labels, queue_labels))
    dense = tuple(t.detach().contiguous().requires_grad_(t.requires_grad) for t in strided)
    weights = grad_weights(n, torch.float32, device_of(backend))
    got = loss_and_grads(Ops(backend).loss, strided, weights, k=3, reduction="none", seed=1)
    want = loss_and_grads(Ops(backend).loss, dense, weights, k=3, reduction="none", seed=1)
    ref = loss_and_grads(reference_float64, dense, weights, k=3, reduction="none", seed=1)
    for a, b, r in zip([got[0], *got[1]], [want[0], *want[1]], [ref[0], *ref[1]]):
        assert torch.equal(a, b)
        assert_close(a, r, backend, torch.float32, "non-contiguous")


@pytest.mark.parametrize("backend", ALL)
def test_label_dtypes_and_negative_query_labels(backend):
    n, q, d = (20, 60, 8) if interpreted(backend) else (20, 300, 8)
    x = inputs_for(backend, n, q, d, seed=9)
    query_labels = x[3].to(torch.int32)
    query_labels[:5] = -3  # no class: only the own key is positive
    y = (x[0], x[1], x[2], query_labels, x[4].to(torch.int16))
    loss, grads = loss_and_grads(Ops(backend).loss, y, k=2, seed=3, reduction="none")
    ref_loss, ref_grads = loss_and_grads(reference_float64, y, k=2, seed=3, reduction="none")
    assert_close(loss, ref_loss, backend, torch.float32, "loss")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, backend, torch.float32, "gradient")


# ----------------------------------------------------------------------------------------------
# Degenerate inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("q", [0, 50])
def test_no_valid_queue_entry_gives_zero_loss_and_gradients(backend, q):
    x = inputs_for(backend, 6, q, 8, seed=2)
    x[4].fill_(-1)
    weights = grad_weights(6, torch.float32, device_of(backend))
    loss, grads = loss_and_grads(Ops(backend).loss, x, weights, k=6, seed=0, reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    x = inputs_for(backend, 0, 40, 8)
    loss = Ops(backend).loss(*x, k=6, reduction=reduction, seed=0)
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.shape == ()
    if reduction == "mean":
        assert math.isnan(float(loss.detach()))
        return
    grads = torch.autograd.grad(loss.sum(), x[:3])
    assert grads[0].shape == (0, 8) and grads[1].shape == (0, 8)
    assert torch.equal(grads[2], torch.zeros_like(x[2]))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("wanted", [("query",), ("key",), ("queue",), ("query", "queue")],
                         ids=lambda w: "+".join(w))
def test_gradient_only_for_what_requires_it(backend, wanted):
    names = ("query", "key", "queue")
    n, q, d = (21, 70, 24) if interpreted(backend) else (16, 500, 32)
    x = inputs_for(backend, n, q, d, seed=4,
                   requires_grad=tuple(name in wanted for name in names))
    weights = grad_weights(n, torch.float32, device_of(backend))
    loss, grads = loss_and_grads(Ops(backend).loss, x, weights, k=6, seed=8, reduction="none")
    ref_loss, ref_grads = loss_and_grads(reference_float64, x, weights, k=6, seed=8,
                                         reduction="none")
    assert len(grads) == len(wanted)
    for name, g, rg in zip(wanted, grads, ref_grads):
        assert_close(g, rg, backend, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("k", [0, 3, -1])
def test_backward_without_the_forwards_softmax_mean(backend, k):
    """A forward run without `query_grad` (its softmax_mean is empty) still gives the query's
    gradient: the backward then makes its own pass over the queue."""
    ops = Ops(backend)
    n, q, d = (21, 70, 24) if interpreted(backend) else (20, 1300, 16)
    x = inputs_for(backend, n, q, d, seed=8, requires_grad=(False, False, False))
    with_mean = ops.forward(*x, k, 0.1, 3, True)
    without = ops.forward(*x, k, 0.1, 3, False)
    assert with_mean[5].shape == (n, d) and without[5].shape == (0, d)
    for a, b in zip(with_mean[:5], without[:5]):
        assert torch.equal(a, b)
    grad_rows = grad_weights(n, torch.float32, device_of(backend))
    full = ops.backward_op(grad_rows, *x, *with_mean[1:], k, 0.1, [True, True, True])
    part = ops.backward_op(grad_rows, *x, *without[1:], k, 0.1, [True, True, True])
    for a, b in zip(full, part):
        assert_close(a, b, backend, torch.float32, "backward without softmax_mean")
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        masked = ops.backward_op(grad_rows, *x, *with_mean[1:], k, 0.1, mask)
        for wanted, got, want in zip(mask, masked, full):
            if wanted:
                assert torch.equal(got, want)
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("backend", ALL)
def test_double_backward_raises(backend):
    x = inputs_for(backend, 5, 20, 4, seed=1)
    loss = Ops(backend).loss(*x, k=2, seed=3)
    (grad_query,) = torch.autograd.grad(loss, x[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_query.sum().backward()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("k", [0, 2, -1])
def test_gradcheck_float64(backend, k):
    x = inputs_for(backend, 5, 17, 4, dtype=torch.float64, seed=k + 10, empty_fraction=0.2,
                   negative_queries=1)

    def fn(query, key, queue):
        return Ops(backend).loss(query, key, queue, x[3], x[4], k=k, temperature=0.5,
                                 reduction="none", seed=77)

    assert torch.autograd.gradcheck(fn, x[:3], eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("query_grad", [False, True])
def test_opcheck_forward_and_backward(backend, query_grad):
    ops = Ops(backend)
    x = inputs_for(backend, 7, 40, 6, seed=1)
    torch.library.opcheck(ops.forward_op, ops.forward_args(x, 3, 0.2, 5, query_grad))
    detached = tuple(t.detach() for t in x)
    state = ops.forward(*detached, 3, 0.2, 5, query_grad)
    grad_rows = grad_weights(7, torch.float32, device_of(backend))
    # The backward has no derivative of its own (double backward raises), so no autograd test.
    torch.library.opcheck(ops.backward_op,
                          (grad_rows, *detached, *state[1:], 3, 0.2, [True, False, True]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda")))
def test_opcheck_loss_and_sample_positives(backend):
    x = inputs_for(backend, 7, 40, 6, seed=1)
    torch.library.opcheck(torch.ops.kcl.kpos_loss.default, (*x, 3, 0.2, "mean", 5))
    torch.library.opcheck(torch.ops.kcl.sample_positives.default, (x[3], x[4], 3, 5))


@pytest.mark.parametrize("backend", ALL)
def test_torch_compile_fullgraph_no_graph_break(backend):
    # Inductor where the kernels can be captured; under the Triton interpreter the op is an opaque
    # custom op, so the light aot_eager backend checks registration, fakes and autograd.
    compile_backend = "aot_eager" if interpreted(backend) else "inductor"
    torch._dynamo.reset()
    n, q, d = (21, 70, 24) if interpreted(backend) else (12, 300, 16)
    x = inputs_for(backend, n, q, d, seed=6)

    def step(query, key, queue, query_labels, queue_labels, seed):
        loss = kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=4, seed=seed,
                                 backend=backend)
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    got = loss_and_grads(compiled, x, seed=21)
    want = loss_and_grads(step, x, seed=21)
    for a, b in zip([got[0], *got[1]], [want[0], *want[1]]):
        assert_close(a, b, backend, torch.float32, "compiled")
    explanation = torch._dynamo.explain(step)(*x, 21)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    # seed=None: the compiled graph draws the seed at run time, from the generator, as eager does
    # (the same draw as an explicit seed taken with torch.randint; inductor may sum the mean in
    # another order than eager, so the compiled graph is compared with itself).
    torch.manual_seed(11)
    drawn = compiled(*x, None)
    torch.manual_seed(11)
    explicit = int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64))
    assert torch.equal(drawn, compiled(*x, explicit))
    torch.manual_seed(11)
    assert_close(drawn, step(*x, None), backend, torch.float32, "compiled")
    torch.manual_seed(12)
    assert not torch.equal(drawn, compiled(*x, None)), "another generator state, another draw"


# ----------------------------------------------------------------------------------------------
# Determinism and the selection
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(backend, dtype):
    n, q, d = (21, 70, 24) if interpreted(backend) else (100, 5000, 64)
    x = inputs_for(backend, n, q, d, dtype=dtype, classes=10, seed=12)
    weights = grad_weights(n, dtype, device_of(backend))
    first = loss_and_grads(Ops(backend).loss, x, weights, k=6, seed=99, reduction="none")
    for _ in range(2):
        again = loss_and_grads(Ops(backend).loss, x, weights, k=6, seed=99, reduction="none")
        assert torch.equal(first[0], again[0])
        for a, b in zip(first[1], again[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL)
def test_seed_none_follows_torch_manual_seed(backend):
    x = inputs_for(backend, 30, 100 if interpreted(backend) else 400, 8, classes=2, seed=13)
    torch.manual_seed(1)
    a = Ops(backend).loss(*x, k=2, reduction="none")
    torch.manual_seed(1)
    b = Ops(backend).loss(*x, k=2, reduction="none")
    c = Ops(backend).loss(*x, k=2, reduction="none")  # the generator moved on: another selection
    torch.manual_seed(1)
    ref = kcl_ext.kpos_loss_reference(*x, k=2, reduction="none")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert_close(a, ref, backend, torch.float32, "seed=None")


SEEDS = [0, -1, 2**63 - 1, -(2**63), 987654321987]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("k", [0, 1, 3, 6, -1, 20])
def test_forward_selects_the_reference_positives(backend, k):
    """The forward's positives are sample_positives' indices and the reference's selection, for
    every seed; |P_i| counts them. Q = 120 over 2 classes: ~40 same-class entries per row (more
    than one chunk of the Triton selection kernel in the interpreter); k = 20 takes its
    bisection path."""
    ops = Ops(backend)
    x = inputs_for(backend, 10, 120, 4, classes=2, seed=k + 7, negative_queries=1,
                   requires_grad=(False, False, False))
    query_labels, queue_labels = x[3].cpu(), x[4].cpu()
    for seed in SEEDS:
        _, _, positives, num_positives, _, _ = ops.forward(*x, k, 0.1, seed)
        mask = reference.selection_mask(query_labels, queue_labels, k, seed)
        assert torch.equal(num_positives.cpu(), 1 + mask.sum(1)), f"seed {seed}"
        if k > 0:
            assert positives.shape == (10, k)
            want = kcl_ext.sample_positives_reference(query_labels, queue_labels, k, seed)
            assert torch.equal(positives.cpu(), want), f"seed {seed}"
        else:
            assert positives.shape == (10, 0)


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda")))
@pytest.mark.parametrize("k", [0, 1, 3, 6, -1, 10_000])
@pytest.mark.parametrize("classes", [1, 7, 300])
def test_sample_positives_matches_reference(backend, k, classes):
    x = inputs_for(backend, 50, 2000, 1, classes=classes, seed=k + classes, negative_queries=2)
    seed = 2**62 + 17
    got = kcl_ext.sample_positives(x[3], x[4], k, seed)
    want = kcl_ext.sample_positives_reference(x[3].cpu(), x[4].cpu(), k, seed)
    assert got.device == x[3].device and torch.equal(got.cpu(), want)
    mask = reference.selection_mask(x[3].cpu(), x[4].cpu(), k, seed)
    counts = reference.same_class_mask(x[3].cpu(), x[4].cpu()).sum(1)
    expected = counts if k == -1 else counts.clamp(max=max(k, 0))
    assert torch.equal(mask.sum(1), expected)
    assert torch.equal((got.cpu() >= 0).sum(1), expected)


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda")))
def test_sample_positives_int32_labels_and_empty(backend):
    device = device_of(backend)
    query_labels = torch.tensor([0, 1, -1, 2], dtype=torch.int32, device=device)
    queue_labels = torch.tensor([1, 0, 0, -1, 1, 0], dtype=torch.int32, device=device)
    got = kcl_ext.sample_positives(query_labels, queue_labels, -1, 5)
    assert got.tolist() == [[1, 2, 5], [0, 4, -1], [-1, -1, -1], [-1, -1, -1]]
    assert kcl_ext.sample_positives(query_labels[:0], queue_labels, -1, 5).shape == (0, 0)
    no_queue = kcl_ext.sample_positives(query_labels, queue_labels[:0], 4, 5)
    assert no_queue.shape == (4, 4) and bool((no_queue == -1).all())


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda")))
def test_selection_is_uniform_and_independent_across_queries(backend):
    # One class with 20 entries in a queue of 60; k = 6. Over 3000 seeds each same-class entry
    # must be drawn with frequency k / |M| = 0.3 (chi-square), and two queries must not draw the
    # same subsets (independence).
    from scipy import stats
    device = device_of(backend)
    queue_labels = torch.tensor([0, 1, 2] * 20, device=device)
    query_labels = torch.tensor([0, 0], device=device)
    same_class = (queue_labels == 0).nonzero().flatten().cpu()
    counts = torch.zeros(60, dtype=torch.int64)
    same_subset = 0
    seeds = 3000
    for seed in range(seeds):
        picked = kcl_ext.sample_positives(query_labels, queue_labels, 6, seed).cpu()
        counts.index_add_(0, picked[0], torch.ones(6, dtype=torch.int64))
        same_subset += int(torch.equal(picked[0], picked[1]))
    assert counts.sum() == 6 * seeds and counts[queue_labels.cpu() != 0].sum() == 0
    observed = counts[same_class].double().numpy()
    expected = [6 * seeds / 20] * 20
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # P(two independent draws pick the same 6-subset of 20) = 1 / C(20, 6) ~ 2.6e-5.
    assert same_subset <= 2


@pytest.mark.parametrize("backend", ALL)
def test_k0_is_moco_infonce(backend):
    x = inputs_for(backend, 24, 70 if interpreted(backend) else 500, 32, empty_fraction=0.0,
                   seed=14)
    moco = reference.moco_infonce(*(t.double() for t in x[:3]), temperature=0.07)
    assert_close(Ops(backend).loss(*x, k=0, temperature=0.07, seed=0), moco, backend,
                 torch.float32, "k=0 against MoCo's cross-entropy")


# ----------------------------------------------------------------------------------------------
# torch.autocast
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_half_query_against_float32_queue(backend, autocast_dtype):
    """A half-precision query from an autocast region against the float32 queue of a memory bank:
    the loss runs in float32 (docs/kpos_loss.md, "Autocast")."""
    device = device_of(backend)
    n, q, d = (21, 70, 24) if interpreted(backend) else (16, 300, 32)
    query, key, queue, query_labels, queue_labels = inputs_for(backend, n, q, d, seed=15)
    half_query = query.detach().to(autocast_dtype).requires_grad_()
    half_key = key.detach().to(autocast_dtype)
    with torch.autocast(device_type=device, dtype=autocast_dtype):
        loss = Ops(backend).loss(half_query, half_key, queue, query_labels, queue_labels, k=3,
                                 seed=2)
        raw = None
        if backend != "triton":
            raw = torch.ops.kcl.kpos_loss(half_query, half_key, queue, query_labels,
                                          queue_labels, 3, 0.07, "mean", 2)
    assert loss.dtype == torch.float32
    (grad_query,) = torch.autograd.grad(loss, half_query)
    assert grad_query.dtype == autocast_dtype
    fp32 = (half_query.detach().float().requires_grad_(), half_key.float(), queue.detach(),
            query_labels, queue_labels)
    want, (want_grad,) = loss_and_grads(reference_float64, fp32, k=3, seed=2)
    assert_close(loss, want, backend, torch.float32, "loss under autocast")
    assert_close(grad_query, want_grad, backend, autocast_dtype, "gradient under autocast")
    if raw is not None:
        assert torch.equal(raw, loss)


# ----------------------------------------------------------------------------------------------
# The module and the backend argument
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_module_matches_function(backend):
    x = inputs_for(backend, 10, 100, 8, seed=15)
    criterion = kcl_ext.KPositiveContrastiveLoss(k=3, temperature=0.2, reduction="sum",
                                                 backend=backend)
    assert "k=3" in repr(criterion)
    assert torch.equal(criterion(*x, seed=4),
                       kcl_ext.kpos_loss(*x, k=3, temperature=0.2, reduction="sum", seed=4,
                                         backend=backend))


# ----------------------------------------------------------------------------------------------
# Bad input: one test per case, through the Python API, the reference and the raw ops.
# ----------------------------------------------------------------------------------------------
def _good(backend):
    return list(inputs_for(backend, 4, 10, 8, requires_grad=(False, False, False)))


BAD_TENSORS = [
    ("query 1-D", lambda x: x.__setitem__(0, x[0][0]), ValueError, "query must be 2-D [N, D]"),
    ("key rows", lambda x: x.__setitem__(1, x[1][:3]), ValueError, "key must be 2-D [N, D] = [4, 8]"),
    ("key width", lambda x: x.__setitem__(1, x[1][:, :7]), ValueError, "key must be 2-D [N, D]"),
    ("queue width", lambda x: x.__setitem__(2, x[2][:, :7]), ValueError,
     "queue must be 2-D [Q, D] with D = query.size(1) = 8, got [10, 7]"),
    ("queue 3-D", lambda x: x.__setitem__(2, x[2][None]), ValueError, "queue must be 2-D"),
    ("query_labels length", lambda x: x.__setitem__(3, x[3][:3]), ValueError,
     "query_labels must be 1-D [N] with N = query.size(0) = 4"),
    ("queue_labels length", lambda x: x.__setitem__(4, x[4][:9]), ValueError,
     "queue_labels must be 1-D [Q] with Q = queue.size(0) = 10"),
    ("labels 2-D", lambda x: x.__setitem__(3, x[3][:, None]), ValueError, "query_labels must be 1-D"),
    ("float labels", lambda x: x.__setitem__(4, x[4].float()), TypeError,
     "queue_labels must have an integer dtype"),
    ("bool labels", lambda x: x.__setitem__(3, x[3] > 0), TypeError,
     "query_labels must have an integer dtype"),
    ("dtype mismatch", lambda x: x.__setitem__(1, x[1].double()), TypeError,
     "key must have query's dtype torch.float32"),
    ("integer features", lambda x: [x.__setitem__(i, x[i].long()) for i in range(3)], TypeError,
     "query must be float32, float16, bfloat16 or float64"),
    ("device mismatch", lambda x: x.__setitem__(2, x[2].to("meta")), ValueError,
     "queue must be on query's device"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensor_raises(backend, case):
    name, mutate, error, message = case
    x = _good(backend)
    mutate(x)
    with pytest.raises(error, match=re.escape(message)):
        Ops(backend).loss(*x, seed=0)
    with pytest.raises(error, match=re.escape(message)):
        kcl_ext.kpos_loss_reference(*x, seed=0)
    if name == "device mismatch":  # the dispatcher refuses mixed devices before any kernel
        return
    raw = message.replace("torch.float32", "Float") if backend != "triton" else message
    with pytest.raises(error, match=re.escape(raw)):
        Ops(backend).forward(*x, 6, 0.07, 0)


BAD_SCALARS = [
    ("temperature zero", dict(temperature=0.0), ValueError, "temperature must be a positive finite float"),
    ("temperature negative", dict(temperature=-1.0), ValueError, "temperature must be a positive"),
    ("temperature inf", dict(temperature=float("inf")), ValueError, "temperature must be a positive"),
    ("temperature nan", dict(temperature=float("nan")), ValueError, "temperature must be a positive"),
    ("k below -1", dict(k=-2), ValueError, "k must be >= -1"),
    ("k not int", dict(k=1.5), TypeError, "k must be an int"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("seed range", dict(seed=2**64), ValueError, "seed must fit in int64"),
    ("seed type", dict(seed="1"), TypeError, "seed must be an int or None"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", BAD_SCALARS, ids=[c[0] for c in BAD_SCALARS])
def test_bad_scalar_raises(backend, case):
    _, kwargs, error, message = case
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        Ops(backend).loss(*_good(backend), **kwargs)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("k,temperature,message", [
    (-2, 0.07, "k must be >= -1"),
    (6, 0.0, "temperature must be a positive finite float"),
    (6, float("nan"), "temperature must be a positive finite float"),
])
def test_raw_forward_bad_scalars_raise(backend, k, temperature, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Ops(backend).forward(*_good(backend), k, temperature, 0)


@pytest.mark.parametrize("backend", ALL)
def test_raw_backward_checks_the_saved_state(backend):
    ops = Ops(backend)
    x = _good(backend)
    state = list(ops.forward(*x, 2, 0.1, 0))
    grad_rows = torch.ones(4, device=x[0].device)
    bad_lse = list(state)
    bad_lse[1] = state[1][:3]
    with pytest.raises(ValueError, match=re.escape("lse must be [N] = [4]")):
        ops.backward_op(grad_rows, *x, *bad_lse[1:], 2, 0.1, [True, True, True])
    bad_positives = list(state)
    bad_positives[2] = state[2][:, :1]
    with pytest.raises(ValueError, match=re.escape("positives must be int64 [N, max(k, 0)] = [4, 2]")):
        ops.backward_op(grad_rows, *x, *bad_positives[1:], 2, 0.1, [True, True, True])
    bad_target = list(state)
    bad_target[4] = state[4][:, :5]
    with pytest.raises(ValueError, match=re.escape("target must be [N, D] = [4, 8]")):
        ops.backward_op(grad_rows, *x, *bad_target[1:], 2, 0.1, [True, True, True])


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be >= -1"):
        kcl_ext.KPositiveContrastiveLoss(k=-3)
    with pytest.raises(ValueError, match="temperature"):
        kcl_ext.KPositiveContrastiveLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        kcl_ext.KPositiveContrastiveLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        kcl_ext.KPositiveContrastiveLoss(backend="tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        kcl_ext.kpos_loss(*_good("cpu"), backend="tpu")


def test_sample_positives_bad_input():
    x = _good("cpu")
    with pytest.raises(TypeError, match="sample_positives: seed must be an int or None"):
        kcl_ext.sample_positives(x[3], x[4], 2, "1")
    with pytest.raises(ValueError, match="sample_positives: k must be >= -1"):
        kcl_ext.sample_positives(x[3], x[4], -5, 0)
    with pytest.raises(TypeError, match="queue_labels must have an integer dtype"):
        kcl_ext.sample_positives(x[3], x[4].float(), 2, 0)
    with pytest.raises(ValueError, match="k must be >= -1"):
        torch.ops.kcl.sample_positives(x[3], x[4], -2, 0)



# ----------------------------------------------------------------------------------------------
# As users meet the op: MoCo's order, non-finite inputs, a learnable temperature, inspection.
# The reference backend joins where the rule is one every backend holds.
# ----------------------------------------------------------------------------------------------
WITH_REFERENCE = ALL + [pytest.param("reference", id="reference")]


def _compiled(fn, backend):
    # Inductor where kernels are captured; aot_eager (tracing, fakes, autograd) for the
    # interpreter's opaque ops and for the dense reference, whose inductor build only costs time.
    torch._dynamo.reset()
    light = interpreted(backend) or backend == "reference"
    return torch.compile(fn, fullgraph=True, backend="aot_eager" if light else "inductor")


@pytest.mark.parametrize("backend", WITH_REFERENCE)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_moco_order_enqueue_before_backward(backend, compiled):
    """MoCo's order, loss -> MemoryBank.enqueue -> backward, with only the query requiring grad:
    the gradient is the one against the queue as it was at the loss."""
    n, q, d = 9, 40, 8
    x = inputs_for(backend, n, q, d, seed=21, requires_grad=(True, False, False))
    query, key, labels = x[0], x[1], x[3]
    bank = kcl_ext.MemoryBank(q, d).to(device_of(backend))
    bank.enqueue(x[2], x[4])
    kw = dict(k=2, temperature=0.1, seed=5, backend=backend)
    want = torch.autograd.grad(kcl_ext.kpos_loss(query, key, bank.keys.clone(), labels,
                                                 bank.labels.clone(), **kw), query)[0]

    def step(query, key, queue, query_labels, queue_labels):
        return kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, **kw)

    loss = (_compiled(step, backend) if compiled else step)(query, key, bank.keys, labels,
                                                            bank.labels)
    bank.enqueue(-key, labels)       # overwrites slots the loss read, in place, before backward
    assert not torch.equal(bank.keys[:n], x[2][:n])
    loss.backward()
    assert_close(query.grad, want, "cpu" if backend == "reference" else backend, torch.float32,
                 "query gradient after enqueue")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("wanted", ["key", "queue"])
def test_queue_changed_before_backward_with_key_or_queue_grad_raises_clearly(backend, wanted):
    x = inputs_for(backend, 9, 40, 8, seed=22,
                   requires_grad=(True, wanted == "key", wanted == "queue"))
    loss = Ops(backend).loss(*x, k=2, seed=5)
    with torch.no_grad():
        x[2].mul_(-1.0)              # what MemoryBank.enqueue does to the queue
    with pytest.raises(RuntimeError, match=r"MemoryBank\.enqueue after loss\.backward\(\)"):
        loss.backward()


def _poisoned(backend, where):
    """Inputs with one NaN: in query row 0, key row 0, a valid queue entry or an empty slot."""
    x = list(inputs_for(backend, 6, 20, 8, seed=1, requires_grad=(False, False, False)))
    x[4][3] = -1                                   # slot 3 is empty
    valid = int(torch.nonzero(x[4] >= 0)[0])
    tensor, row = {"query": (0, 0), "key": (1, 0), "queue": (2, valid), "empty slot": (2, 3)}[where]
    x[tensor] = x[tensor].clone()
    x[tensor][row, 0] = float("nan")
    return [t.requires_grad_() if i < 3 else t for i, t in enumerate(x)]


@pytest.mark.parametrize("backend", WITH_REFERENCE)
@pytest.mark.parametrize("where", ["query", "key", "queue", "empty slot"])
@pytest.mark.parametrize("k", [0, 2, -1])
def test_non_finite_input_rule(backend, where, k):
    """docs/kpos_loss.md, "Non-finite inputs": a NaN in query or key row i makes row i's loss
    and gradients and the whole queue gradient NaN, the other rows as without it; a NaN in the
    queue, an empty slot included, makes everything NaN. Never a finite gradient of a NaN row."""
    x = _poisoned(backend, where)
    loss, grads = loss_and_grads(Ops(backend).loss, x, k=k, reduction="none", seed=3)
    ref_loss, ref_grads = loss_and_grads(reference_float64, x, k=k, reduction="none", seed=3)
    hit = torch.zeros(6, dtype=torch.bool)
    hit[0] = True
    if where in ("queue", "empty slot"):
        hit[:] = True
    for name, got, want in (("loss", loss, ref_loss), *zip(("query", "key", "queue"), grads,
                                                           ref_grads)):
        got, want = got.detach().cpu(), want.detach().cpu()
        if name == "loss":
            bad = ~got.isfinite()
        else:
            bad = ~got.isfinite().all(1)
        expected = torch.ones_like(bad) if name == "queue" else hit
        assert torch.equal(bad, expected), f"non-finite rows of the {name} {where}: {bad.tolist()}"
        assert torch.equal(got.isfinite(), want.isfinite()), f"{name}: as the reference"
        finite = got.isfinite()
        if finite.any():
            kind = "cpu" if backend == "reference" else backend
            assert_close(got[finite], want[finite], kind, torch.float32, f"finite {name}")


def _learnable(value, backend, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype, device=device_of(backend), requires_grad=True)


@pytest.mark.parametrize("backend", WITH_REFERENCE)
@pytest.mark.parametrize("k", [0, 3, -1])
def test_tensor_temperature_matches_float_and_has_the_per_row_gradient(backend, k):
    n, q, d = 21, 70, 24
    x = inputs_for(backend, n, q, d, seed=31, negative_queries=1)
    weights = grad_weights(n, torch.float32, device_of(backend))
    kw = dict(k=k, reduction="none", seed=9)
    tau = _learnable(0.1, backend)
    loss = Ops(backend).loss(*x, temperature=tau, **kw)
    *grads, grad_tau = torch.autograd.grad((loss * weights).sum(), [*x[:3], tau])
    ref_loss, ref_grads = loss_and_grads(reference_float64, x, weights, temperature=0.1, **kw)
    kind = "cpu" if backend == "reference" else backend
    assert_close(loss, ref_loss, kind, torch.float32, "loss with a tensor temperature")
    for name, g, rg in zip(("query", "key", "queue"), grads, ref_grads):
        assert_close(g, rg, kind, torch.float32, f"grad of {name} with a tensor temperature")
    # d loss_i / d tau = -q_i . (m_i - t_i) / tau^2, from the dense float64 reference.
    tau64 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    ref = kcl_ext.kpos_loss_reference(*(t.detach().double().cpu() for t in x[:3]),
                                      x[3].cpu(), x[4].cpu(), temperature=tau64, **kw)
    want_tau = torch.autograd.grad((ref * weights.double().cpu()).sum(), tau64)[0]
    assert_close(grad_tau, want_tau, kind, torch.float32, "gradient of the temperature")


@pytest.mark.parametrize("backend", WITH_REFERENCE)
@pytest.mark.parametrize("k", [0, 2, -1])
def test_gradcheck_float64_temperature(backend, k):
    x = inputs_for(backend, 5, 17, 4, dtype=torch.float64, seed=k + 40, empty_fraction=0.2,
                   negative_queries=1)
    tau = _learnable(0.5, backend, torch.float64)

    def fn(query, key, queue, temperature):
        return Ops(backend).loss(query, key, queue, x[3], x[4], k=k, temperature=temperature,
                                 reduction="none", seed=77)

    assert torch.autograd.gradcheck(fn, (*x[:3], tau), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", WITH_REFERENCE)
def test_torch_compile_fullgraph_learnable_temperature(backend):
    x = inputs_for(backend, 12, 60, 16, seed=33, requires_grad=(True, False, False))
    tau = _learnable(0.07, backend)

    def step(query, key, queue, query_labels, queue_labels, temperature):
        return kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=3,
                                 temperature=temperature, seed=2, backend=backend)

    want = step(*x, tau)
    want_grads = torch.autograd.grad(want, (x[0], tau))
    got = _compiled(step, backend)(*x, tau)
    got_grads = torch.autograd.grad(got, (x[0], tau))
    kind = "cpu" if backend == "reference" else backend
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert_close(a, b, kind, torch.float32, "compiled, learnable temperature")
    explanation = torch._dynamo.explain(step)(*x, tau)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("backend", ALL)
def test_float_temperature_unchanged_and_bad_temperature_tensors(backend):
    x = inputs_for(backend, 6, 30, 8, seed=34)
    loss = Ops(backend).loss(*x, k=2, temperature=0.2, seed=1, reduction="none")
    rows = Ops(backend).forward(*(t.detach() for t in x), 2, 0.2, 1)[0]
    assert torch.equal(loss.detach(), rows)           # the float goes to the kernels as it is
    with pytest.raises(ValueError, match=r"temperature tensor must be a 0-d floating tensor"):
        Ops(backend).loss(*x, temperature=torch.tensor([0.1]), seed=1)
    with pytest.raises(ValueError, match=r"temperature tensor must be a 0-d floating tensor"):
        Ops(backend).loss(*x, temperature=torch.tensor(1), seed=1)
    with pytest.raises(TypeError, match=r"temperature must be a positive finite float or a 0-d"):
        Ops(backend).loss(*x, temperature="0.1", seed=1)
    # Not checked on the host (no synchronisation): a non-positive tensor gives NaN, not a loss.
    for bad in (0.0, -0.1, float("inf")):
        tau = torch.tensor(bad, device=device_of(backend))
        assert Ops(backend).loss(*x, temperature=tau, seed=1).isnan()


@pytest.mark.parametrize("backend", ALL)
def test_sample_positives_seed_none_draws_as_kpos_loss(backend):
    x = inputs_for(backend, 12, 60, 8, seed=3, classes=3, requires_grad=(False, False, False))
    torch.manual_seed(7)
    shown = kcl_ext.sample_positives(x[3], x[4], 3)
    torch.manual_seed(7)
    positives = Ops(backend).forward(*x, 3, 0.1, None)[2]
    assert torch.equal(shown.cpu(), positives.cpu())
    torch.manual_seed(8)
    assert not torch.equal(kcl_ext.sample_positives(x[3], x[4], 3, None).cpu(), shown.cpu())
