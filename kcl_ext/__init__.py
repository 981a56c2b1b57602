"""kcl_ext: fused k-positive contrastive loss (KCL) for PyTorch."""
from ._backend_choice import resolve_backend
from .kcl import KCL
from .memory_bank import MemoryBank
from .ops import BACKENDS, KPositiveContrastiveLoss, kpos_loss, sample_positives
from .reference import kpos_loss_reference, sample_positives_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "KCL",
    "KPositiveContrastiveLoss",
    "MemoryBank",
    "kpos_loss",
    "kpos_loss_reference",
    "resolve_backend",
    "sample_positives",
    "sample_positives_reference",
]
