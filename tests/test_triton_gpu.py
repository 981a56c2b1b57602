"""The Triton kernels at real sizes on a CUDA GPU (skipped without one).

The contract suite (tests/test_contract.py) runs the Triton kernels on the GPU too when there is
one; this module adds what only makes sense there: the benchmark's problem size, the launch
configurations of large D, long same-class segments and class sums of many pieces, and the
memory bound (no N x Q buffer).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    pytest.importorskip("triton")
    import kcl_ext
    from kcl_ext.triton import launch, seed_tensor
    from _backends import assert_close


def make_inputs(n, q, d, dtype, classes, grads=("query", "key", "queue"), seed=0):
    gen = torch.Generator().manual_seed(seed)

    def features(rows, name):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=gen), dim=1)
        return x.to("cuda", dtype).requires_grad_(name in grads)

    query_labels = torch.randint(0, classes, (n,), generator=gen)
    queue_labels = torch.randint(-1, classes, (q,), generator=gen)
    return (features(n, "query"), features(n, "key"), features(q, "queue"), query_labels.cuda(),
            queue_labels.cuda())


def outputs(fn, inputs, **kwargs):
    for t in inputs[:3]:
        t.grad = None
    loss = fn(*inputs, reduction="none", **kwargs)
    grad_rows = torch.linspace(0.5, 1.5, loss.numel(), device="cuda", dtype=loss.dtype)
    loss.backward(grad_rows)
    return [loss.detach()] + [t.grad for t in inputs[:3] if t.requires_grad]


def triton_loss(*args, **kwargs):
    return kcl_ext.kpos_loss(*args, backend="triton", **kwargs)


def check_against_reference(inputs, dtype, **kwargs):
    got = outputs(triton_loss, inputs, **kwargs)
    want = outputs(kcl_ext.kpos_loss_reference, inputs, **kwargs)
    for name, a, b in zip(("loss", "d query", "d key", "d queue"), got, want):
        assert_close(a, b, "triton", dtype, name)
    return got


@pytest.mark.parametrize("k", [6, -1])
def test_benchmark_size_bf16_matches_reference_and_is_deterministic(k):
    inputs = make_inputs(256, 65536, 128, torch.bfloat16, classes=1000)
    first = check_against_reference(inputs, torch.bfloat16, k=k, seed=3)
    second = outputs(triton_loss, inputs, k=k, seed=3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 128), (torch.float16, 96),
                                      (torch.bfloat16, 200), (torch.float32, 384),
                                      (torch.bfloat16, 384), (torch.float64, 24)])
def test_dtypes_and_feature_sizes(dtype, d):
    inputs = make_inputs(100, 3000, d, dtype, classes=10)
    check_against_reference(inputs, dtype, k=6, seed=5)


@pytest.mark.parametrize("k", [6, 200, -1])
def test_long_segments_select_as_cpp_backend(k):
    # Two classes over 5000 entries: segments of ~1700, many chunks of the selection kernel;
    # k = 200 takes the bisection path, k = -1 sums each class in two pieces of 1024 rows.
    inputs = make_inputs(70, 5000, 32, torch.float32, classes=2)
    detached = [t.detach() for t in inputs]
    got = torch.ops.kcl.kpos_forward_triton(*detached, seed_tensor(123456789, inputs[0]),
                                            k, 0.1, True)
    want = torch.ops.kcl.kpos_forward(*[t.cpu() for t in detached], k, 0.1, 123456789, True)
    assert torch.equal(got[2].cpu(), want[2])                 # positives
    assert torch.equal(got[3].cpu(), want[3])                 # |P_i|
    for name, index in (("loss", 0), ("lse", 1), ("target", 4), ("softmax mean", 5)):
        assert_close(got[index], want[index], "triton", torch.float32, name)


def test_class_sums_of_a_long_batch_class():
    # 4096 queries of two classes: the backward's per-class sums of the batch run in pieces.
    inputs = make_inputs(4096, 8192, 64, torch.bfloat16, classes=2)
    check_against_reference(inputs, torch.bfloat16, k=-1, seed=1)


def peak_extra_bytes(inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    outputs(triton_loss, inputs, k=6, seed=1)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def test_extra_memory_does_not_grow_with_n_times_q():
    n, d = 256, 128
    small = peak_extra_bytes(make_inputs(n, 16384, d, torch.bfloat16, 1000, grads=("query",)))
    large = peak_extra_bytes(make_inputs(n, 65536, d, torch.bfloat16, 1000, grads=("query",)))
    logits_bytes = n * 65536 * 4            # one N x Q float32 matrix: 64 MiB
    # The peak stays far below one logits matrix, and going from Q = 16384 to 65536 adds O(Q)
    # (label sorting, the empty-slot bias), far below the 48 MiB an N x Q buffer would add.
    assert large < logits_bytes // 2, (small, large)
    assert large - small < (n * (65536 - 16384) * 4) // 8, (small, large)


def test_queue_splits_fill_the_gpu():
    cfg = launch.LaunchConfig(torch.device("cuda"), torch.bfloat16, 128)
    splits, _ = launch._queue_splits(256 // cfg.block_m, 65536 // cfg.block_n,
                                      cfg.target_programs)
    assert 256 // cfg.block_m * splits >= torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_inputs_on_another_device_than_the_current_one():
    """Triton launches on the current device: the ops guard their launches with the inputs'
    device, so inputs on cuda:1 while cuda:0 is current give what they give with cuda:1 current."""
    inputs = [t.detach().to("cuda:1").requires_grad_(t.requires_grad)
              for t in make_inputs(100, 3000, 64, torch.float32, classes=10)]
    with torch.cuda.device(1):
        want = outputs(triton_loss, inputs, k=6, seed=5)
    with torch.cuda.device(0):
        got = outputs(triton_loss, inputs, k=6, seed=5)
    torch.cuda.synchronize(1)
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b)


def test_float16_queue_gradient_at_the_benchmark_size():
    """The mean over N = 256 rows and Q = 65536 (g_i p_ij ~ 6e-8, float16's smallest subnormal):
    with k = 0, d(queue) is the gradient-tile product alone; the kernel's power-of-two scale keeps
    its error within twice that of rounding the exact float64 result to float16."""
    inputs = make_inputs(256, 65536, 128, torch.float16, classes=1000, grads=("queue",))
    loss = triton_loss(*inputs, k=0, seed=1)
    got, = torch.autograd.grad(loss, [inputs[2]])
    queue64 = inputs[2].detach().double().requires_grad_()
    exact_loss = kcl_ext.kpos_loss_reference(inputs[0].double(), inputs[1].double(), queue64,
                                             *inputs[3:], k=0, seed=1)
    exact, = torch.autograd.grad(exact_loss, [queue64])

    def relative_error(a):
        return float((a.double() - exact).abs().max() / exact.abs().max())

    rounding = relative_error(exact.half())
    assert 0 < rounding and relative_error(got) <= 2 * rounding, (relative_error(got), rounding)
