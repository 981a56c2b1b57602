"""The memory bank of KCL: a FIFO ring buffer of keys and their labels."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import distributed as kdist


class MemoryBank(nn.Module):
    """A FIFO queue of `size` keys of dimension `dim` with their class labels.

    Slots never written are empty: zero keys labelled -1, which `kpos_loss` ignores entirely.
    `enqueue(keys, labels)` writes after the slot written last, wrapping around the end, so the
    bank always holds the `size` most recent keys. Under torch.distributed it first all-gathers
    keys and labels from every process (rank order), so all processes hold the same bank.
    Enqueue after the loss: keys of the current batch are then neither positives nor negatives of
    its own queries, as in the official code.

    The buffers are registered, so `state_dict()` carries keys, labels and the write pointer.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryBank: size and dim must be >= 1, got size={size}, dim={dim}")
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))
        self.register_buffer("total_enqueued", torch.zeros((), dtype=torch.int64))

    @property
    def size(self) -> int:
        return self.keys.size(0)

    @property
    def is_full(self) -> bool:
        return int(self.total_enqueued) >= self.size

    def __len__(self) -> int:
        return min(int(self.total_enqueued), self.size)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        if keys.dim() != 2 or keys.size(1) != self.keys.size(1):
            raise ValueError(f"MemoryBank.enqueue: keys must be [B, {self.keys.size(1)}], "
                             f"got {list(keys.shape)}")
        if labels.shape != (keys.size(0),):
            raise ValueError(f"MemoryBank.enqueue: labels must be [{keys.size(0)}], "
                             f"got {list(labels.shape)}")
        keys = kdist.all_gather_cat(keys.detach().to(self.keys.dtype))
        labels = kdist.all_gather_cat(labels.detach().to(torch.int64))
        n = keys.size(0)
        # Entry t of the batch goes to slot (pointer + t) % size; when the batch is longer than
        # the bank, only its newest `size` entries survive, in the slots the full write would
        # give. The pointer stays on the device: no host synchronisation per step.
        first = max(0, n - self.size)
        slots = (torch.arange(first, n, device=self.keys.device) + self.pointer) % self.size
        self.keys[slots] = keys[first:]
        self.labels[slots] = labels[first:]
        self.pointer.add_(n).remainder_(self.size)
        self.total_enqueued.add_(n)
