"""What only the CUDA kernels have. The contract itself (values against the reference, degenerate
inputs, errors, determinism, gradcheck, opcheck) is tests/test_contract.py, run with backend="cuda".

Here: the CUDA ops against the CPU ops on the same inputs along the kernels' own paths (tensor
cores or FMA, 16-byte copies or element loads, one or two column slices, long lists summed through
chunk sums), the current stream, no host synchronisation inside the ops, no N x Q allocation, and
backend="auto" on a GPU. Skipped where there is no CUDA GPU or no CUDA build.
"""
from __future__ import annotations

import pytest
import torch

import kcl_ext
from kcl_ext import _backend_choice
from _backends import TOLERANCES, grad_weights, make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _backend_choice.cuda_kernels_available(),
                       reason="kcl_ext was built without CUDA kernels (FORCE_CUDA=1)"),
]

HALF = (torch.float16, torch.bfloat16)


def assert_agree(cuda_value, cpu_value, dtype, what):
    """CUDA against the CPU op: each is within its own tolerance of the reference, so they agree
    within the sum of the two (rtol relative to the largest magnitude, as tests/_backends.py)."""
    atol = TOLERANCES[("cuda", dtype)][0] + TOLERANCES[("cpu", dtype)][0]
    rtol = TOLERANCES[("cuda", dtype)][1] + TOLERANCES[("cpu", dtype)][1]
    actual, expected = cuda_value.detach().double().cpu(), cpu_value.detach().double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, atol=atol + rtol * scale, rtol=0.0,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def forward_backward(inputs, k, seed, query_grad, grad_rows=None):
    """Both raw ops on one device; the backward asks for every gradient."""
    state = torch.ops.kcl.kpos_forward(*inputs, k, 0.1, seed, query_grad)
    if grad_rows is None:
        grad_rows = grad_weights(inputs[0].size(0), state[1].dtype, inputs[0].device)
    grads = torch.ops.kcl.kpos_backward(grad_rows, *inputs, *state[1:], k, 0.1, [True, True, True])
    return state, grads


# (N, Q, D, dtype, why): each case takes a path of the kernels that the contract's shapes may not.
PATHS = [
    (70, 2000, 128, torch.bfloat16, "tensor cores, 16-byte cp.async rows, several row blocks"),
    (33, 900, 200, torch.float16, "tensor cores, two 128-column slices of the softmax mean"),
    (21, 700, 3, torch.bfloat16, "tensor cores, rows too short for 16-byte copies"),
    (17, 500, 300, torch.bfloat16, "D > 256: the FMA engine in half precision"),
    (19, 600, 256, torch.float16,
     "D = 256: tensor cores where 99 KiB + 512 B of shared memory fit, else the FMA engine"),
    (40, 3000, 72, torch.float32, "FMA engine, two 64-column slices"),
    (12, 700, 40, torch.float64, "FMA engine in float64, 32-row tiles"),
]


