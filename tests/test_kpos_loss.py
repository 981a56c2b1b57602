"""The fused CPU kpos_loss against the dense reference, and the op's contract (docs/kpos_loss.md)."""
import math

import pytest
import torch
from scipy import stats

import kcl_ext
from kcl_ext import reference
from conftest import make_inputs, rel_err

KS = [0, 1, 6, -1]
SHAPES = [  # (N, Q, D): odd sizes, an empty queue, a one-entry queue, several queue tiles
    (1, 0, 3), (1, 1, 3), (37, 1, 128), (37, 1031, 3), (37, 1031, 128), (130, 2100, 16),
]
# (dtype, atol, rtol) of the fused op against the reference run on the same (rounded) inputs.
TOLERANCES = [
    (torch.float64, 1e-12, 1e-10),
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]


def loss_and_grads(fn, inputs, grad_output_seed=0, **kw):
    loss = fn(*inputs, **kw)
    g = torch.Generator().manual_seed(grad_output_seed)
    grad_output = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)
    leaves = [t for t in inputs[:3] if t.requires_grad]
    grads = torch.autograd.grad(loss, leaves, grad_output) if leaves else ()
    return loss, grads


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%dQ%dD%d" % s)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp32(k, shape, reduction):
    n, q, d = shape
    x = make_inputs(n, q, d, seed=n * 1000 + q + d)
    kw = dict(k=k, temperature=0.1, reduction=reduction, seed=4242)
    loss, grads = loss_and_grads(kcl_ext.kpos_loss, x, **kw)
    ref_loss, ref_grads = loss_and_grads(kcl_ext.kpos_loss_reference, x, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) < 1e-5
    for name, g, rg in zip(("query", "key", "queue"), grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == torch.float32, name
        if rg.numel() == 0 or not rg.any():  # Q = 0: empty or exactly zero gradients
            assert not g.any(), name
        else:
            assert rel_err(g, rg) < 1e-5, name


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=lambda v: str(v))
@pytest.mark.parametrize("k", [1, 6, -1])
def test_dtypes(dtype, atol, rtol, k):
    x = make_inputs(45, 1500, 64, dtype=dtype, seed=3)
    loss, grads = loss_and_grads(kcl_ext.kpos_loss, x, k=k, reduction="none", seed=11)
    ref_loss, ref_grads = loss_and_grads(kcl_ext.kpos_loss_reference, x, k=k, reduction="none", seed=11)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < max(rtol, 1e-9) * 5


def test_non_contiguous_inputs():
    n, q, d = 33, 700, 20
    x = make_inputs(n, q, d, seed=5, requires_grad=(False, False, False))
    # The same values laid out transposed and strided.
    query = x[0].t().contiguous().t().requires_grad_()
    key = torch.cat([x[1], x[1]], 1)[:, ::2]
    key.copy_(x[1])
    key.requires_grad_()
    queue = x[2].t().contiguous().t().requires_grad_()
    query_labels = torch.stack([x[3], x[3]], 1)[:, 0]
    queue_labels = torch.stack([x[4], x[4]], 1)[:, 1]
    assert not (query.is_contiguous() or key.is_contiguous() or queue.is_contiguous()
                or query_labels.is_contiguous() or queue_labels.is_contiguous())
    nc = (query, key, queue, query_labels, queue_labels)
    loss, grads = loss_and_grads(kcl_ext.kpos_loss, nc, k=3, seed=1)
    contig = tuple(t.detach().contiguous().requires_grad_(t.requires_grad) for t in nc)
    ref_loss, ref_grads = loss_and_grads(kcl_ext.kpos_loss_reference, contig, k=3, seed=1)
    assert rel_err(loss, ref_loss) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-5


def test_int32_labels_and_negative_query_labels():
    x = make_inputs(20, 300, 8, seed=9)
    query_labels = x[3].to(torch.int32)
    query_labels[:5] = -3  # no class: only the own key is positive
    y = (x[0], x[1], x[2], query_labels, x[4].to(torch.int16))
    loss, grads = loss_and_grads(kcl_ext.kpos_loss, y, k=2, seed=3, reduction="none")
    ref_loss, ref_grads = loss_and_grads(kcl_ext.kpos_loss_reference, y, k=2, seed=3, reduction="none")
    assert rel_err(loss, ref_loss) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-5


def test_only_empty_slots_and_empty_queue_give_zero():
    for q in (0, 50):
        x = make_inputs(6, q, 8, seed=2)
        x[4].fill_(-1)
        loss, grads = loss_and_grads(kcl_ext.kpos_loss, x, k=6, seed=0, reduction="none")
        assert torch.equal(loss, torch.zeros(6))
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


