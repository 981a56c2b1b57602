"""The CUDA kernels of kpos_loss against the dense reference and against the CPU op.

Skipped where there is no CUDA GPU, or where the library was built without CUDA kernels. The
matrix mirrors the CPU tests: k in {0, 1, 6, -1}, odd shapes, empty slots, negative query
labels, non-contiguous inputs, one (dtype, atol, rtol) table, grad_output != 1, degenerate
inputs, run-to-run determinism, gradcheck in float64 and opcheck on every op.
"""
from __future__ import annotations

import pytest
import torch

import kcl_ext
from kcl_ext import _backend_choice
from kcl_ext.reference import kpos_loss_reference, sample_positives_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _backend_choice.cuda_kernels_available(),
                       reason="kcl_ext was built without CUDA kernels (FORCE_CUDA=1)"),
]

# (dtype, atol, rtol) of the fused loss and gradients against the float64 reference. Half
# precision rounds the features and (in the backward) the gradient tile before the products.
TOLERANCES = [
    (torch.float64, 1e-10, 1e-10),
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 5e-3, 5e-3),
    (torch.bfloat16, 3e-2, 2e-2),
]
KS = [0, 1, 6, -1]
# (N, Q, D): single elements, sizes that are not multiples of any tile, a multi-split queue,
# and a D that spans several D slices of the backward.
SHAPES = [(1, 1, 1), (5, 70, 3), (37, 300, 33), (64, 4100, 16), (9, 200, 200)]


def make_inputs(n, q, d, dtype, *, classes=7, empty_fraction=0.2, negative_queries=True,
                seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)

    def features(rows):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64),
                                          dim=1)
        return x.to(dtype).to(device)

    query, key, queue = features(n), features(n), features(q)
    query_labels = torch.randint(0, classes, (n,), generator=g)
    queue_labels = torch.randint(0, classes, (q,), generator=g)
    queue_labels[torch.rand(q, generator=g) < empty_fraction] = -1
    if negative_queries and n > 2:
        query_labels[n // 2] = -3
    return query, key, queue, query_labels.to(device), queue_labels.to(device)


def reference_in_float64(query, key, queue, query_labels, queue_labels, **kw):
    """The reference on the same (rounded) inputs, computed in float64."""
    return kpos_loss_reference(query.double(), key.double(), queue.double(), query_labels,
                               queue_labels, **kw)


def loss_and_grads(fn, inputs, grad_weights, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs[:3]]
    loss = fn(*leaves, *inputs[3:], reduction="none", **kw)
    grads = torch.autograd.grad((loss.double() * grad_weights).sum(), leaves)
    return loss.detach(), grads


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_matches_reference(shape, k, dtype, atol, rtol):
    n, q, d = shape
    inputs = make_inputs(n, q, d, dtype, seed=n + q + d)
    weights = torch.rand(n, dtype=torch.float64, device="cuda") + 0.5  # grad_output != 1
    seed = 1234 + k
    loss, grads = loss_and_grads(kcl_ext.kpos_loss, inputs, weights, k=k, seed=seed,
                                 backend="cuda")
    ref_loss, ref_grads = loss_and_grads(reference_in_float64, inputs, weights, k=k, seed=seed)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol)
    for got, want, name in zip(grads, ref_grads, ("query", "key", "queue")):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("k", KS)
def test_cuda_matches_cpu_op(k):
    inputs = make_inputs(40, 900, 24, torch.float32, classes=5, seed=3)
    cpu_inputs = [t.cpu() for t in inputs]
    seed = -987654321
    rows, lse, selection = torch.ops.kcl.kpos_forward(*inputs, k, 0.07, seed)
    cpu_rows, cpu_lse, cpu_selection = torch.ops.kcl.kpos_forward(*cpu_inputs, k, 0.07, seed)
    assert torch.equal(selection.cpu(), cpu_selection)  # the same positives, bit for bit
    torch.testing.assert_close(rows.cpu(), cpu_rows, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.cpu(), cpu_lse, atol=2e-5, rtol=2e-5)
    grad_rows = torch.rand(40, device="cuda") + 0.5
    grads = torch.ops.kcl.kpos_backward(grad_rows, *inputs, lse, selection, 0.07,
                                        [True, True, True])
    cpu_grads = torch.ops.kcl.kpos_backward(grad_rows.cpu(), *cpu_inputs, cpu_lse, cpu_selection,
                                            0.07, [True, True, True])
    for got, want in zip(grads, cpu_grads):
        torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("k", KS + [3, 10_000])
