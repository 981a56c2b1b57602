"""The memory bank of KCL: a FIFO ring buffer of keys and their labels."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import _validation
from . import distributed as kdist


class MemoryBank(nn.Module):
    """A FIFO queue of `size` keys of dimension `dim` with their class labels: the `queue` and
    `queue_labels` of `kcl_ext.kpos_loss`.

    Slots never written are empty: zero keys labelled -1, which `kpos_loss` ignores entirely.
    `enqueue(keys, labels)` writes after the slot written last, wrapping around the end, so the
    bank always holds the `size` most recent keys. Under torch.distributed it first all-gathers
    keys and labels from every process (rank order), so all processes hold the same bank. The
    buffers are registered, so `.to(...)` moves them and `state_dict()` carries keys, labels and
    the write pointer.

    Args:
        size: number of slots Q, >= 1.
        dim: feature dimension D, >= 1.
        dtype: dtype of the keys (default: torch's default float dtype); give the features'
            dtype, e.g. torch.bfloat16 for a bfloat16 model outside autocast.
        device: device of the buffers (default: the CPU).

    Raises:
        ValueError: size or dim < 1, or a dtype that kpos_loss does not take.

    Enqueue the batch's keys once its loss is computed, so they are neither positives nor
    negatives of their own queries (as in the official code). Two orders work::

        # MoCo's order: enqueue inside the step, before backward(). Works when only the query
        # requires grad (key from the momentum encoder under no_grad, the queue a buffer).
        loss = kcl_ext.kpos_loss(q, k, bank.keys, y, bank.labels, k=6)
        bank.enqueue(k, y)
        loss.backward()

        # Always valid, also when key or queue require grad: enqueue after backward().
        loss = kcl_ext.kpos_loss(q, k, bank.keys, y, bank.labels, k=6)
        loss.backward()
        bank.enqueue(k, y)

    When the key or the queue requires grad and the bank is enqueued before backward(),
    backward raises a RuntimeError (in eager mode one that names this order; under
    torch.compile PyTorch's own "modified by an inplace operation").
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        """An empty bank of `size` slots of dimension `dim` (see the class docstring)."""
        super().__init__()
        for arg, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MemoryBank: {arg} must be an int >= 1, got "
                                f"{type(value).__name__} {value!r}")
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryBank: size and dim must be >= 1, got size={size}, dim={dim}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _validation.FEATURE_DTYPES:
            raise ValueError(f"MemoryBank: dtype must be one of float32, float16, bfloat16, "
                             f"float64 (the feature dtypes of kpos_loss), got {dtype}")
        self.register_buffer("keys", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int64, device=device))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("total_enqueued", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def size(self) -> int:
        """The number of slots Q."""
        return self.keys.size(0)

    @property
    def dim(self) -> int:
        """The feature dimension D."""
        return self.keys.size(1)

    @property
    def is_full(self) -> bool:
        """Whether every slot has been written (reads the counter: a host sync on a GPU)."""
        return int(self.total_enqueued) >= self.size

    def __len__(self) -> int:
        """The number of filled slots, at most `size` (reads the counter: a host sync on a GPU)."""
        return min(int(self.total_enqueued), self.size)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write a batch after the slot written last, wrapping around; the oldest entries go.

        Args:
            keys: [B, dim] floating features (detached and cast to the bank's dtype and device).
                When B > size only the newest `size` rows survive.
            labels: [B] integer class labels (any integer dtype; negative = an empty slot).

        Raises:
            TypeError: keys not a floating tensor, labels not an integer tensor (float labels
                are rejected, as kpos_loss rejects them, rather than truncated).
            ValueError: keys not [B, dim], labels not [B].

        No host synchronisation: the pointer stays on the device. Under torch.distributed the
        batch of every process is all-gathered first (rank order).
        """
        if not isinstance(keys, torch.Tensor) or not keys.dtype.is_floating_point:
            got = keys.dtype if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise TypeError(f"MemoryBank.enqueue: keys must be a floating tensor, got {got}")
        if keys.dim() != 2 or keys.size(1) != self.keys.size(1):
            raise ValueError(f"MemoryBank.enqueue: keys must be [B, {self.keys.size(1)}], "
                             f"got {list(keys.shape)}")
        if not isinstance(labels, torch.Tensor) or not _validation.is_integer_dtype(labels.dtype):
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError("MemoryBank.enqueue: labels must have an integer dtype "
                            f"(e.g. torch.int64), got {got}")
        if labels.shape != (keys.size(0),):
            raise ValueError(f"MemoryBank.enqueue: labels must be [{keys.size(0)}], "
                             f"got {list(labels.shape)}")
        device = self.keys.device
        keys = kdist.all_gather_cat(keys.detach().to(device=device, dtype=self.keys.dtype))
        labels = kdist.all_gather_cat(labels.detach().to(device=device, dtype=torch.int64))
        n = keys.size(0)
        # Entry t of the batch goes to slot (pointer + t) % size; when the batch is longer than
        # the bank, only its newest `size` entries survive, in the slots the full write would
        # give. The pointer stays on the device: no host synchronisation per step.
        first = max(0, n - self.size)
        slots = (torch.arange(first, n, device=device) + self.pointer) % self.size
        self.keys[slots] = keys[first:]
        self.labels[slots] = labels[first:]
        self.pointer.add_(n).remainder_(self.size)
        self.total_enqueued.add_(n)

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, filled={len(self)}, dtype={self.keys.dtype}, "
                f"device={self.keys.device}")
