"""ctest: the CMake-built library, loaded with torch.ops.load_library, agrees with the reference."""
import os
import sys

import torch

import kcl_ext
from kcl_ext.reference import kpos_loss_reference

assert kcl_ext._library.LIBRARY_PATH == os.environ["KCL_EXT_LIBRARY"], kcl_ext._library.LIBRARY_PATH
g = torch.Generator().manual_seed(0)
query, key = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
queue = torch.randn(300, 16, generator=g)
query_labels = torch.randint(0, 4, (9,), generator=g)
queue_labels = torch.randint(-1, 4, (300,), generator=g)
fused = torch.ops.kcl.kpos_loss(query, key, queue, query_labels, queue_labels, 3, 0.5, "mean", 7)
ref = kpos_loss_reference(query, key, queue, query_labels, queue_labels, k=3, temperature=0.5, seed=7)
err = abs(float(fused) - float(ref)) / abs(float(ref))
print(f"loaded {kcl_ext._library.LIBRARY_PATH}: fused {float(fused):.6f} reference {float(ref):.6f} rel err {err:.2e}")
sys.exit(0 if err < 1e-5 else 1)
