"""Which points each benchmark run measures (docs/benchmarks.md explains the choice).

The full grid is implementation x mode x N x Q x dtype with N in {256, 1024, 4096},
Q in {4096, 16384, 65536, 262144}, D = 128. A dense implementation (the reference, eager or
compiled, and SupConLoss) materialises several N x Q tensors, so each profile has a budget on N*Q
for them; points above it are listed in the results as skipped, with the reason, not dropped.

  cpu       N = 256 (MoCo's batch), Q up to 262144, float32: the kpos_loss implementations at k = 6
            (the paper's setting; the compiled reference is skipped there, COMPILE_HASH_REASON)
            and at k = -1 beside SupConLoss. Dense budget N*Q <= 2^24, about 0.7 GiB of N x Q
            temporaries for the reference and seconds per call on two cores.
  cuda      the full grid, float32 and bfloat16 for the fused kernels, k = 6, -1 (with SupConLoss)
            and 0 (with inf-cl) at N = 256; the scaling run to Q = 1M. Dense budget N*Q <= 2^26.
  cuda-quick  the GPU points that fit a short device slot (about 40, a minute or two): N = 256,
            Q from 4096 to 1M for the fused kernels (float32, k = 6; bfloat16 at Q = 65536),
            the dense implementations to Q = 65536, the peers at Q = 65536.
  smoke     tiny shapes, every implementation, to check the suite itself in seconds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from benchmarks.impls import IMPLS

D = 128
MODES = ("forward", "forward+backward")
DENSE = ("reference", "reference_compiled", "pml_supcon")
# torch.compile of the reference at k > 0 (the selection hash: a long chain of 32-bit integer
# ops that inductor fuses into one kernel) spends minutes in code generation on a small CPU.
COMPILE_HASH_REASON = ("torch.compile of the k > 0 reference (its selection hash, fused by "
                       "inductor into one C++ kernel) did not finish compiling the forward in "
                       "15 minutes on the 2-core benchmark machine: above make bench's budget; "
                       "the compiled reference runs at k = -1 on the CPU, at k = 6 on a GPU")
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
    skip: str | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        return f"{self.impl}-{self.mode}-k{self.k}-N{self.n}-Q{self.q}-D{self.d}-{self.dtype}"


def _dense_budget_reason(impl: str, n: int, q: int, budget_log2: int) -> str | None:
    if impl in DENSE and n * q > 2**budget_log2:
        return (f"dense N x Q implementation above this run's budget N*Q <= 2^{budget_log2} "
                f"(N*Q = {n * q})")
    return None


def _cases(impls, ns, qs, dtypes, k, budget_log2, classes=1000):
    for impl in impls:
        for dtype in dtypes:
            for n in ns:
                for q in qs:
                    for mode in MODES:
                        yield Case(impl, mode, n, q, D, dtype, k, classes,
                                   _dense_budget_reason(impl, n, q, budget_log2))


def cases(profile: str) -> list[Case]:
    if profile == "cpu":
        qs = (4096, 16384, 65536, 262144)
        out = list(_cases(("fused_cpu", "reference"), (256,), qs, ("float32",), 6, 24))
        out += [dataclasses.replace(c, skip=COMPILE_HASH_REASON) for c in
                _cases(("reference_compiled",), (256,), qs, ("float32",), 6, 24)]
        out += _cases(("fused_cpu", "reference_compiled", "pml_supcon"), (256,), qs,
                      ("float32",), -1, 24)
    elif profile == "cuda":
        ns, qs = (256, 1024, 4096), (4096, 16384, 65536, 262144)
        fused = ("cuda", "triton")
        out = list(_cases(fused, ns, qs, ("float32", "bfloat16"), 6, 26))
        out += _cases(("reference", "reference_compiled"), ns, qs, ("float32",), 6, 26)
        out += _cases(fused + ("pml_supcon",), (256,), qs, ("float32",), -1, 26)
        out += _cases(fused + ("inf_cl",), (256,), qs, ("float32",), 0, 26)
        out += _cases(fused, (256,), (524288, 1048576), ("float32",), 6, 26)   # scaling run
    elif profile == "cuda-quick":
        fused = ("cuda", "triton")
        out = list(_cases(fused, (256,), (4096, 65536, 262144, 1048576), ("float32",), 6, 26))
        out += _cases(fused, (256,), (65536,), ("bfloat16",), 6, 26)
        out += _cases(("reference", "reference_compiled"), (256,), (4096, 65536), ("float32",),
                      6, 26)
        out += _cases(fused + ("pml_supcon",), (256,), (65536,), ("float32",), -1, 26)
        out += _cases(fused + ("inf_cl",), (256,), (65536,), ("float32",), 0, 26)
    elif profile == "smoke":
        out = []
        for impl_name, impl in IMPLS.items():
            # The compiled reference at k = -1: at k > 0 it takes minutes to compile on a CPU.
            k = impl.ks[0] if impl.ks else (-1 if impl_name == "reference_compiled" else 6)
            out += _cases((impl_name,), (8,), (64, 256), ("float32",), k, 30, classes=4)
    else:
        raise ValueError(
            f"profile must be 'cpu', 'cuda', 'cuda-quick' or 'smoke', got {profile!r}")
    return out
