"""Encoders of the training harness: backbones, the MoCo-style query/key pair and the classifiers.

- `build_backbone`: torchvision's ResNet-50 (the paper's recipe) or `SmallResNet` (28x28 images).
  A backbone maps images to a flat feature vector and exposes `feature_dim`.
- `ContrastiveEncoder`: backbone + projection (linear, or MLP when `mlp_head`) to unit-norm
  features of `dim` (128).
- `SplitBatchNorm2d` / `use_split_batch_norm`: BatchNorm whose training-mode statistics come from
  contiguous groups of the batch, as if the batch were spread over that many GPUs.
- `MomentumPair`: the query encoder and its momentum copy, the key encoder (m = 0.999), with
  shuffle-BN of the key batch: across processes under torch.distributed, across the split-BN
  groups within a process.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as kdist
from .errors import ConfigError

NORMS = ("bn", "gn", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # Per-sample statistics: a batch split across processes changes nothing (see the DDP test).
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm must be one of {NORMS}, got {kind!r}")


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                _norm(norm, out_channels))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for small grey or colour images (28x28 Fashion-MNIST).

    A 3x3 stem (stride `stem_stride`: 2 halves the resolution and quarters the cost, which is
    what lets the Fashion-MNIST demo train on two CPU cores), then three stages of `blocks` basic
    blocks with `width`, 2*`width`, 4*`width` channels (strides 1, 2, 2) and global average
    pooling; `feature_dim` = 4*`width`.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, blocks: int = 1, norm: str = "bn",
                 stem_stride: int = 1):
        super().__init__()
        if width < 1 or blocks < 1 or stem_stride < 1:
            raise ConfigError(f"SmallResNet: width, blocks and stem_stride must be >= 1, got "
                             f"{width}, {blocks}, {stem_stride}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
                                  _norm(norm, width), nn.ReLU(inplace=True))
        layers, channels = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out_channels = width * 2**stage
            for b in range(blocks):
                layers.append(_BasicBlock(channels, out_channels, stride if b == 0 else 1, norm))
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.feature_dim = channels

    def forward(self, x):
        x = self.layers(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class _TorchvisionBackbone(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x):
        return self.net(x)


def build_backbone(arch: str, in_channels: int = 3, width: int = 16, blocks: int = 1,
                   norm: str = "bn", stem_stride: int = 1) -> nn.Module:
    """`arch` is "small_resnet" or a torchvision ResNet name ("resnet50", "resnet18", ...)."""
    if arch == "small_resnet":
        return SmallResNet(in_channels, width, blocks, norm, stem_stride)
    import torchvision
    if not arch.startswith("resnet") or not hasattr(torchvision.models, arch):
        raise ConfigError(f"model.arch must be 'small_resnet' or a torchvision ResNet name such "
                          f"as 'resnet50', got {arch!r}")
    if norm != "bn":
        raise ConfigError(f"model.norm must be 'bn' for torchvision backbones, got {norm!r}")
    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return _TorchvisionBackbone(net)


class ContrastiveEncoder(nn.Module):
    """Backbone and projection head; `forward` returns unit-norm features [N, dim]."""

    def __init__(self, backbone: nn.Module, dim: int = 128, mlp_head: bool = False):
        super().__init__()
        self.backbone = backbone
        width = backbone.feature_dim
        if mlp_head:
            self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True),
                                      nn.Linear(width, dim))
        else:
            self.head = nn.Linear(width, dim)

    def forward(self, x):
        # Normalise in float32: under bf16 autocast the loss still sees float32 unit vectors.
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


class SupervisedClassifier(nn.Module):
    """The cross-entropy baseline of stage 1: backbone and a linear classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


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
            raise ConfigError(f"SplitBatchNorm2d: splits must be >= 1, got {splits}")
        if self.momentum is None:
            raise ConfigError("SplitBatchNorm2d: momentum=None (cumulative average) is not "
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


class MomentumPair(nn.Module):
    """Query encoder and momentum key encoder (MoCo).

    The key encoder starts as a copy of the query encoder, gets no gradients, and follows it by
    `key <- m * key + (1 - m) * query` after every optimiser step.

    Shuffle-BN (with BatchNorm in the encoder and more than one BN group per global batch): the
    global key batch is permuted by a permutation that every process draws identically, encoded
    group by group, and un-permuted, so that the BN statistics of a key do not come from the
    group holding its query (MoCo's guard against the batch-statistics shortcut). The groups are
    the processes under torch.distributed and, within a process, the groups of its split-BN
    layers; a run with G groups in one process and the same run over G processes encode the
    same images with the same statistics.
    """

    def __init__(self, encoder: ContrastiveEncoder, momentum: float = 0.999,
                 shuffle_bn: bool = True):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"model.momentum must be in [0, 1], got {momentum}")
        self.query_encoder = encoder
        self.key_encoder = copy.deepcopy(encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.shuffle_bn = shuffle_bn and has_batch_norm(encoder)

    @torch.no_grad()
    def momentum_update(self):
        keys = list(self.key_encoder.parameters())
        queries = [p.detach() for p in self.query_encoder.parameters()]
        torch._foreach_mul_(keys, self.momentum)
        torch._foreach_add_(keys, queries, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Keys of the local batch; `generator` (same state on every process) draws the shuffle."""
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
            rank = dist.get_rank()
            local = everything[perm].chunk(world)[rank]
            keys = kdist.all_gather_cat(self.key_encoder(local))
        unshuffled = torch.empty_like(keys)
        unshuffled[perm] = keys
        return unshuffled.chunk(world)[kdist.rank()]