def test_empty_batch():
    x = make_inputs(0, 40, 8)
    assert kcl_ext.kpos_loss(*x, reduction="none", seed=0).shape == (0,)
    assert float(kcl_ext.kpos_loss(*x, reduction="sum", seed=0).detach()) == 0.0
    mean = kcl_ext.kpos_loss(*x, reduction="mean", seed=0)
    assert math.isnan(float(mean))
    total = kcl_ext.kpos_loss(*x, reduction="sum", seed=0)
    grads = torch.autograd.grad(total, x[:3])
    assert grads[0].shape == (0, 8) and grads[2].shape == (40, 8)
    assert torch.equal(grads[2], torch.zeros(40, 8))


def test_only_query_requires_grad():
    x = make_inputs(16, 500, 32, seed=4, requires_grad=(True, False, False))
    loss, (grad_query,) = loss_and_grads(kcl_ext.kpos_loss, x, k=6, seed=8)
    ref_loss, (ref_grad_query,) = loss_and_grads(kcl_ext.kpos_loss_reference, x, k=6, seed=8)
    assert rel_err(grad_query, ref_grad_query) < 1e-5


def test_double_backward_raises():
    x = make_inputs(5, 20, 4, seed=1)
    loss = kcl_ext.kpos_loss(*x, k=2, seed=3)
    (grad_query,) = torch.autograd.grad(loss, x[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_query.sum().backward()


def test_gradcheck_float64():
    for k in (0, 2, -1):
        x = make_inputs(5, 17, 4, dtype=torch.float64, seed=k + 10, empty_fraction=0.2)
        fn = lambda q, kk, b: kcl_ext.kpos_loss(q, kk, b, x[3], x[4], k=k, temperature=0.5,
                                                reduction="none", seed=77)
        assert torch.autograd.gradcheck(fn, x[:3])


def test_opcheck_every_op():
    x = make_inputs(7, 40, 6, seed=1)
    args = (x[0], x[1], x[2], x[3], x[4])
    torch.library.opcheck(torch.ops.kcl.kpos_loss.default, args + (3, 0.2, "mean", 5))
    torch.library.opcheck(torch.ops.kcl.kpos_forward.default, args + (3, 0.2, 5))
    loss_rows, lse, selection = torch.ops.kcl.kpos_forward(*args, 3, 0.2, 5)
    detached = tuple(t.detach() for t in args)
    torch.library.opcheck(torch.ops.kcl.kpos_backward.default,
                          (torch.rand(7),) + detached + (lse.detach(), selection, 0.2, [True, False, True]))
    torch.library.opcheck(torch.ops.kcl.sample_positives.default, (x[3], x[4], 3, 5))


def test_torch_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    x = make_inputs(12, 300, 16, seed=6)

    def step(query, key, queue, query_labels, queue_labels):
        loss = kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=4, seed=21)
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(*x)
    grads = torch.autograd.grad(loss, x[:3])
    eager = step(*x)
    eager_grads = torch.autograd.grad(eager, x[:3])
    assert rel_err(loss, eager) < 1e-6
    for g, eg in zip(grads, eager_grads):
        assert rel_err(g, eg) < 1e-6
    explanation = torch._dynamo.explain(step)(*x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_bitwise_determinism():
    x = make_inputs(100, 3000, 32, seed=12)
    first = loss_and_grads(kcl_ext.kpos_loss, x, k=6, seed=99, reduction="none")
    for threads in (1, torch.get_num_threads()):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            again = loss_and_grads(kcl_ext.kpos_loss, x, k=6, seed=99, reduction="none")
        finally:
            torch.set_num_threads(previous)
        assert torch.equal(first[0], again[0])
        for a, b in zip(first[1], again[1]):
            assert torch.equal(a, b)


def test_seed_none_follows_torch_manual_seed():
    x = make_inputs(30, 400, 8, classes=2, seed=13)
    torch.manual_seed(1)
    a = kcl_ext.kpos_loss(*x, k=2, reduction="none")
    torch.manual_seed(1)
    b = kcl_ext.kpos_loss(*x, k=2, reduction="none")
    c = kcl_ext.kpos_loss(*x, k=2, reduction="none")  # the generator moved on: another selection
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("k", [0, 1, 3, 6, -1])
def test_sample_positives_matches_reference_selection(k):
    x = make_inputs(50, 2000, 2, classes=7, seed=k + 3)
    fused = kcl_ext.sample_positives(x[3], x[4], k, 123)
    ref = kcl_ext.sample_positives_reference(x[3], x[4], k, 123)
    assert torch.equal(fused, ref)
    mask = reference.selection_mask(x[3], x[4], k, 123)
    counts = reference.same_class_mask(x[3], x[4]).sum(1)
    expected = counts if k == -1 else counts.clamp(max=k)
    assert torch.equal(mask.sum(1), expected)
    assert torch.equal((fused >= 0).sum(1), expected)


def test_selection_is_uniform_and_independent_across_queries():
    # One class with 20 entries in a queue of 60; k = 6. Over 3000 seeds each same-class entry
    # must be drawn with frequency k / |M| = 0.3 (chi-square), and two queries must not draw the
    # same subsets (independence).
    queue_labels = torch.tensor([0, 1, 2] * 20)
    query_labels = torch.tensor([0, 0])
    same_class = (queue_labels == 0).nonzero().flatten()
    counts = torch.zeros(60, dtype=torch.int64)
    same_subset = 0
    seeds = 3000
    for seed in range(seeds):
        picked = kcl_ext.sample_positives(query_labels, queue_labels, 6, seed)
        counts.index_add_(0, picked[0], torch.ones(6, dtype=torch.int64))
        same_subset += int(torch.equal(picked[0], picked[1]))
    assert counts.sum() == 6 * seeds and counts[queue_labels != 0].sum() == 0
    observed = counts[same_class].double().numpy()
    expected = [6 * seeds / 20] * 20
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # P(two independent draws pick the same 6-subset of 20) = 1 / C(20, 6) ~ 2.6e-5.
    assert same_subset <= 2


def test_k0_reference_equals_moco_infonce():
    x = make_inputs(24, 500, 32, empty_fraction=0.0, seed=14)
    ours = kcl_ext.kpos_loss_reference(*x, k=0, temperature=0.07, seed=0)
    moco = reference.moco_infonce(x[0], x[1], x[2], temperature=0.07)
    assert rel_err(ours, moco) < 1e-6
    assert rel_err(kcl_ext.kpos_loss(*x, k=0, temperature=0.07, seed=0), moco) < 1e-5


def test_module_matches_function():
    x = make_inputs(10, 100, 8, seed=15)
    criterion = kcl_ext.KPositiveContrastiveLoss(k=3, temperature=0.2, reduction="sum")
    assert "k=3" in repr(criterion)
    assert torch.equal(criterion(*x, seed=4),
                       kcl_ext.kpos_loss(*x, k=3, temperature=0.2, reduction="sum", seed=4))


def test_backend_reference_and_cpu_agree():
    x = make_inputs(10, 100, 8, seed=16)
    a = kcl_ext.kpos_loss(*x, seed=4, backend="cpu")
    b = kcl_ext.kpos_loss(*x, seed=4, backend="reference")
    assert rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------------------------------
# Bad input: one test per case, through the Python API and the raw op.
# ------------------------------------------------------------------------------------------------
def _good():
    return list(make_inputs(4, 10, 8, requires_grad=(False, False, False)))


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
     "queue must be on query's device cpu"),
]


