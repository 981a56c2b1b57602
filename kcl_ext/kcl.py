"""KCL as one module: query encoder, momentum key encoder, shuffle-BN, the labelled bank, the loss.

    model = kcl_ext.KCL(my_encoder, dim=128, k=6, queue_size=65536)
    loss = model(view_q, view_k, labels)   # one training step's loss; the bank is updated
    loss.backward(); optimizer.step()      # optimizer over model.query_encoder.parameters()

`k=0` is MoCo (InfoNCE with the queue as negatives), `k=-1` is FCL (every same-class bank entry is
a positive). Under torch.distributed, wrap the module in DistributedDataParallel: the bank gathers
the keys of every process and shuffle-BN permutes the key batch across processes.

Also here: `SplitBatchNorm2d` / `use_split_batch_norm`, BatchNorm whose training statistics come
from groups of the batch, which gives shuffle-BN its groups within one process.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import _backend_choice, _validation
from . import distributed as kdist
from .memory_bank import MemoryBank
from .ops import kpos_loss


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def batch_norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running means and variances of every BatchNorm layer of `module`."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [m.running_mean, m.running_var]
    return out


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics come from `splits` contiguous groups of the
    batch (images [0, n/splits) form group 0, and so on), as `splits` GPUs with plain BN would
    compute them. The running statistics move towards the mean of the groups' statistics. In
    eval mode, or with splits = 1, it is BatchNorm2d; the state dict is BatchNorm2d's.

    This is the one-process counterpart of shuffle-BN (MoCo's one-GPU demo does the same): with
    the key batch permuted before the key encoder, a key's statistics come from another group
    than its query's.
    """

    def __init__(self, num_features: int, splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if splits < 1:
            raise ValueError(f"SplitBatchNorm2d: splits must be >= 1, got {splits}")
        if self.momentum is None:
            raise ValueError("SplitBatchNorm2d: momentum=None (cumulative average) is not "
                             "supported; give a float momentum")
        self.splits = int(splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        if x.size(0) % self.splits:
            raise ValueError(f"SplitBatchNorm2d: a batch of {x.size(0)} images does not split "
                             f"into {self.splits} equal BN groups")
        outs, means, variances = [], [], []
        for chunk in x.chunk(self.splits):
            # Each group updates its own copy of the running statistics; their mean is the
            # update with the mean of the groups' statistics (the update is linear in them).
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True,
                                     self.momentum, self.eps))
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(outs)


