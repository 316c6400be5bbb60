"""PSPNet (Zhao et al. 2017): a dilated ResNet backbone (output stride 8: the last two
stages trade their stride for dilation 2 and 4) and the pyramid pooling module: the
features average-pooled to 1, 2, 3 and 6 bins a side, each reduced by a 1x1 convolution
to a quarter of the channels, upsampled back and concatenated with the features; a 3x3
convolution and a 1x1 classifier follow, and the scores are interpolated to the input's
size. The backbone is ResNet-18-like (basic blocks 2-2-2-2; the paper used ResNet-50/101)
and the paper's auxiliary loss on stage 3 is not built.

The pyramid branches have no batch norm: the 1-bin branch is a single voxel, whose batch
statistics are undefined for a batch of one (a site's last batch may be one sample)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedpacs.common.nets import layers

if TYPE_CHECKING:
    from fedpacs.common.tasks import TaskConfig

BINS = (1, 2, 3, 6)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, dims: int, cin: int, cout: int, *, stride: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        conv, norm = layers.conv(dims), layers.batch_norm(dims)
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation,
                          bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False),
                                          norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class PyramidPooling(nn.Module):
    """Pool to each bin size, 1x1-reduce to ``channels // len(bins)``, upsample, concat."""

    def __init__(self, dims: int, channels: int, bins: tuple[int, ...] = BINS) -> None:
        super().__init__()
        reduced = max(1, channels // len(bins))
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(layers.adaptive_avg_pool(dims)(b),
                          layers.conv(dims)(channels, reduced, 1), nn.ReLU(inplace=True))
            for b in bins)
        self.out_channels = channels + reduced * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, mode = x.shape[2:], layers.interp_mode(x.ndim - 2)
        return torch.cat([x, *(F.interpolate(b(x), size=size, mode=mode, align_corners=False)
                               for b in self.branches)], 1)


class PSPNet(nn.Module):
    """PSPNet for 2D or 3D input; ``width`` is the backbone's stem channel count (64)."""

    def __init__(self, *, spatial_dims: int = 2, in_channels: int = 3, num_classes: int = 21,
                 width: int = 64, blocks: tuple[int, ...] | list[int] = (2, 2, 2, 2),
                 bins: tuple[int, ...] | list[int] = BINS, dropout: float = 0.1) -> None:
        super().__init__()
        layers.check_dims("PSPNet", spatial_dims)
        d = spatial_dims
        conv, norm = layers.conv(d), layers.batch_norm(d)
        self.stem = nn.Sequential(conv(in_channels, width, 7, stride=2, padding=3, bias=False),
                                  norm(width), nn.ReLU(inplace=True),
                                  layers.max_pool(d)(3, 2, padding=1))
        stages, cin = [], width
        # (channels, stride, dilation): output stride 8, then dilation instead of stride
        for (mult, stride, dilation), n in zip(((1, 1, 1), (2, 2, 1), (4, 1, 2), (8, 1, 4)),
                                               blocks, strict=True):
            stage = [BasicBlock(d, cin, mult * width, stride=stride, dilation=dilation)]
            stage += [BasicBlock(d, mult * width, mult * width, dilation=dilation)
                      for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            cin = mult * width
        self.backbone = nn.Sequential(*stages)
        self.ppm = PyramidPooling(d, cin, tuple(bins))
        self.head = nn.Sequential(conv(self.ppm.out_channels, 2 * width, 3, padding=1, bias=False),
                                  norm(2 * width), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  conv(2 * width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.head(self.ppm(self.backbone(self.stem(x))))
        return F.interpolate(scores, size=x.shape[2:], mode=layers.interp_mode(x.ndim - 2),
                             align_corners=False)


def task_kwargs(task: TaskConfig) -> dict[str, Any]:
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "num_classes": task.num_classes, "width": task.width, "blocks": [2, 2, 2, 2],
            "bins": list(BINS)}
