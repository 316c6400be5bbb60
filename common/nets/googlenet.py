"""GoogLeNet (Szegedy et al. 2015, Inception v1) with its two auxiliary classifiers, in
torchvision's layout (batch-normalised convolutions; a 3x3 convolution in the "5x5"
branch, torchvision issue 906: ``paper_5x5=True`` builds the paper's 5x5). At width 64,
3 channels, 1000 classes and 224x224 input it has 6,624,904 parameters without the
auxiliary heads and 13,004,888 with them.

In training mode with ``aux_logits`` the forward returns :class:`GoogLeNetOutputs`
(main, aux1, aux2); in evaluation mode only the main logits. :func:`training_loss` is
the paper's training loss, main + 0.3 * (aux1 + aux2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from fedpacs.common.nets import layers

if TYPE_CHECKING:
    from fedpacs.common.tasks import TaskConfig

AUX_WEIGHT = 0.3  # the paper's weight of each auxiliary classifier's loss
AUX_POOL = 4  # the auxiliary heads read a 4x4 map (14x14 at 224x224, pooled 5x5/3)
# Inception modules as published: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNetOutputs(NamedTuple):
    """What GoogLeNet returns in training mode with its auxiliary classifiers on."""

    main: torch.Tensor
    aux1: torch.Tensor
    aux2: torch.Tensor


def training_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  out: torch.Tensor | GoogLeNetOutputs, y: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` of a model's training output: the loss of plain logits, or for
    GoogLeNet's auxiliary outputs main + 0.3 * (aux1 + aux2) (Szegedy 2015, section 5)."""
    if isinstance(out, GoogLeNetOutputs):
        return loss_fn(out.main, y) + AUX_WEIGHT * (loss_fn(out.aux1, y) + loss_fn(out.aux2, y))
    return loss_fn(out, y)


class BasicConv(nn.Sequential):
    """Convolution (no bias) + batch norm + ReLU."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__(layers.conv(dims)(cin, cout, kernel, stride=stride, padding=padding,
                                           bias=False),
                         layers.batch_norm(dims)(cout, eps=0.001), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-"5x5"; 3x3 max-pool-1x1), concatenated."""

    def __init__(self, dims: int, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int,
                 pool_proj: int, *, five: int) -> None:
        super().__init__()
        self.branch1 = BasicConv(dims, cin, c1, 1)
        self.branch2 = nn.Sequential(BasicConv(dims, cin, c3r, 1),
                                     BasicConv(dims, c3r, c3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv(dims, cin, c5r, 1),
                                     BasicConv(dims, c5r, c5, five, padding=five // 2))
        self.branch4 = nn.Sequential(layers.max_pool(dims)(3, 1, padding=1, ceil_mode=True),
                                     BasicConv(dims, cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """An auxiliary classifier: average pool, 1x1 convolution, two fully connected layers."""

    def __init__(self, dims: int, cin: int, num_classes: int, width: int,
                 dropout: float) -> None:
        super().__init__()
        self.pool = layers.adaptive_avg_pool(dims)(AUX_POOL)
        self.conv = BasicConv(dims, cin, 2 * width, 1)
        self.fc1 = nn.Linear(2 * width * AUX_POOL**dims, 16 * width)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


class GoogLeNet(nn.Module):
    """GoogLeNet for 2D or 3D input; ``width`` is the stem's channel count (64 published)
    and scales every Inception branch (``c * width // 64``, at least 1)."""

    def __init__(self, *, spatial_dims: int = 2, in_channels: int = 3, num_classes: int = 1000,
                 width: int = 64, aux_logits: bool = True, stem_stride: int = 2,
                 paper_5x5: bool = False, dropout: float = 0.2,
                 aux_dropout: float = 0.7) -> None:
        super().__init__()
        layers.check_dims("GoogLeNet", spatial_dims)
        d = spatial_dims
        pool = layers.max_pool(d)

        def ch(c: int) -> int:
            return max(1, c * width // 64)

        self.stem = nn.Sequential(
            BasicConv(d, in_channels, ch(64), 7, stride=stem_stride, padding=3),
            pool(3, 2, ceil_mode=True),
            BasicConv(d, ch(64), ch(64), 1), BasicConv(d, ch(64), ch(192), 3, padding=1),
            pool(3, 2, ceil_mode=True))
        cin = ch(192)
        blocks: dict[str, Inception] = {}
        for name, cfg in INCEPTION.items():
            blocks[name] = Inception(d, cin, *(ch(c) for c in cfg), five=5 if paper_5x5 else 3)
            cin = blocks[name].out_channels
        self.inception3 = nn.Sequential(blocks["3a"], blocks["3b"], pool(3, 2, ceil_mode=True))
        self.inception4a = blocks["4a"]
        self.inception4bcd = nn.Sequential(blocks["4b"], blocks["4c"], blocks["4d"])
        self.inception4e = nn.Sequential(blocks["4e"], pool(2, 2, ceil_mode=True))
        self.inception5 = nn.Sequential(blocks["5a"], blocks["5b"])
        self.aux1: InceptionAux | None = None
        self.aux2: InceptionAux | None = None
        if aux_logits:
            self.aux1 = InceptionAux(d, blocks["4a"].out_channels, num_classes, width,
                                     aux_dropout)
            self.aux2 = InceptionAux(d, blocks["4d"].out_channels, num_classes, width,
                                     aux_dropout)
        self.avgpool = layers.adaptive_avg_pool(d)(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d | nn.Conv3d | nn.Linear):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        x = self.inception4a(self.inception3(self.stem(x)))
        aux1 = self.aux1(x) if self.training and self.aux1 is not None else None
        x = self.inception4bcd(x)
        aux2 = self.aux2(x) if self.training and self.aux2 is not None else None
        x = self.inception5(self.inception4e(x))
        main = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if aux1 is not None and aux2 is not None:
            return GoogLeNetOutputs(main, aux1, aux2)
        return main


def feature_side(side: int, stem_stride: int) -> int:
    """Side of the last max-pool's output for an input side (0: too small)."""
    s = layers.pool_out(side, 7, stem_stride, 3)
    for _ in range(3):
        s = layers.pool_out(s, 3, 2, ceil=True)
    return layers.pool_out(s, 2, 2, ceil=True)


def task_kwargs(task: TaskConfig) -> dict[str, Any]:
    """The published stride-2 stem from 64 voxels a side up, a stride-1 stem below (a
    28x28 input then reaches the auxiliary heads at 4x4, their published pooled size).
    The auxiliary heads are on: a site trains with the paper's combined loss."""
    stride = 2 if min(task.input_shape) >= 64 else 1
    if min(feature_side(s, stride) for s in task.input_shape) < 1:
        raise layers.too_small("googlenet", task, lambda s: feature_side(s, 1) >= 1)
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "num_classes": task.num_classes, "width": task.width, "aux_logits": True,
            "stem_stride": stride}