@pytest.mark.parametrize("classes", [1, 4, 300])
def test_sample_positives_identical_on_every_backend(k, classes):
    _, _, _, query_labels, queue_labels = make_inputs(50, 3000, 1, torch.float32,
                                                      classes=classes, seed=classes)
    seed = 2**62 + 17
    got = kcl_ext.sample_positives(query_labels, queue_labels, k, seed)
    cpu = kcl_ext.sample_positives(query_labels.cpu(), queue_labels.cpu(), k, seed)
    ref = sample_positives_reference(query_labels.cpu(), queue_labels.cpu(), k, seed)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), cpu)
    assert torch.equal(cpu, ref)


def test_sample_positives_int32_labels_and_empty():
    query_labels = torch.tensor([0, 1, -1, 2], dtype=torch.int32, device="cuda")
    queue_labels = torch.tensor([1, 0, 0, -1, 1, 0], dtype=torch.int32, device="cuda")
    got = kcl_ext.sample_positives(query_labels, queue_labels, -1, 5)
    assert got.tolist() == [[1, 2, 5], [0, 4, -1], [-1, -1, -1], [-1, -1, -1]]
    empty = kcl_ext.sample_positives(query_labels[:0], queue_labels, -1, 5)
    assert empty.shape == (0, 0)
    no_queue = kcl_ext.sample_positives(query_labels, queue_labels[:0], 4, 5)
    assert no_queue.shape == (4, 4) and bool((no_queue == -1).all())


