"""Session set-up shared by the test modules.

Without a GPU, Triton kernels can only run in Triton's interpreter, which must be switched on
before `triton` is first imported (its own jit helpers, such as tl.max, are decorated then).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
