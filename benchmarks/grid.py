"""Which points each benchmark run measures (docs/benchmarks.md explains the choice).

A point is implementation x mode x N x Q x dtype x k, D = 128. Modes: `forward` (under
torch.no_grad), `forward+backward` (the gradient of the query only: the MoCo / KCL training step,
where the key comes from the momentum encoder and the queue is a buffer) and
`forward+backward, all grads` (query, key and queue). A dense implementation (the loss users
write, its compiled form, SupCon's form, SupConLoss, the reference) materialises several N x Q
tensors, so each profile has a budget on N*Q for them; points above it are listed in the results
as skipped, with the reason, not dropped.

  cpu         `make bench`: N = 256 (MoCo's batch), Q from 4096 to 65536, float32, k = 6 (the
              paper's) and k = -1, the fused op beside the dense loss users write (eager and
              compiled), the chunked eager version of the same algorithm and, at k = -1, SupCon's
              form and pytorch-metric-learning's SupConLoss, and kpos_loss written on
              cut-cross-entropy (its torch.compile form on the CPU); at Q = 65536 also all three
              gradients, N = 1024 and bfloat16; the fused op alone to Q = 262144 (scaling).
              Dense budget N*Q <= 2^26.
  cuda        the whole GPU grid: N in {256, 1024, 4096}, Q to 262144 (1M for the scaling run),
              float32 and bfloat16, k = 6, -1 and 0 (with inf-cl), cut-cross-entropy at each k.
  cuda-check  the GPU check script's profile (tools/gpu_check.sh), a few minutes: N = 256,
              Q = 65536, bfloat16 and float32, k in {0, 6, -1}, the fused CUDA and Triton kernels
              beside the dense loss eager and compiled, inf-cl (k = 0) and cut-cross-entropy's
              Triton kernels (bfloat16, k = 6 and 0); then N = 4096. The
              compiled points come first, so that a slow compilation is timed early.
  smoke       tiny shapes, every implementation, to check the suite itself in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.impls import IMPLS

D = 128
MODES = ("forward", "forward+backward")
GRADS = {"query": ("query",), "all": ("query", "key", "queue")}
DENSE = ("reference", "dense", "dense_compiled", "supcon_mask", "supcon_mask_compiled",
         "pml_supcon")
SKIPPED: list[dict] = []   # points of this run not measured, with the reason (into the JSON)


@dataclass(frozen=True)
class Case:
    impl: str
    mode: str
    n: int
    q: int
    d: int
    dtype: str
    k: int
    classes: int = 1000
    grads: str = "query"           # forward+backward: which inputs get a gradient (GRADS)
    skip: str | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        mode = self.mode if self.grads == "query" or self.mode == "forward" else \
            f"{self.mode}-{self.grads}"
        return f"{self.impl}-{mode}-k{self.k}-N{self.n}-Q{self.q}-D{self.d}-{self.dtype}"

    @property
    def grad_inputs(self) -> tuple[str, ...]:
        return GRADS[self.grads]


def _dense_budget_reason(impl: str, n: int, q: int, budget_log2: int) -> str | None:
    if impl in DENSE and n * q > 2**budget_log2:
        return (f"dense N x Q implementation above this run's budget N*Q <= 2^{budget_log2} "
                f"(N*Q = {n * q})")
    return None


def _cases(impls, ns, qs, dtypes, ks, budget_log2, modes=MODES, grads="query", classes=1000):
    for k in ks:
        for impl in impls:
            if not IMPLS[impl].supports_k(k):
                continue
            for dtype in dtypes:
                for n in ns:
                    for q in qs:
                        for mode in modes:
                            yield Case(impl, mode, n, q, D, dtype, k, classes, grads,
                                       _dense_budget_reason(impl, n, q, budget_log2))


def cases(profile: str) -> list[Case]:
    users = ("dense", "dense_compiled", "chunked")
    supcon = ("supcon_mask", "supcon_mask_compiled", "pml_supcon")
    if profile == "cpu":
        qs = (4096, 16384, 65536)
        out = list(_cases(("fused_cpu",) + users + ("cut_ce",), (256,), qs, ("float32",),
                          (6, -1), 26))
        out += _cases(supcon, (256,), qs, ("float32",), (-1,), 26)
        out += _cases(("fused_cpu", "dense", "dense_compiled", "cut_ce"), (256,), (65536,),
                      ("float32",), (6, -1), 26, modes=("forward+backward",), grads="all")
        out += _cases(("fused_cpu",) + users + ("cut_ce",), (1024,), (65536,), ("float32",),
                      (6, -1), 26, modes=("forward+backward",))
        out += _cases(("fused_cpu", "dense", "dense_compiled"), (256,), (65536,), ("bfloat16",),
                      (6,), 26,
                      modes=("forward+backward",))
        out += _cases(("fused_cpu",), (256,), (262144,), ("float32",), (6,), 26)
    elif profile == "cuda":
        ns, qs = (256, 1024, 4096), (4096, 16384, 65536, 262144)
        fused = ("cuda", "triton")
        out = list(_cases(fused + ("dense", "dense_compiled", "cut_ce"), ns, qs,
                          ("float32", "bfloat16"), (6,), 28))
        out += _cases(fused + ("dense", "dense_compiled", "chunked", "cut_ce") + supcon, (256,),
                      qs, ("float32", "bfloat16"), (-1,), 28)
        out += _cases(fused + ("dense", "inf_cl", "cut_ce"), (256,), qs, ("float32", "bfloat16"),
                      (0,), 28)
        out += _cases(fused + ("dense", "dense_compiled"), (256,), (65536,), ("bfloat16",), (6,),
                      28, modes=("forward+backward",), grads="all")
        out += _cases(fused, (256,), (524288, 1048576), ("float32",), (6,), 28)  # scaling run
    elif profile == "cuda-check":
        fused = ("cuda", "triton")
        # Compiled first: its compilation (first_call_s) is the slow, uncertain part.
        out = list(_cases(("dense_compiled",), (256,), (65536,), ("bfloat16",), (6,), 28,
                          modes=("forward+backward",)))
        out += _cases(fused + ("dense",), (256,), (65536,), ("bfloat16", "float32"), (6, -1), 28)
        out += _cases(fused + ("dense", "inf_cl"), (256,), (65536,), ("bfloat16",), (0,), 28)
        out += _cases(("cut_ce",), (256,), (65536,), ("bfloat16",), (6, 0), 28)
        out += _cases(fused + ("dense",), (4096,), (65536,), ("bfloat16",), (6,), 28,
                      modes=("forward+backward",))
        out += _cases(("dense_compiled",), (256,), (65536,), ("float32",), (6,), 28,
                      modes=("forward+backward",))
    elif profile == "smoke":
        out = []
        for impl_name, impl in IMPLS.items():
            k = impl.ks[0] if impl.ks else 6
            out += _cases((impl_name,), (8,), (64, 256), ("float32",), (k,), 30, classes=4)
        out += _cases(("fused_cpu", "dense"), (8,), (64,), ("float32",), (-1,), 30,
                      modes=("forward+backward",), grads="all", classes=4)
    else:
        raise ValueError(
            f"profile must be 'cpu', 'cuda', 'cuda-check' or 'smoke', got {profile!r}")
    return out
