"""The implementations that the benchmarks compare, behind one interface.

Each `Impl` builds a loss function `fn(query, key, queue, query_labels, queue_labels) -> scalar`
for one `k`, says on which devices and for which `k` it computes the same problem as kpos_loss,
and says why it cannot run here (missing GPU, backend or package) instead of failing. The GPU
implementations (the CUDA and Triton backends, inf-cl) plug in here; nothing else in the suite
knows about them.

Families: "kcl" (kpos_loss's own backends and its dense reference, the correctness yardstick),
"user" (what users write instead: benchmarks/baselines.py, the yardsticks of the speed claims) and
"peer" (other libraries: SupConLoss and inf-cl compute a related loss, and `benchmarks/peers.py`
maps one onto the other exactly; on cut-cross-entropy a user writes kpos_loss itself).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

TEMPERATURE = 0.07
SEED = 1234


@dataclass(frozen=True)
class Impl:
    name: str
    description: str
    devices: tuple[str, ...]
    ks: tuple[int, ...] | None          # the k it solves; None: every k
    family: str                         # "kcl", "user" or "peer" (see above)
    build: Callable[[int, str], Callable]   # (k, device) -> loss function
    needs: Callable[[str], str | None]      # device -> why it cannot run, or None
    logits_per_row: Callable[[int, int], int]  # (n, q) -> logits each query row computes
    # (k, device) -> the loss function the agreement check runs, where it differs from the timed
    # one (the dense user losses draw random positives; the check hands them kpos_loss's).
    build_check: Callable[[int, str], Callable] | None = None
    grads: tuple[str, ...] = ("query", "key", "queue")   # inputs it can differentiate
    # Whether it computes kpos_loss itself (checked against the reference directly), not a related
    # loss that benchmarks/peers.py maps onto it.
    computes_kpos: bool = True

    def unavailable(self, device: str) -> str | None:
        if device not in self.devices:
            return f"{self.name} does not run on {device}"
        if device == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA device"
        return self.needs(device)

    def supports_k(self, k: int) -> bool:
        return self.ks is None or k in self.ks


def _kcl_logits(n: int, q: int) -> int:
    return q + 1  # own key + queue


# ---------------------------------------------------------------------------------------------
# kpos_loss itself
# ---------------------------------------------------------------------------------------------
def _kcl_backend(backend: str):
    def build(k: int, device: str):
        import kcl_ext

        def loss(query, key, queue, query_labels, queue_labels):
            return kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=k,
                                     temperature=TEMPERATURE, seed=SEED, backend=backend)
        return loss
    return build


# ---------------------------------------------------------------------------------------------
# What users write instead (benchmarks/baselines.py)
# ---------------------------------------------------------------------------------------------
def _build_dense(compiled: bool, with_selection: bool):
    def build(k: int, device: str):
        from benchmarks import baselines
        fn = baselines.compiled(baselines.dense_loss) if compiled else baselines.dense_loss

        def loss(query, key, queue, query_labels, queue_labels):
            priorities = None
            if with_selection and k > 0:
                priorities = baselines.selection_priorities(query_labels, queue_labels, SEED)
            return fn(query, key, queue, query_labels, queue_labels, k, TEMPERATURE, priorities)
        return loss
    return build


def _build_supcon_mask(compiled: bool):
    def build(k: int, device: str):
        from benchmarks import baselines
        fn = baselines.compiled(baselines.supcon_mask_loss) if compiled else \
            baselines.supcon_mask_loss

        def loss(query, key, queue, query_labels, queue_labels):
            return fn(query, key, queue, query_labels, queue_labels, TEMPERATURE)
        return loss
    return build


CHUNKED_TILE = 2048


def _build_chunked(k: int, device: str):
    from benchmarks import baselines

    def loss(query, key, queue, query_labels, queue_labels):
        return baselines.chunked_loss(query, key, queue, query_labels, queue_labels, k,
                                      TEMPERATURE, SEED, CHUNKED_TILE)
    return loss


def _needs_nothing(device: str) -> str | None:
    return None


def _needs_kernel(dispatch_key: str):
    def needs(device: str) -> str | None:
        import kcl_ext  # noqa: F401  (registers torch.ops.kcl)
        if not torch._C._dispatch_has_kernel_for_dispatch_key("kcl::kpos_forward", dispatch_key):
            return f"kcl_ext was built without {dispatch_key} kernels"
        return None
    return needs


def _needs_triton(device: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        importlib.import_module("kcl_ext.triton")
    except ImportError as error:
        return f"kcl_ext.triton is not available ({error})"
    return None


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------
def _needs_module(module: str, package: str):
    def needs(device: str) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed"
        return None
    return needs


def _build_pml(k: int, device: str):
    from pytorch_metric_learning.losses import SupConLoss
    criterion = SupConLoss(temperature=TEMPERATURE)

    def loss(query, key, queue, query_labels, queue_labels):
        # How users call it with a memory bank: the queue as reference embeddings. The own key
        # takes no part (see benchmarks/peers.py for the exact relation to kpos_loss, k=-1).
        return criterion(query, query_labels, ref_emb=queue, ref_labels=queue_labels)
    return loss


def _build_inf_cl(k: int, device: str):
    from inf_cl import cal_flash_loss

    def loss(query, key, queue, query_labels, queue_labels):
        # MoCo's InfoNCE with inf-cl: the keys of the batch and the queue form the columns, row
        # i's positive is column i (the other keys of the batch are extra negatives). This is
        # cal_inf_loss's single-process path, with head_dim = D (one head).
        columns = torch.cat([key, queue])
        targets = torch.arange(query.size(0), device=query.device)
        return cal_flash_loss(query, columns, targets, scale=1.0 / TEMPERATURE,
                              head_dim=query.size(1)).mean()
    return loss


# cut-cross-entropy's implementation on each device: its Triton kernels need a GPU; on the CPU its
# torch.compile form (the logits materialised, compiled).
CCE_IMPL = {"cuda": "cce", "cpu": "torch_compile"}


def _build_cce(k: int, device: str):
    from benchmarks import peers

    def loss(query, key, queue, query_labels, queue_labels):
        return peers.cce_kpos_loss(query, key, queue, query_labels, queue_labels, k, TEMPERATURE,
                                   SEED, CCE_IMPL[device])
    return loss


def _needs_cce(device: str) -> str | None:
    missing = _needs_module("cut_cross_entropy", "cut-cross-entropy")(device)
    if missing is None and device == "cuda":
        import kcl_ext  # noqa: F401  (registers torch.ops.kcl)
        # The positives come from kcl_ext.sample_positives on the device of the labels.
        if not torch._C._dispatch_has_kernel_for_dispatch_key("kcl::sample_positives", "CUDA"):
            return "kcl_ext was built without CUDA kernels (kcl_ext.sample_positives on CUDA)"
    return missing


IMPLS: dict[str, Impl] = {impl.name: impl for impl in [
    Impl("reference", "dense pure-PyTorch kpos_loss (kcl_ext.kpos_loss_reference), eager: the "
         "correctness yardstick", ("cpu", "cuda"), None, "kcl", _kcl_backend("reference"),
         _needs_nothing, _kcl_logits),
    Impl("dense", "the dense loss users write (official KCL form: logits, same-class mask, topk "
         "on random priorities, log_softmax, masked mean), eager", ("cpu", "cuda"), None, "user",
         _build_dense(False, False), _needs_nothing, _kcl_logits,
         build_check=_build_dense(False, True)),
    Impl("dense_compiled", "the same dense loss under torch.compile(dynamic=True)",
         ("cpu", "cuda"), None, "user", _build_dense(True, False), _needs_nothing, _kcl_logits,
         build_check=_build_dense(True, True)),
    Impl("supcon_mask", "SupCon's mask form of the dense loss (k = -1), eager", ("cpu", "cuda"),
         (-1,), "user", _build_supcon_mask(False), _needs_nothing, _kcl_logits),
    Impl("supcon_mask_compiled", "SupCon's mask form under torch.compile(dynamic=True)",
         ("cpu", "cuda"), (-1,), "user", _build_supcon_mask(True), _needs_nothing, _kcl_logits),
    Impl("chunked", f"kpos_loss's own algorithm in chunked eager PyTorch (queue tiles of "
         f"{CHUNKED_TILE}, the query's gradient in the forward)", ("cpu", "cuda"), None, "user",
         _build_chunked, _needs_nothing, _kcl_logits, grads=("query", "key")),
    Impl("fused_cpu", "kcl_ext.kpos_loss(backend='cpu'): the fused C++ CPU op",
         ("cpu",), None, "kcl", _kcl_backend("cpu"), _needs_kernel("CPU"), _kcl_logits),
    Impl("cuda", "kcl_ext.kpos_loss(backend='cuda'): the fused CUDA kernels",
         ("cuda",), None, "kcl", _kcl_backend("cuda"), _needs_kernel("CUDA"), _kcl_logits),
    Impl("triton", "kcl_ext.kpos_loss(backend='triton'): the fused Triton kernels",
         ("cuda",), None, "kcl", _kcl_backend("triton"), _needs_triton, _kcl_logits),
    Impl("pml_supcon", "pytorch-metric-learning SupConLoss, queue as ref_emb (k = -1)",
         ("cpu", "cuda"), (-1,), "peer", _build_pml,
         _needs_module("pytorch_metric_learning", "pytorch-metric-learning"),
         lambda n, q: q, computes_kpos=False),
    Impl("inf_cl", "inf-cl cal_flash_loss over [keys; queue] (k = 0)",
         ("cuda",), (0,), "peer", _build_inf_cl, _needs_module("inf_cl", "inf-cl"),
         lambda n, q: n + q, computes_kpos=False),
    Impl("cut_ce", "kpos_loss written on cut-cross-entropy: linear_cross_entropy(query / tau, "
         "queue, reduction='none') for the queue's log-sum-exp, logaddexp with the own logit, "
         "the positives of kcl_ext.sample_positives gathered (impl 'cce' on CUDA, "
         "'torch_compile' on the CPU)", ("cpu", "cuda"), None, "peer", _build_cce,
         _needs_cce, _kcl_logits),
]}

# The fused op of each device: the implementation the others are compared with.
FUSED = {"cpu": ("fused_cpu",), "cuda": ("cuda", "triton")}
