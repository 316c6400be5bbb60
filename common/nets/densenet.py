"""DenseNet-121 (Huang et al. 2017), MONAI's implementation, with a stem for small inputs.

The published stem (7x7 convolution at stride 2, then a stride-2 max pool) and the three
transitions divide each side by 32: a 28x28 MedMNIST image would be gone before the last
dense block. For inputs under 64 per side the stem is a 3x3 convolution at stride 1 with no
max pool (the CIFAR variant of the paper, and the rule the registry's ResNets follow), so
28x28 ends the last block at 3x3. At 64 and above it is MONAI's network unchanged: with
3 channels, 1000 classes, 64 initial features and growth 32 it has the published
7,978,856 parameters."""

from __future__ import annotations

from typing import Any

from monai.networks.layers.factories import Conv
from monai.networks.nets import densenet
from torch import nn


class DenseNet121(densenet.DenseNet121):
    def __init__(self, *, small_input: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if small_input:
            conv = Conv[Conv.CONV, kwargs["spatial_dims"]]
            stem = conv(kwargs["in_channels"], kwargs.get("init_features", 64), kernel_size=3,
                        stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(stem.weight)
            self.features.conv0 = stem
            self.features.pool0 = nn.Identity()
