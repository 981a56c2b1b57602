"""Fused Triton kernels of kpos_loss (forward and backward), registered as kcl::*_triton ops.

kernels.py holds the @triton.jit kernels, launch.py their launch configuration and host
launchers, ops.py the argument checks, the op registration, the seed and kpos_loss_triton.
Importing this package needs Triton. Kernels run on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1 is set before the import (Triton's interpreter; slow, for tests).
"""
from .launch import INTERPRETED
from .ops import kpos_loss_triton, seed_tensor

__all__ = ["INTERPRETED", "kpos_loss_triton", "seed_tensor"]