@pytest.mark.parametrize("n,q,d,dtype,why", PATHS, ids=[p[4] for p in PATHS])
@pytest.mark.parametrize("k", [0, 2, -1])
def test_agrees_with_the_cpu_op(n, q, d, dtype, why, k):
    x = make_inputs(n, q, d, dtype=dtype, classes=6, seed=n + q + d, negative_queries=2,
                    device="cuda", requires_grad=(False, False, False))
    seed = -98765
    (rows, lse, positives, num, target, mean), grads = forward_backward(x, k, seed, True)
    cpu_state, cpu_grads = forward_backward([t.cpu() for t in x], k, seed, True)
    assert torch.equal(positives.cpu(), cpu_state[2]) and torch.equal(num.cpu(), cpu_state[3])
    for name, got, want in zip(("loss_rows", "lse", "target", "softmax_mean"),
                               (rows, lse, target, mean),
                               (cpu_state[0], cpu_state[1], cpu_state[4], cpu_state[5])):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_agree(got, want, dtype, name)
    for name, got, want in zip(("query", "key", "queue"), grads, cpu_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_agree(got, want, dtype, f"grad of {name}")


@pytest.mark.parametrize("k", [-1, 200])
def test_long_positive_lists_agree_with_the_cpu_op(k):
    """Lists of more than 128 rows (a class of the queue for k = -1, k = 200 selected rows; the
    query rows of a class in the queue's backward) are summed through fixed chunk sums."""
    x = make_inputs(300, 4000, 16, classes=2, empty_fraction=0.05, seed=5, device="cuda",
                    requires_grad=(False, False, False))
    state, grads = forward_backward(x, k, 11, False)
    cpu_state, cpu_grads = forward_backward([t.cpu() for t in x], k, 11, False)
    assert torch.equal(state[2].cpu(), cpu_state[2]) and torch.equal(state[3].cpu(), cpu_state[3])
    assert bool((state[3] > 129).all())  # every row's list spans whole chunks
    assert_agree(state[4], cpu_state[4], torch.float32, "target")
    assert_agree(state[0], cpu_state[0], torch.float32, "loss_rows")
    for name, got, want in zip(("query", "key", "queue"), grads, cpu_grads):
        assert_agree(got, want, torch.float32, f"grad of {name}")


def test_float16_queue_gradient_of_a_mean_over_a_large_queue():
    """d(queue) in float16 where G = g p is far below float16's normal range (g = 1/N, p ~ 1/Q):
    the tensor-core kernel scales G by a power of two before rounding it (docs/cuda_kernels.md,
    "The float16 range of the gradient tile"). Without the scale the error was about 1.8 %."""
    n, q, d = 256, 65536, 64
    x = make_inputs(n, q, d, dtype=torch.float16, classes=10, seed=21, device="cuda",
                    requires_grad=(False, False, False))
    grad_rows = torch.full((n,), 1.0 / n, dtype=torch.float32, device="cuda")
    _, grads = forward_backward(x, 6, 4, True, grad_rows)
    _, want = forward_backward([t.cpu().double() for t in x], 6, 4, True, grad_rows.cpu().double())
    got = grads[2].double().cpu()
    err = float((got - want[2]).norm() / want[2].norm())
    assert err < 2e-3, f"relative error of the float16 queue gradient {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_runs_on_the_current_stream(dtype):
    x = make_inputs(50, 3000, 64, dtype=dtype, seed=2, device="cuda",
                    requires_grad=(False, False, False))
    want = forward_backward(x, 6, 3, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = forward_backward(x, 6, 3, True)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k", [6, -1])
def test_no_host_synchronisation_in_forward_and_backward(k):
    x = make_inputs(40, 2000, 32, dtype=torch.bfloat16, seed=4, device="cuda",
                    requires_grad=(False, False, False))
    grad_rows = grad_weights(40, torch.float32, "cuda")
    forward_backward(x, k, 5, False, grad_rows)  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(x, k, 5, False, grad_rows)  # the backward recomputes the softmax mean
        forward_backward(x, k, 5, True, grad_rows)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _peak_extra_bytes(n, q, d):
    """Peak memory of one forward and backward (the query's gradient: the MoCo case) beyond the
    inputs."""
    x = make_inputs(n, q, d, dtype=torch.bfloat16, classes=100, seed=3, device="cuda",
                    requires_grad=(True, False, False))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = kcl_ext.kpos_loss(*x, k=6, seed=1, backend="cuda")
    torch.autograd.grad(loss, x[0])
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_extra_memory_does_not_grow_with_n_times_q():
    n, q, d = 256, 32768, 128
    small, large = _peak_extra_bytes(n, q, d), _peak_extra_bytes(n, 2 * q, d)
    logits_bytes = n * q * 4  # one float32 N x Q matrix at the smaller Q
    assert 0 < large < logits_bytes, (large, logits_bytes)
    # Doubling Q adds O(Q) (labels, their sort, the empty-slot mask), not another N x Q.
    assert large - small < logits_bytes // 4, (small, large, logits_bytes)


def test_auto_backend_is_the_cuda_kernels_and_matches_them(monkeypatch):
    monkeypatch.delenv(_backend_choice.ENV_VAR, raising=False)
    x = make_inputs(16, 256, 32, dtype=torch.bfloat16, seed=12, device="cuda")
    assert kcl_ext.resolve_backend(x[0]) == "cuda"
    loss = kcl_ext.kpos_loss(*x, seed=3)
    want = kcl_ext.kpos_loss(*x, seed=3, backend="cuda")
    assert torch.equal(loss, want)
