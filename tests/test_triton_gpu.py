"""The Triton kernels at real sizes on a CUDA GPU (skipped without one).

tests/test_triton.py runs on the GPU too when there is one; this module adds what only makes sense
there: the benchmark's problem size, the launch configurations of large D, long same-class
segments, and the memory bound (no N x Q buffer).
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
    from kcl_ext.triton import kernels

TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-2, 5e-3),
              torch.bfloat16: (1e-1, 2e-2)}


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


def check_against_reference(inputs, dtype, **kwargs):
    got = outputs(lambda *a, **kw: kcl_ext.kpos_loss(*a, backend="triton", **kw), inputs, **kwargs)
    want = outputs(kcl_ext.kpos_loss_reference, inputs, **kwargs)
    atol, rtol = TOLERANCES[dtype]
    for name, a, b in zip(("loss", "d query", "d key", "d queue"), got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return got


def test_benchmark_size_bf16_matches_reference_and_is_deterministic():
    inputs = make_inputs(256, 65536, 128, torch.bfloat16, classes=1000)
    first = check_against_reference(inputs, torch.bfloat16, k=6, seed=3)
    second = outputs(lambda *a, **kw: kcl_ext.kpos_loss(*a, backend="triton", **kw), inputs, k=6,
                     seed=3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 128), (torch.float16, 96),
                                      (torch.bfloat16, 200), (torch.float32, 384)])
def test_dtypes_and_feature_sizes(dtype, d):
    inputs = make_inputs(100, 3000, d, dtype, classes=10)
    check_against_reference(inputs, dtype, k=6, seed=5)


@pytest.mark.parametrize("k", [6, 200, -1])
def test_long_segments_select_as_cpp_backend(k):
    # Two classes over 5000 entries: segments of ~1700, many chunks of the selection kernel;
    # k = 200 takes the bisection path.
    inputs = make_inputs(70, 5000, 32, torch.float32, classes=2)
    seed = torch.tensor([123456789], device="cuda")
    _, _, got = torch.ops.kcl.kpos_forward_triton(*inputs, seed, k, 0.1)
    cpu = [t.detach().cpu() for t in inputs]
    _, _, want = torch.ops.kcl.kpos_forward(*cpu, k, 0.1, 123456789)
    assert torch.equal(got.cpu(), want)


def peak_extra_bytes(inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    outputs(lambda *a, **kw: kcl_ext.kpos_loss(*a, backend="triton", **kw), inputs, k=6, seed=1)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def test_extra_memory_does_not_grow_with_n_times_q():
    n, d = 256, 128
    small = peak_extra_bytes(make_inputs(n, 16384, d, torch.bfloat16, 1000, grads=("query",)))
    large = peak_extra_bytes(make_inputs(n, 65536, d, torch.bfloat16, 1000, grads=("query",)))
    logits_bytes = n * 65536 * 4            # one N x Q float32 matrix: 64 MiB
    # The peak stays far below one logits matrix, and going from Q = 16384 to 65536 adds O(Q)
    # (label sorting), far below the 48 MiB an N x Q buffer would add.
    assert large < logits_bytes // 2, (small, large)
    assert large - small < (n * (65536 - 16384) * 4) // 8, (small, large)


def test_queue_splits_fill_the_gpu():
    cfg = kernels.LaunchConfig(torch.device("cuda"), torch.bfloat16, 128)
    splits, _ = kernels._queue_splits(4, 65536 // cfg.block_n, cfg.target_programs)
    assert 4 * splits >= torch.cuda.get_device_properties(0).multi_processor_count
