"""Session set-up shared by the test modules.

Without a GPU, Triton kernels can only run in Triton's interpreter, which must be switched on
before `triton` is first imported (its own jit helpers, such as tl.max, are decorated then).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_inputs(n, q, d, *, classes=5, dtype=torch.float32, empty_fraction=0.1, seed=0,
                requires_grad=(True, True, True)):
    """Fresh random unit-norm features and labels (with some empty queue slots)."""
    g = torch.Generator().manual_seed(seed)

    def features(rows, grad):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1)
        return x.to(dtype).requires_grad_(grad)

    query = features(n, requires_grad[0])
    key = features(n, requires_grad[1])
    queue = features(q, requires_grad[2])
    query_labels = torch.randint(0, classes, (n,), generator=g)
    queue_labels = torch.randint(0, classes, (q,), generator=g)
    queue_labels[torch.rand(q, generator=g) < empty_fraction] = -1
    return query, key, queue, query_labels, queue_labels


def rel_err(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.fixture
def inputs():
    return make_inputs
