"""The Triton backend of kpos_loss against the reference and the C++ backend.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, which
tests/conftest.py sets before anything imports triton); with a GPU the same tests run the compiled
kernels on it.
The interpreter is slow, so the shapes are small, but none is a multiple of a block size, and
N and Q span several row blocks and queue splits.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kcl_ext  # noqa: E402
from kcl_ext import reference  # noqa: E402
from kcl_ext.triton import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kernels.INTERPRETED:
    raise RuntimeError("no GPU and TRITON_INTERPRET is not 1: tests/conftest.py sets it; run the "
                       "tests through pytest from the repository root")

# (atol, rtol) of the loss and of every gradient against the float64-free reference (which
# accumulates in float32 for half inputs). Half-precision results are rounded to their dtype once;
# the backward also rounds each logit gradient to the input dtype before its tensor-core product.
TOLERANCES = {
    torch.float64: (1e-8, 1e-6),    # the kernels' scalar constants (1/tau) are float32
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (1e-1, 2e-2),
}
N, Q, D = 21, 70, 24         # 2 row blocks of 16, 3 queue tiles of 32, D padded to 32


def make_inputs(n=N, q=Q, d=D, dtype=torch.float32, classes=3, seed=0, non_contiguous=False):
    gen = torch.Generator().manual_seed(seed)

    def features(rows):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=gen, dtype=torch.float64),
                                          dim=1).to(dtype)
        if non_contiguous:     # same values, a column stride of 2
            x = torch.stack([x, torch.zeros_like(x)], dim=2).reshape(rows, 2 * d)[:, ::2]
        return x.to(DEVICE).requires_grad_()

    query_labels = torch.randint(0, classes, (n,), generator=gen)
    queue_labels = torch.randint(-1, classes, (q,), generator=gen)  # -1: empty slots
    if n > 1:
        query_labels[1] = -1                                        # a query without class
    return (features(n), features(n), features(q), query_labels.to(DEVICE),
            queue_labels.to(DEVICE))


def triton_loss(*inputs, **kwargs):
    return kcl_ext.kpos_loss(*inputs, backend="triton", **kwargs)


def loss_and_grads(fn, inputs, grad_rows, **kwargs):
    loss = fn(*inputs, reduction="none", **kwargs)
    grads = torch.autograd.grad(loss, inputs[:3], grad_rows.to(loss.dtype))
    return [loss, *grads]


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("k", [0, 1, 6, -1])
def test_values_and_gradients_match_reference(dtype, k):
    inputs = make_inputs(dtype=dtype, seed=k + 2, non_contiguous=(k == 1))
    grad_rows = torch.randn(N, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    got = loss_and_grads(triton_loss, inputs, grad_rows, k=k, seed=1234)
    want = loss_and_grads(kcl_ext.kpos_loss_reference, inputs, grad_rows, k=k, seed=1234)
    for name, a, b in zip(("loss", "d query", "d key", "d queue"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"{name}, k={k}")


SEEDS = [0, -1, 2**63 - 1, -(2**63), 987654321987]


def selected_from_state(selection, query_labels, queue_labels):
    """S_i as an [N, Q] mask, from a selection state (row_key, threshold, |P_i|)."""
    row_key, threshold = selection[:, 0], selection[:, 1]
    ranks = reference.mix32(row_key[:, None] ^ torch.arange(queue_labels.size(0)))
    return reference.same_class_mask(query_labels, queue_labels) & (ranks <= threshold[:, None])


@pytest.mark.parametrize("k", [0, 1, 3, 6, -1, 20])
def test_selection_identical_to_cpp_backend(k):
    # Q = 120 over 2 classes: ~40 same-class entries per row, more than one chunk of the
    # interpreter's selection kernel (32); k = 20 takes the bisection path.
    query_labels, queue_labels = make_inputs(n=10, q=120, classes=2, seed=k + 7)[3:]
    query_labels_cpu, queue_labels_cpu = query_labels.cpu(), queue_labels.cpu()
    cfg = kernels.LaunchConfig(query_labels.device, torch.float32, D)
    for seed in SEEDS[:2] if k == 20 else SEEDS:
        seed_tensor = kernels.seed_tensor(seed, query_labels)
        got = kernels._select(query_labels, queue_labels, seed_tensor, k, cfg).cpu()
        cpu_inputs = [torch.zeros(10, 4), torch.zeros(10, 4), torch.zeros(120, 4),
                      query_labels_cpu, queue_labels_cpu]
        _, _, want = torch.ops.kcl.kpos_forward(*cpu_inputs, k, 0.1, seed)
        assert torch.equal(got, want), f"seed {seed}"      # (row_key, threshold, |P_i|)
        selected = selected_from_state(got, query_labels_cpu, queue_labels_cpu)
        assert torch.equal(selected,
                           reference.selection_mask(query_labels_cpu, queue_labels_cpu, k, seed))
        assert torch.equal(selected.sum(1) + 1, got[:, 2])
        if k > 0:
            listed = torch.ops.kcl.sample_positives(query_labels_cpu, queue_labels_cpu, k, seed)
            for i in range(listed.size(0)):
                assert torch.equal(selected[i].nonzero().flatten(), listed[i][listed[i] >= 0])


def test_forward_op_matches_cpp_backend():
    inputs = make_inputs(seed=3)
    got = torch.ops.kcl.kpos_forward_triton(*inputs, kernels.seed_tensor(77, inputs[0]), 6, 0.1)
    want = torch.ops.kcl.kpos_forward(*[t.detach().cpu() for t in inputs], 6, 0.1, 77)
    torch.testing.assert_close(got[0].cpu(), want[0], atol=2e-5, rtol=1e-5)   # loss rows
    torch.testing.assert_close(got[1].cpu(), want[1], atol=2e-5, rtol=1e-5)   # lse
    assert torch.equal(got[2].cpu(), want[2])                                 # selection


def test_k0_is_moco_infonce_and_reductions():
    query, key, queue, query_labels, queue_labels = make_inputs()
    full = torch.ones_like(queue_labels)          # MoCo has no empty slots
    mean = triton_loss(query, key, queue, query_labels, full, k=0, seed=3)
    moco = reference.moco_infonce(query, key, queue)
    torch.testing.assert_close(mean, moco, atol=2e-5, rtol=1e-5)
    rows = triton_loss(query, key, queue, query_labels, full, k=0, seed=3, reduction="none")
    total = triton_loss(query, key, queue, query_labels, full, k=0, seed=3, reduction="sum")
    assert rows.shape == (N,) and total.shape == () and mean.shape == ()
    torch.testing.assert_close(total, rows.sum(), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(mean, rows.mean(), atol=1e-5, rtol=1e-6)


def test_seed_none_follows_torch_manual_seed():
    inputs = make_inputs()
    runs = []
    for _ in range(2):
        torch.manual_seed(42)
        runs.append(triton_loss(*inputs, k=1, reduction="none"))
    torch.manual_seed(42)
    expected = kcl_ext.kpos_loss_reference(*inputs, k=1, reduction="none")
    assert torch.equal(runs[0], runs[1])
    assert_close(runs[0], expected, torch.float32, "seed=None")
    torch.manual_seed(43)
    assert not torch.equal(runs[0], triton_loss(*inputs, k=1, reduction="none"))


def test_bitwise_deterministic():
    inputs = make_inputs(dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    grad_rows = torch.randn(N).to(DEVICE)
    first = loss_and_grads(triton_loss, inputs, grad_rows, k=6, seed=5)
    second = loss_and_grads(triton_loss, inputs, grad_rows, k=6, seed=5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wanted", [("query", "key"), ("key",), ("queue",)])
def test_gradient_only_for_what_requires_it(wanted):
    names = ("query", "key", "queue")

    def inputs_wanting():
        inputs = list(make_inputs())
        for i, name in enumerate(names):
            inputs[i] = inputs[i].detach().requires_grad_(name in wanted)
        return inputs

    got, want = inputs_wanting(), inputs_wanting()
    triton_loss(*got, k=6, seed=2).backward()
    kcl_ext.kpos_loss_reference(*want, k=6, seed=2).backward()
    for name, a, b in zip(names, got, want):
        if name in wanted:
            assert_close(a.grad, b.grad, torch.float32, f"d {name}")
        else:
            assert a.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    query, key, queue, query_labels, queue_labels = make_inputs(n=0)
    loss = triton_loss(query, key, queue, query_labels, queue_labels, k=6, seed=1,
                       reduction=reduction)
    if reduction == "mean":
        assert loss.shape == () and torch.isnan(loss)
        return
    assert loss.shape == ((0,) if reduction == "none" else ())
    grads = torch.autograd.grad(loss.sum(), (query, key, queue))
    assert grads[0].shape == (0, D) and grads[1].shape == (0, D)
    assert torch.equal(grads[2], torch.zeros_like(queue))


@pytest.mark.parametrize("queue_size, all_empty", [(0, False), (40, True)])
def test_no_valid_queue_entry_gives_zero_loss(queue_size, all_empty):
    query, key, queue, query_labels, queue_labels = make_inputs(q=queue_size)
    if all_empty:
        queue_labels = torch.full_like(queue_labels, -3)
    loss = triton_loss(query, key, queue, query_labels, queue_labels, k=6, seed=1, reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in torch.autograd.grad(loss, (query, key, queue), torch.randn(N).to(DEVICE)):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_torch_compile_fullgraph():
    # On the GPU the op is a triton_op: compile traces into the launchers and Inductor sees the
    # kernels. Under the interpreter the op is an opaque custom op (interpreted kernels cannot be
    # captured), so this checks the registration, fake kernels and autograd for fullgraph tracing
    # with the light "aot_eager" backend; the kernels themselves run interpreted either way.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def step(query, key, queue, query_labels, queue_labels, seed):
        loss = kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=6, seed=seed,
                                 backend="triton")
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    inputs = make_inputs()
    got = compiled(*inputs, 5)
    got_grads = torch.autograd.grad(got, inputs[:3])
    want = step(*inputs, 5)
    want_grads = torch.autograd.grad(want, inputs[:3])
    for a, b in zip([got, *got_grads], [want, *want_grads]):
        assert_close(a, b, torch.float32, "compiled")
    # seed=None: the compiled graph draws the seed at run time, as eager does.
    torch.manual_seed(11)
    drawn = compiled(*inputs, None)
    torch.manual_seed(11)
    assert torch.equal(drawn, step(*inputs, None))


def test_auto_backend_on_cuda_is_triton():
    from kcl_ext import ops
    assert ops._resolve_backend("auto", torch.device("cuda")) == "triton"
    assert ops._resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_bad_arguments_are_rejected():
    query, key, queue, query_labels, queue_labels = make_inputs()
    with pytest.raises(ValueError, match="k must be >= -1"):
        triton_loss(query, key, queue, query_labels, queue_labels, k=-2)
    with pytest.raises(ValueError, match="queue must be 2-D"):
        triton_loss(query, key, queue[:, :5], query_labels, queue_labels)
    with pytest.raises(ValueError, match="seed must be an int64 tensor"):
        torch.ops.kcl.kpos_forward_triton(query, key, queue, query_labels, queue_labels,
                                          torch.zeros(1, device=DEVICE), 6, 0.07)


def test_opcheck():
    inputs = make_inputs(n=18, q=40)
    seed = kernels.seed_tensor(4, inputs[0])
    torch.library.opcheck(torch.ops.kcl.kpos_forward_triton, (*inputs, seed, 6, 0.1))
    rows, lse, selection = torch.ops.kcl.kpos_forward_triton(*inputs, seed, 6, 0.1)
    grad_rows = torch.randn(18).to(DEVICE)
    detached = [t.detach() for t in inputs]
    # The backward has no derivative of its own (no double backward), so no autograd test.
    torch.library.opcheck(torch.ops.kcl.kpos_backward_triton,
                          (grad_rows, *detached, lse, selection, 0.1, [True, False, True]),
                          test_utils=("test_schema", "test_faketensor"))
