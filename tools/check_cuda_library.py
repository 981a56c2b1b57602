"""Checks a CUDA build of the kcl library on a machine that may have no GPU: the library loads,
registers CPU and CUDA kernels for every kpos op, and its CPU kernel agrees with the reference.

    KCL_EXT_LIBRARY=build-cuda/lib/kcl_ext/_C....so python tools/check_cuda_library.py
"""
from __future__ import annotations

import os
import sys

import torch

OPS = ("kcl::kpos_forward", "kcl::kpos_backward", "kcl::sample_positives")


def main() -> int:
    path = os.environ.get("KCL_EXT_LIBRARY")
    if not path:
        print("check_cuda_library: set KCL_EXT_LIBRARY to the CUDA build of kcl_ext._C",
              file=sys.stderr)
        return 2
    import kcl_ext
    from kcl_ext.reference import kpos_loss_reference

    assert os.path.samefile(kcl_ext._library.LIBRARY_PATH, path), kcl_ext._library.LIBRARY_PATH
    missing = [f"{op} ({key})" for op in OPS for key in ("CPU", "CUDA")
               if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
    if missing:
        print("check_cuda_library: no kernel registered for " + ", ".join(missing), file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)
    query, key, queue = (torch.randn(r, 8, generator=g) for r in (5, 5, 40))
    query_labels = torch.randint(0, 3, (5,), generator=g)
    queue_labels = torch.randint(-1, 3, (40,), generator=g)
    got = kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, seed=1, backend="cpu")
    want = kpos_loss_reference(query, key, queue, query_labels, queue_labels, seed=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    print(f"check_cuda_library: {os.path.basename(path)} loads; CPU and CUDA kernels registered "
          f"for {', '.join(OPS)}; CPU result matches the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
