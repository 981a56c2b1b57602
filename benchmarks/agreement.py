"""Before a benchmark is timed: does the implementation compute what it is compared with?

The loss is a sum of independent rows (the positive selection depends on the row index, which a
prefix keeps), so the check runs each implementation on the first CHECK_ROWS queries against the
full queue, the very inputs it is timed on, and compares it with the dense reference there:
  - kpos_loss backends, what users write instead (the dense loss eager and compiled, SupCon's
    form, the chunked version) and kpos_loss written on cut-cross-entropy: the loss and, for
    forward+backward, the gradients the point times, against kcl_ext.kpos_loss_reference (the
    dense user losses with kpos_loss's positives handed to them, where they would draw their own
    at random);
  - the reference itself: against the fused op of the device;
  - pytorch-metric-learning's SupConLoss (k = -1): its per-row losses and its reduced loss against
    the ones derived exactly from the reference's kpos_loss rows (benchmarks/peers.py);
  - inf-cl (k = 0): its per-row losses against those derived from the reference on [keys; queue].
A mismatch raises AssertionError, which fails the benchmark before anything is timed.
"""
from __future__ import annotations

import torch

from benchmarks import peers
from benchmarks.impls import FUSED, IMPLS, SEED, TEMPERATURE, Impl

CHECK_ROWS = 64
# Relative tolerance (error / magnitude of the expected tensor) per input dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _relative_error(got, expected) -> float:
    # torch.as_tensor: a peer returns a plain 0 when no row has a positive.
    got = torch.as_tensor(got).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    scale = expected.abs().max().clamp(min=1e-12)
    return float((got - expected).abs().max() / scale)


def _assert_close(what: str, got, expected, dtype) -> float:
    error = _relative_error(got, expected)
    assert torch.isfinite(torch.as_tensor(error)) and error <= TOLERANCE[dtype], (
        f"{what}: relative error {error:.3g} above {TOLERANCE[dtype]:.0e} "
        f"(got {torch.as_tensor(got).flatten()[:4].tolist()}, "
        f"expected {torch.as_tensor(expected).flatten()[:4].tolist()})")
    return error


def _rows(inputs, rows: int, grads=("query",)):
    query, key, queue, query_labels, queue_labels = inputs
    return (query[:rows].detach().clone().requires_grad_("query" in grads),
            key[:rows].detach().clone().requires_grad_("key" in grads),
            queue.detach().clone().requires_grad_("queue" in grads), query_labels[:rows],
            queue_labels)


def _loss_and_grad(fn, inputs, grads):
    if not grads:
        with torch.no_grad():
            return fn(*inputs), []
    loss = fn(*inputs)
    return loss, list(torch.autograd.grad(loss, [t for t in inputs[:3] if t.requires_grad]))


def _reference_rows(inputs, k):
    import kcl_ext
    with torch.no_grad():
        return kcl_ext.kpos_loss_reference(*inputs, k=k, temperature=TEMPERATURE,
                                           reduction="none", seed=SEED)


def _fused_for(device: str):
    for name in FUSED[device]:
        if IMPLS[name].unavailable(device) is None:
            return IMPLS[name], device
    return IMPLS["fused_cpu"], "cpu"   # a GPU without fused kernels: compare on the CPU


def check_agreement(impl: Impl, inputs, k: int, grads, device: str) -> dict:
    """Raises AssertionError unless `impl` agrees with its counterpart on the loss and the
    gradients of `grads` (names of the inputs; empty for a forward point); returns what was
    compared."""
    import kcl_ext
    dtype = inputs[0].dtype
    grads = tuple(grads)
    rows = min(CHECK_ROWS, inputs[0].size(0))
    sliced = _rows(inputs, rows, grads)
    got_fn = (impl.build_check or impl.build)(k, device)
    report = {"check_rows": rows, "check_tolerance": TOLERANCE[dtype]}

    if impl.computes_kpos:
        if impl.name == "reference":
            other, other_device = _fused_for(device)
            expected_inputs = _rows([t.to(other_device) for t in inputs], rows, grads)
            expected_fn = other.build(k, other_device)
            report["compared_with"] = other.name
        else:
            expected_inputs = _rows(inputs, rows, grads)
            report["compared_with"] = "reference"

            def expected_fn(*args):
                return kcl_ext.kpos_loss_reference(*args, k=k, temperature=TEMPERATURE,
                                                   seed=SEED)
        got, got_grads = _loss_and_grad(got_fn, sliced, grads)
        expected, expected_grads = _loss_and_grad(expected_fn, expected_inputs, grads)
        report["check_loss_error"] = _assert_close(f"{impl.name} loss", got, expected, dtype)
        errors = [_assert_close(f"{impl.name} grad of {name}", g, e, dtype)
                  for name, g, e in zip(grads, got_grads, expected_grads)]
        if errors:
            report["check_grad_error"] = max(errors)
        return report

    if impl.name == "pml_supcon":
        from pytorch_metric_learning.losses import SupConLoss
        from pytorch_metric_learning.reducers import DoNothingReducer
        query, key, queue, query_labels, queue_labels = sliced
        expected_rows = peers.supcon_rows_from_kpos(
            _reference_rows(sliced, 0), _reference_rows(sliced, -1),
            peers.own_logits(query, key, TEMPERATURE),
            peers.match_counts(query_labels, queue_labels))
        per_row = SupConLoss(temperature=TEMPERATURE, reducer=DoNothingReducer())
        with torch.no_grad():
            # DoNothingReducer hands back the loss dictionary with the per-row losses.
            got_rows = per_row(query, query_labels, ref_emb=queue,
                               ref_labels=queue_labels)["loss"]["losses"]
            got_mean = got_fn(*sliced)
        report["compared_with"] = "reference (k=0 and k=-1 rows, mapped)"
        report["check_loss_error"] = _assert_close(
            "SupConLoss rows", got_rows, expected_rows, dtype)
        _assert_close("SupConLoss mean", got_mean, peers.supcon_mean(expected_rows), dtype)
        return report

    if impl.name == "inf_cl":
        from inf_cl import cal_flash_loss
        query, key, queue, query_labels, queue_labels = sliced
        all_keys = inputs[1].detach()
        bank = torch.cat([all_keys, queue])
        bank_labels = torch.zeros(bank.size(0), dtype=torch.int64, device=bank.device)
        expected_rows = peers.inf_cl_rows_from_kpos(
            _reference_rows((query, key, bank, query_labels, bank_labels), 0))
        targets = torch.arange(rows, device=query.device)
        with torch.no_grad():
            got_rows = cal_flash_loss(query, bank, targets, scale=1.0 / TEMPERATURE,
                                      head_dim=query.size(1))
        report["compared_with"] = "reference on [keys; queue] (k=0 rows, mapped)"
        report["check_loss_error"] = _assert_close("inf-cl rows", got_rows, expected_rows, dtype)
        return report

    raise ValueError(f"no agreement check for {impl.name}")
