"""AlexNet (Krizhevsky, Sutskever & Hinton 2012), in torchvision's single-tower layout
(Krizhevsky 2014, "One weird trick"): 64-192-384-256-256 convolutions, no local response
normalisation, an adaptive average pool and a 4096-4096 classifier. At width 64, 3
channels, 1000 classes and 224x224 input it has 61,100,840 parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedpacs.common.nets import layers

if TYPE_CHECKING:
    from fedpacs.common.tasks import TaskConfig

PUBLISHED_POOL = 6  # the classifier reads a 6x6 map of the 224x224 input


class AlexNet(nn.Module):
    """AlexNet for 2D or 3D input; ``width`` is conv1's channel count (64 published)."""

    def __init__(self, *, spatial_dims: int = 2, in_channels: int = 3, num_classes: int = 1000,
                 width: int = 64, stem_stride: int = 4,
                 pool_size: int | list[int] = PUBLISHED_POOL, dropout: float = 0.5) -> None:
        super().__init__()
        layers.check_dims("AlexNet", spatial_dims)
        conv, pool = layers.conv(spatial_dims), layers.max_pool(spatial_dims)
        w = width
        self.features = nn.Sequential(
            conv(in_channels, w, 11, stride=stem_stride, padding=2), nn.ReLU(inplace=True),
            pool(3, 2),
            conv(w, 3 * w, 5, padding=2), nn.ReLU(inplace=True), pool(3, 2),
            conv(3 * w, 6 * w, 3, padding=1), nn.ReLU(inplace=True),
            conv(6 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True),
            conv(4 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True), pool(3, 2),
        )
        self.avgpool = layers.adaptive_avg_pool(spatial_dims)(
            layers.as_sizes(pool_size, spatial_dims))
        hidden = 64 * w
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(4 * w * layers.num_cells(pool_size, spatial_dims),
                                           hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def feature_side(side: int, stem_stride: int) -> int:
    """Side of the last max-pool's output for an input side (0: too small)."""
    s = layers.pool_out(side, 11, stem_stride, 2)
    for _ in range(3):  # the 5x5/3x3 convolutions keep the side; each max-pool halves it
        s = layers.pool_out(s, 3, 2)
    return s


def task_kwargs(task: TaskConfig) -> dict[str, Any]:
    """The published stride-4 stem from 64 voxels a side up, a stride-1 stem below (as the
    registry's ResNets drop their stem pooling); the classifier's pool is the published
    6 or, when smaller, the feature map itself (no replicated cells in the first layer)."""
    stride = 4 if min(task.input_shape) >= 64 else 1
    sides = [feature_side(s, stride) for s in task.input_shape]
    if min(sides) < 1:
        raise layers.too_small("alexnet", task, lambda s: feature_side(s, 1) >= 1)
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "num_classes": task.num_classes, "width": task.width, "stem_stride": stride,
            "pool_size": [min(PUBLISHED_POOL, s) for s in sides]}
