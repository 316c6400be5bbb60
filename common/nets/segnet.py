"""SegNet (Badrinarayanan, Kendall & Cipolla 2017): the 13 batch-normalised convolutions
of VGG-16 as the encoder, a mirrored decoder, and upsampling by max-unpooling with the
indices each encoder max-pool recorded (no learned upsampling). The input is zero-padded
to a multiple of 32 and the scores cropped back, so the output has the input's size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedpacs.common.nets import layers
from fedpacs.common.nets.vgg import conv_block, vgg16_stages

if TYPE_CHECKING:
    from fedpacs.common.tasks import TaskConfig

STRIDE = 32  # five 2x2 max-pools
# decoder stages, deepest first: output channels (multiples of the width) per convolution;
# the last convolution of the network maps to the classes (no norm, no ReLU)
DECODER = ((8, 8, 8), (8, 8, 4), (4, 4, 2), (2, 1), (1,))


class SegNet(nn.Module):
    """SegNet for 2D or 3D input; ``width`` is the encoder's first channel count (64)."""

    def __init__(self, *, spatial_dims: int = 2, in_channels: int = 3, num_classes: int = 12,
                 width: int = 64) -> None:
        super().__init__()
        layers.check_dims("SegNet", spatial_dims)
        d = spatial_dims
        self.encoder = nn.ModuleList(vgg16_stages(d, in_channels, width, batch_norm=True))
        self.pool = layers.max_pool(d)(2, 2, return_indices=True)
        self.unpool = layers.max_unpool(d)(2, 2)
        stages, cin = [], 8 * width
        for outs in DECODER:
            mods: list[nn.Module] = []
            for mult in outs:
                mods += conv_block(d, cin, mult * width, batch_norm=True)
                cin = mult * width
            stages.append(nn.Sequential(*mods))
        self.decoder = nn.ModuleList(stages)
        self.classifier = layers.conv(d)(cin, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[2:])
        h = layers.pad_to_multiple(x, STRIDE)
        indices, sizes = [], []
        for stage in self.encoder:
            h = stage(h)
            sizes.append(h.shape)
            h, idx = self.pool(h)
            indices.append(idx)
        for stage, idx, size in zip(self.decoder, reversed(indices), reversed(sizes),
                                    strict=True):
            h = stage(self.unpool(h, idx, output_size=size))
        return layers.crop_to(self.classifier(h), shape)


def task_kwargs(task: TaskConfig) -> dict[str, Any]:
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "num_classes": task.num_classes, "width": task.width}
