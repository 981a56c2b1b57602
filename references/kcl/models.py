"""The recipe's networks: backbones, the projection encoder that kcl_ext.KCL trains, the CE model.

- `build_backbone`: torchvision's ResNet-50 (the paper's recipe) or `SmallResNet` (28x28 images).
  A backbone maps images to a flat feature vector and exposes `feature_dim`.
- `ContrastiveEncoder`: backbone + projection (linear, or MLP when `mlp_head`) to features of
  `dim` (128); kcl_ext.KCL normalises them and makes the momentum key encoder and shuffle-BN.
- `SupervisedClassifier`: the cross-entropy baseline.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ConfigError

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
    """Backbone and projection head; `forward` returns features [N, dim] (KCL normalises them)."""

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
        return self.head(self.backbone(x))


class SupervisedClassifier(nn.Module):
    """The cross-entropy baseline of stage 1: backbone and a linear classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x))