def use_split_batch_norm(module: nn.Module, splits: int) -> nn.Module:
    """Replaces every BatchNorm2d of `module` (in place) by a SplitBatchNorm2d with `splits`
    groups, keeping its parameters and running statistics; returns `module`."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, splits, eps=child.eps,
                                     momentum=child.momentum, affine=child.affine,
                                     track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.weight.device if child.affine else
                                          child.running_mean.device))
        elif isinstance(child, SplitBatchNorm2d):
            child.splits = int(splits)
        else:
            use_split_batch_norm(child, splits)
    return module


def batch_norm_groups(module: nn.Module) -> int:
    """The number of BN groups a training-mode forward of `module` forms in one process."""
    for m in module.modules():
        if isinstance(m, SplitBatchNorm2d):
            return m.splits
    return 1


class KCL(nn.Module):
    """k-positive contrastive learning (Kang et al., ICLR 2021) as one module.

    Args:
        encoder: maps a batch of images to [N, dim] features (backbone and projection head); the
            module normalises them. It becomes the query encoder; a copy, the key encoder, gets no
            gradients and follows it by `key <- m * key + (1 - m) * query` after every step.
        dim: the feature dimension of `encoder`.
        k: positives drawn from the bank per query (0: MoCo, -1: every same-class entry, FCL).
        temperature: softmax temperature: a positive float, or a 0-d tensor (a
            `torch.nn.Parameter` is learned with the encoder).
        queue_size: bank entries (keys with their labels, first in first out).
        momentum: m of the key encoder's update, in [0, 1].
        shuffle_bn: permute the key batch over the BN groups (processes, and split-BN groups
            within a process) so that a key is not normalised with its own query.
        bn_splits: BN groups in each process's batch (>= 2 turns every BatchNorm2d of the
            encoder into a SplitBatchNorm2d).
        backend: the kpos_loss backend ("auto", "cpu", "cuda", "triton", "reference").

    `forward(view_q, view_k, labels)` returns the loss of one training step: the query features
    of view_q (with gradients), the momentum update and the keys of view_k (no gradients), the
    loss against the bank, and then the keys enqueued (so that a batch is never its own bank).
    """

    def __init__(self, encoder: nn.Module, dim: int, *, k: int = 6,
                 temperature: float | torch.Tensor = 0.07,
                 queue_size: int = 65536, momentum: float = 0.999, shuffle_bn: bool = True,
                 bn_splits: int = 1, backend: str = "auto"):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"KCL: encoder must be an nn.Module, got {type(encoder).__name__}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"KCL: momentum must be in [0, 1], got {momentum}")
        # The loss's own checks, so that a bad value fails here with kpos_loss's message.
        k = _validation.check_k(k, "KCL")
        temperature = _validation.check_temperature(temperature, "KCL", allow_tensor=True)
        _backend_choice.check_name(backend, "KCL")
        if bn_splits < 1:
            raise ValueError(f"KCL: bn_splits must be >= 1, got {bn_splits}")
        if bn_splits > 1:
            use_split_batch_norm(encoder, bn_splits)
        self.query_encoder = encoder
        self.key_encoder = copy.deepcopy(encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.bank = MemoryBank(queue_size, dim)
        self.k, self.temperature, self.momentum, self.backend = k, temperature, momentum, backend
        self.shuffle_bn = shuffle_bn and has_batch_norm(encoder)

    def extra_repr(self) -> str:
        return (f"k={self.k}, temperature={self.temperature}, momentum={self.momentum}, "
                f"shuffle_bn={self.shuffle_bn}, backend={self.backend!r}")

    def encode_queries(self, images: torch.Tensor) -> torch.Tensor:
        # Normalised in float32: under autocast the loss still sees float32 unit vectors.
        return F.normalize(self.query_encoder(images).float(), dim=1)

    @torch.no_grad()
    def momentum_update(self) -> None:
        keys = list(self.key_encoder.parameters())
        queries = [p.detach() for p in self.query_encoder.parameters()]
        torch._foreach_mul_(keys, self.momentum)
        torch._foreach_add_(keys, queries, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Normalised keys of the local batch, with shuffle-BN when there are several BN groups;
        `generator` (in the same state on every process) draws the shuffle."""
        return F.normalize(self._shuffled_key_encoder(images, generator).float(), dim=1)

    def _shuffled_key_encoder(self, images, generator):
        world = kdist.world_size()
        if not self.shuffle_bn or world * batch_norm_groups(self.key_encoder) == 1:
            return self.key_encoder(images)
        everything = kdist.all_gather_cat(images)
        # The permutation is drawn on the CPU by a generator every process advances identically;
        # on CUDA it goes through pinned memory, so the copy does not wait for the GPU.
        perm = torch.randperm(everything.size(0), generator=generator)
        if images.device.type == "cuda":
            perm = perm.pin_memory()
        perm = perm.to(images.device, non_blocking=True)
        if world == 1:
            keys = self.key_encoder(everything[perm])
        else:
            local = everything[perm].chunk(world)[dist.get_rank()]
            keys = kdist.all_gather_cat(self.key_encoder(local))
        unshuffled = torch.empty_like(keys)
        unshuffled[perm] = keys
        return unshuffled.chunk(world)[kdist.rank()]

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor, labels: torch.Tensor, *,
                seed: int | None = None,
                shuffle_generator: torch.Generator | None = None) -> torch.Tensor:
        """The loss of one step. `seed` keys the draw of the positives (None: drawn from torch's
        default generator); `shuffle_generator` the shuffle-BN permutation (None: the default
        generator, which then must be in the same state on every process)."""
        if labels.dim() != 1 or labels.size(0) != view_q.size(0):
            raise ValueError(f"KCL: labels must be [N] with N = view_q.size(0) = "
                             f"{view_q.size(0)}, got {list(labels.shape)}")
        query = self.encode_queries(view_q)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            keys = self.encode_keys(view_k, shuffle_generator)
        # The enqueue below writes into the bank in place before the caller's backward: only the
        # query needs a gradient here (keys and bank carry none), and then the loss's backward
        # keeps per-row state only, so the bank needs no copy (MoCo clones its queue instead).
        with torch.autocast(query.device.type, enabled=False):
            loss = kpos_loss(query, keys, self.bank.keys, labels, self.bank.labels, k=self.k,
                             temperature=self.temperature, seed=seed, backend=self.backend)
        if self.training:
            self.bank.enqueue(keys, labels)
        return loss
