"""FCN-8s (Long, Shelhamer & Darrell 2015): a VGG-16 encoder whose classifier becomes
convolutions (fc6 7x7, fc7 1x1, 4096 channels at width 64), class scores at 1/32, and
the skip fusion of the paper: scores upsampled 2x and added to pool4's scores, upsampled
2x and added to pool3's scores, upsampled 8x to the input.

Upsampling is learnable (transposed convolutions initialised bilinear, as published) or
fixed (bi/tri)linear interpolation. The input is zero-padded to a multiple of 32 and the
scores cropped back, so the output has the input's size exactly (the paper pads by 100
and crops). In 3D fc6 is 3x3x3: a 7x7x7 kernel would hold 7 times its 2D weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedpacs.common.nets import layers
from fedpacs.common.nets.vgg import init_vgg, vgg16_stages

if TYPE_CHECKING:
    from fedpacs.common.tasks import TaskConfig

Upsample = Literal["deconv", "interp"]
STRIDE = 32  # the encoder's total downsampling


def _bilinear_deconv(dims: int, channels: int, factor: int) -> nn.Module:
    """A transposed convolution that upsamples by ``factor``, initialised (bi/tri)linear."""
    up = layers.conv_transpose(dims)(channels, channels, 2 * factor, stride=factor,
                                     padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(layers.bilinear_kernel(channels, 2 * factor, dims))
    return up


class FCN8s(nn.Module):
    """FCN-8s for 2D or 3D input; ``width`` is the VGG-16 encoder's first channel count."""

    def __init__(self, *, spatial_dims: int = 2, in_channels: int = 3, num_classes: int = 21,
                 width: int = 64, fc_kernel: int = 7, upsample: Upsample = "deconv",
                 batch_norm: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        layers.check_dims("FCN8s", spatial_dims)
        if upsample not in ("deconv", "interp"):
            raise ValueError(f"FCN8s: upsample must be 'deconv' or 'interp', got {upsample!r}")
        d, c = spatial_dims, num_classes
        conv = layers.conv(d)
        self.stages = nn.ModuleList(vgg16_stages(d, in_channels, width, batch_norm=batch_norm))
        self.pool = layers.max_pool(d)(2, 2)
        fc = 64 * width
        self.fc = nn.Sequential(
            conv(8 * width, fc, fc_kernel, padding=fc_kernel // 2), nn.ReLU(inplace=True),
            nn.Dropout(dropout), conv(fc, fc, 1), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.score_fr = conv(fc, c, 1)
        self.score_pool4 = conv(8 * width, c, 1)
        self.score_pool3 = conv(4 * width, c, 1)
        init_vgg(self)  # (before the deconvolutions, which start out bilinear)
        deconv = upsample == "deconv"
        self.up2 = _bilinear_deconv(d, c, 2) if deconv else None
        self.up_pool4 = _bilinear_deconv(d, c, 2) if deconv else None
        self.up8 = _bilinear_deconv(d, c, 8) if deconv else None

    def _up(self, deconv: nn.Module | None, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if deconv is not None:
            return deconv(x)
        return F.interpolate(x, size=like.shape[2:], mode=layers.interp_mode(x.ndim - 2),
                             align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[2:])
        padded = layers.pad_to_multiple(x, STRIDE)
        h, pools = padded, []
        for stage in self.stages:
            h = self.pool(stage(h))
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]
        s4 = self.score_pool4(pool4)
        s = self._up(self.up2, self.score_fr(self.fc(h)), s4) + s4
        s3 = self.score_pool3(pool3)
        s = self._up(self.up_pool4, s, s3) + s3
        return layers.crop_to(self._up(self.up8, s, padded), shape)


def task_kwargs(task: TaskConfig) -> dict[str, Any]:
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "num_classes": task.num_classes, "width": task.width,
            "fc_kernel": 7 if task.spatial_dims == 2 else 3, "upsample": "deconv"}
