"""kpos_loss under torch.autocast (docs/kpos_loss.md, "Autocast").

Inside an autocast region of the inputs' device type the loss runs in float32, as PyTorch's own
losses do: float16 / bfloat16 query, key and queue (say a bfloat16 query from the autocast region
against the float32 queue of a memory bank) are cast to float32 first; float64 stays float64.
"""
from __future__ import annotations

import torch

CAST_TO = torch.float32
DEVICE_TYPES = ("cpu", "cuda")   # where the op has kernels (and so an autocast rule)


def autocast_enabled(device_type: str) -> bool:
    # torch.amp.is_autocast_available is not traceable by torch 2.11's dynamo: a fixed list.
    return device_type in DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def autocast_features(query, key, queue):
    """(query, key, queue), the half-precision ones cast to float32 inside an autocast region."""
    if not isinstance(query, torch.Tensor) or not autocast_enabled(query.device.type):
        return query, key, queue

    def cast(t):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            return t.to(CAST_TO)
        return t

    return cast(query), cast(key), cast(queue)


def register(op: str) -> None:
    """The same rule for a direct call of the registered op `op` (torch.ops.kcl.*)."""
    for device_type in DEVICE_TYPES:
        torch.library.register_autocast(op, device_type, CAST_TO)