def test_non_contiguous_inputs():
    n, q, d = 33, 500, 40
    base = make_inputs(n, q, 2 * d, torch.float32, seed=11)
    # Strided columns, a transposed copy and strided labels.
    query = base[0][:, ::2]
    key = base[1][:, 1::2].t().contiguous().t()
    queue = base[2][:, :d]
    labels_q = torch.stack([base[3], base[3]], 1)[:, 0]
    labels_k = torch.stack([base[4], base[4]], 1)[:, 1]
    assert not (query.is_contiguous() or key.is_contiguous() or queue.is_contiguous()
                or labels_q.is_contiguous())
    inputs = (query, key, queue, labels_q, labels_k)
    dense = tuple(t.contiguous() for t in inputs)
    weights = torch.rand(n, dtype=torch.float64, device="cuda")
    loss, grads = loss_and_grads(kcl_ext.kpos_loss, inputs, weights, k=6, seed=1, backend="cuda")
    want_loss, want_grads = loss_and_grads(kcl_ext.kpos_loss, dense, weights, k=6, seed=1,
                                           backend="cuda")
    assert torch.equal(loss, want_loss)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitwise_deterministic(dtype):
    inputs = make_inputs(100, 5000, 64, dtype, classes=10, seed=5)
    weights = torch.rand(100, dtype=torch.float64, device="cuda")
    first = loss_and_grads(kcl_ext.kpos_loss, inputs, weights, k=6, seed=7, backend="cuda")
    for _ in range(3):
        again = loss_and_grads(kcl_ext.kpos_loss, inputs, weights, k=6, seed=7, backend="cuda")
        assert torch.equal(first[0], again[0])
        for a, b in zip(first[1], again[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    query, key, queue, query_labels, queue_labels = make_inputs(0, 50, 8, torch.float32)
    query.requires_grad_(True)
    queue.requires_grad_(True)
    loss = kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, seed=1,
                             reduction=reduction, backend="cuda")
    if reduction == "none":
        assert loss.shape == (0,)
    elif reduction == "sum":
        assert loss.item() == 0.0
    else:
        assert torch.isnan(loss)
    if reduction != "mean":
        grad_query, grad_queue = torch.autograd.grad(loss.sum(), (query, queue))
        assert grad_query.shape == (0, 8)
        assert torch.equal(grad_queue, torch.zeros_like(queue))


@pytest.mark.parametrize("q,empty_fraction", [(0, 0.0), (40, 1.0)])
def test_only_own_key(q, empty_fraction):
    """Q = 0 or every slot empty: loss_i = 0 and every gradient 0."""
    inputs = make_inputs(6, q, 8, torch.float32, empty_fraction=empty_fraction)
    leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
    loss = kcl_ext.kpos_loss(*leaves, *inputs[3:], k=-1, seed=2, reduction="none",
                             backend="cuda")
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in torch.autograd.grad(loss.sum(), leaves):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_backward_output_mask():
    inputs = make_inputs(20, 300, 16, torch.float32, seed=8)
    rows, lse, selection = torch.ops.kcl.kpos_forward(*inputs, 6, 0.1, 3)
    grad_rows = torch.rand(20, device="cuda")
    full = torch.ops.kcl.kpos_backward(grad_rows, *inputs, lse, selection, 0.1, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        part = torch.ops.kcl.kpos_backward(grad_rows, *inputs, lse, selection, 0.1, mask)
        for wanted, got, want in zip(mask, part, full):
            if wanted:
                assert torch.equal(got, want)
            else:
                assert got.numel() == 0


def test_seed_none_follows_torch_manual_seed():
    inputs = make_inputs(16, 200, 8, torch.float32, seed=4)
    torch.manual_seed(123)
    first = kcl_ext.kpos_loss(*inputs, k=1, reduction="none", backend="cuda")
    torch.manual_seed(123)
    second = kcl_ext.kpos_loss(*inputs, k=1, reduction="none", backend="cuda")
    torch.manual_seed(123)
    cpu = kcl_ext.kpos_loss(*[t.cpu() for t in inputs], k=1, reduction="none", backend="cpu")
    assert torch.equal(first, second)
    torch.testing.assert_close(first.cpu(), cpu, atol=2e-5, rtol=2e-5)


def test_errors_name_the_argument():
    errors = (ValueError, TypeError, RuntimeError)  # TORCH_CHECK_VALUE / _TYPE map to the first two
    query, key, queue, query_labels, queue_labels = make_inputs(4, 10, 8, torch.float32)
    with pytest.raises(errors, match="queue must be 2-D"):
        torch.ops.kcl.kpos_forward(query, key, queue[:, :4], query_labels, queue_labels, 6, 0.1,
                                   None)
    with pytest.raises(errors, match="key must be on query's device"):
        torch.ops.kcl.kpos_forward(query, key.cpu(), queue, query_labels, queue_labels, 6, 0.1,
                                   None)
    with pytest.raises(errors, match="lse must be"):
        torch.ops.kcl.kpos_backward(torch.ones(4, device="cuda"), query, key, queue,
                                    query_labels, queue_labels, torch.zeros(3, device="cuda"),
                                    torch.zeros(4, 3, dtype=torch.int64, device="cuda"), 0.1,
                                    [True, False, False])
    with pytest.raises(errors, match="k must be >= -1"):
        torch.ops.kcl.sample_positives(query_labels, queue_labels, -2, 0)


def test_gradcheck_float64():
    inputs = make_inputs(5, 70, 6, torch.float64, classes=3, seed=9)
    leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]

    def fn(query, key, queue):
        return kcl_ext.kpos_loss(query, key, queue, *inputs[3:], k=2, seed=4, reduction="none",
                                 backend="cuda")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_opcheck_every_op():
    inputs = make_inputs(9, 130, 12, torch.float32, seed=10)
    leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
    torch.library.opcheck(torch.ops.kcl.kpos_forward.default,
                          (*leaves, *inputs[3:], 6, 0.07, 42))
    _, lse, selection = torch.ops.kcl.kpos_forward(*inputs, 6, 0.07, 42)
    torch.library.opcheck(torch.ops.kcl.kpos_backward.default,
                          (torch.rand(9, device="cuda"), *inputs, lse, selection, 0.07,
                           [True, True, True]))
    torch.library.opcheck(torch.ops.kcl.sample_positives.default, (inputs[3], inputs[4], 3, 42))


def test_auto_backend_runs_and_sticks(monkeypatch):
    monkeypatch.delenv(_backend_choice.ENV_VAR, raising=False)
    _backend_choice.clear()
    inputs = make_inputs(16, 256, 32, torch.bfloat16, seed=12)
    loss = kcl_ext.kpos_loss(*inputs, seed=3)
    want = kcl_ext.kpos_loss(*inputs, seed=3, backend="cuda")
    torch.testing.assert_close(loss.float(), want.float(), atol=3e-2, rtol=2e-2)
    choices = _backend_choice.chosen_backends()
    if len(_backend_choice.available_backends()) > 1:
        assert list(choices.values())[0] in ("cuda", "triton")
    kcl_ext.kpos_loss(*inputs, seed=3)
    assert _backend_choice.chosen_backends() == choices  # decided once per key
