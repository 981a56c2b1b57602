"""Small torch.distributed helpers shared by the memory bank and the training harness; every one
is a no-op in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

# torch >= 2.12 names the single-tensor all-gather `all_gather_single` and warns on the old
# name; torch 2.11 only has `all_gather_into_tensor`. Both fill one preallocated output tensor.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation over processes (rank order) of equally shaped tensors along dim 0, in one
    collective into one preallocated tensor; no gradient."""
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((dist.get_world_size() * tensor.size(0), *tensor.shape[1:]))
    _gather_into(out, tensor)
    return out


def all_gather_padded(tensor: torch.Tensor, total: int) -> torch.Tensor:
    """The rows of a tensor sharded by `shard_range` over processes, gathered on every process.

    Shards are contiguous and all of size ceil(total / world) except the last non-empty one (and
    empty ones after it), so padding each to that size puts every padded row after the `total`
    real ones: one all-gather, then the first `total` rows."""
    world = world_size()
    if world == 1:
        return tensor
    per = -(-total // world)
    padded = tensor.new_zeros((per, *tensor.shape[1:]))
    padded[:tensor.size(0)] = tensor
    return all_gather_cat(padded)[:total]


def shard_range(total: int, rank_: int, world: int) -> tuple[int, int]:
    """[start, stop) of the contiguous share of `total` items that process `rank_` handles."""
    per = -(-total // world)
    start = min(total, rank_ * per)
    return start, min(total, start + per)


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def average_in_place(tensors) -> None:
    """Replaces each tensor by its mean over processes: one all-reduce of their concatenation."""
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(device_type: str) -> bool:
    """Joins the process group that torchrun describes in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True
