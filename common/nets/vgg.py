"""VGG-16 (Simonyan & Zisserman 2015, configuration D): thirteen 3x3 convolutions in five
stages of 64-128-256-512-512 channels, each stage closed by a 2x2 max-pool, and a
4096-4096 classifier. Batch norm is off by default, as published; at width 64, 3 channels,
1000 classes and 224x224 input the network has 138,357,544 parameters.

:func:`vgg16_stages` is also the encoder of FCN-8s and SegNet."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedpacs.common.nets import layers

if TYPE_CHECKING:
    from fedpacs.common.tasks import TaskConfig

# (channels as multiples of the width, convolutions) per stage
VGG16_STAGES = ((1, 2), (2, 2), (4, 3), (8, 3), (8, 3))
PUBLISHED_POOL = 7  # the classifier reads a 7x7 map of the 224x224 input


def conv_block(dims: int, cin: int, cout: int, *, batch_norm: bool) -> list[nn.Module]:
    """3x3 convolution (+ batch norm) + ReLU."""
    mods: list[nn.Module] = [layers.conv(dims)(cin, cout, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        mods.append(layers.batch_norm(dims)(cout))
    return [*mods, nn.ReLU(inplace=True)]


def vgg16_stages(dims: int, in_channels: int, width: int, *,
                 batch_norm: bool) -> list[nn.Sequential]:
    """The five convolution stages of VGG-16 (without their max-pools)."""
    stages, cin = [], in_channels
    for mult, n in VGG16_STAGES:
        mods: list[nn.Module] = []
        for _ in range(n):
            mods += conv_block(dims, cin, mult * width, batch_norm=batch_norm)
            cin = mult * width
        stages.append(nn.Sequential(*mods))
    return stages


def init_vgg(module: nn.Module) -> None:
    """torchvision's VGG initialisation (He-normal convolutions, N(0, 0.01) linear layers):
    the default initialisation leaves a 13-layer plain network's activations vanishing."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class VGG16(nn.Module):
    """VGG-16 for 2D or 3D input; ``width`` is the first stage's channel count (64).

    The max-pools round up (ceil mode: identical at 224x224), so inputs down to 1 voxel a
    side reach the classifier."""

    def __init__(self, *, spatial_dims: int = 2, in_channels: int = 3, num_classes: int = 1000,
                 width: int = 64, batch_norm: bool = False,
                 pool_size: int | list[int] = PUBLISHED_POOL, dropout: float = 0.5) -> None:
        super().__init__()
        layers.check_dims("VGG16", spatial_dims)
        pool = layers.max_pool(spatial_dims)
        self.features = nn.Sequential(*[
            m for stage in vgg16_stages(spatial_dims, in_channels, width, batch_norm=batch_norm)
            for m in (stage, pool(2, 2, ceil_mode=True))])
        self.avgpool = layers.adaptive_avg_pool(spatial_dims)(
            layers.as_sizes(pool_size, spatial_dims))
        hidden = 64 * width
        self.classifier = nn.Sequential(
            nn.Linear(8 * width * layers.num_cells(pool_size, spatial_dims), hidden),
            nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_vgg(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def task_kwargs(task: TaskConfig) -> dict[str, Any]:
    """The classifier's pool is the published 7 or, when smaller, the feature map itself
    (each side divided by 32, rounded up), so small inputs get no replicated cells."""
    sides = [math.ceil(s / 32) for s in task.input_shape]
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "num_classes": task.num_classes, "width": task.width, "batch_norm": False,
            "pool_size": [min(PUBLISHED_POOL, s) for s in sides]}
