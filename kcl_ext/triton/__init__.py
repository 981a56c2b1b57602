"""Fused Triton kernels of kpos_loss (forward and backward), registered as kcl::*_triton ops.

Importing this module needs Triton. Kernels run on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1 is set before the import (Triton's interpreter; slow, for tests).
"""
from .kernels import INTERPRETED, kpos_loss_triton, seed_tensor

__all__ = ["INTERPRETED", "kpos_loss_triton", "seed_tensor"]