@pytest.mark.parametrize("case", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensor_raises(case):
    _, mutate, error, message = case
    x = _good()
    mutate(x)
    with pytest.raises(error, match=_escape(message)):
        kcl_ext.kpos_loss(*x, seed=0)
    with pytest.raises(error, match=_escape(message)):
        kcl_ext.kpos_loss_reference(*x, seed=0)
    if case[0] != "device mismatch":  # the dispatcher refuses mixed devices before the kernel
        with pytest.raises(error, match=_escape(message.replace("torch.float32", "Float"))
                           if "dtype torch" in message else _escape(message)):
            torch.ops.kcl.kpos_loss(*x, 6, 0.07, "mean", 0)


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
    ("backend", dict(backend="tpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("case", BAD_SCALARS, ids=[c[0] for c in BAD_SCALARS])
def test_bad_scalar_raises(case):
    _, kwargs, error, message = case
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(error, match=_escape(message)):
        kcl_ext.kpos_loss(*_good(), **kwargs)


@pytest.mark.parametrize("k,temperature,reduction,message", [
    (-2, 0.07, "mean", "k must be >= -1"),
    (6, 0.0, "mean", "temperature must be a positive finite float"),
    (6, float("nan"), "mean", "temperature must be a positive finite float"),
    (6, 0.07, "avg", "reduction must be one of"),
])
def test_raw_op_bad_scalars_raise(k, temperature, reduction, message):
    with pytest.raises(ValueError, match=_escape(message)):
        torch.ops.kcl.kpos_loss(*_good(), k, temperature, reduction, 0)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be >= -1"):
        kcl_ext.KPositiveContrastiveLoss(k=-3)
    with pytest.raises(ValueError, match="temperature"):
        kcl_ext.KPositiveContrastiveLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        kcl_ext.KPositiveContrastiveLoss(reduction="avg")


def test_sample_positives_bad_input():
    x = _good()
    with pytest.raises(TypeError, match="sample_positives: seed must be an int"):
        kcl_ext.sample_positives(x[3], x[4], 2, None)
    with pytest.raises(ValueError, match="sample_positives: k must be >= -1"):
        kcl_ext.sample_positives(x[3], x[4], -5, 0)
    with pytest.raises(TypeError, match="queue_labels must have an integer dtype"):
        kcl_ext.sample_positives(x[3], x[4].float(), 2, 0)


def _escape(message):
    import re
    return re.escape(message)
