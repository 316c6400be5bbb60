"""Layer helpers shared by the network families: 2D/3D layer classes, output-size
arithmetic, padding to a stride multiple and cropping back, bilinear upsampling kernels."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedpacs.common.errors import ConfigError, FieldError

if TYPE_CHECKING:
    from fedpacs.common.tasks import TaskConfig

DIMS = (2, 3)
# 2D/3D layer classes by spatial dims (plain torch: importing the registry stays as light
# as torch itself; MONAI's factories would load MONAI for every config check)
_CONV: dict[int, Any] = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T: dict[int, Any] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM: dict[int, Any] = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAX_POOL: dict[int, Any] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_MAX_UNPOOL: dict[int, Any] = {2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}
_ADAPTIVE_AVG: dict[int, Any] = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def conv(dims: int) -> Any:
    """Conv2d or Conv3d."""
    return _CONV[dims]


def conv_transpose(dims: int) -> Any:
    return _CONV_T[dims]


def batch_norm(dims: int) -> Any:
    return _BATCH_NORM[dims]


def max_pool(dims: int) -> Any:
    return _MAX_POOL[dims]


def max_unpool(dims: int) -> Any:
    return _MAX_UNPOOL[dims]


def adaptive_avg_pool(dims: int) -> Any:
    return _ADAPTIVE_AVG[dims]


def interp_mode(dims: int) -> str:
    """The (bi/tri)linear interpolation mode of F.interpolate for ``dims``."""
    return "bilinear" if dims == 2 else "trilinear"


def check_dims(name: str, spatial_dims: int) -> None:
    if spatial_dims not in DIMS:
        raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims}")


def pool_out(side: int, kernel: int, stride: int, padding: int = 0, *, ceil: bool = False) -> int:
    """Output side of a conv/pool layer (0 when the input is too small for it), with
    PyTorch's rule that a ceil-mode window must start inside the (left-padded) input."""
    numerator = side + 2 * padding - kernel + (stride - 1 if ceil else 0)
    if numerator < 0:
        return 0
    out = numerator // stride + 1
    if ceil and (out - 1) * stride >= side + padding:
        out -= 1
    return out


def too_small(network: str, task: TaskConfig, fits: Callable[[int], bool]) -> ConfigError:
    """The error for an input too small for ``network``'s downsampling; ``fits(side)``
    says whether a side is large enough."""
    minimum = next(s for s in range(1, 1 << 16) if fits(s))
    return ConfigError("task", [FieldError(
        "task.input_shape", f"every side at least {minimum} for {network}",
        repr(list(task.input_shape)), "use a larger input_shape or another network")])


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the spatial sides of ``x`` (at their ends) up to multiples of ``multiple``."""
    pads: list[int] = []
    for side in reversed(x.shape[2:]):
        pads += [0, -side % multiple]
    return F.pad(x, pads) if any(pads) else x


def crop_to(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The leading ``shape`` corner of ``x``'s spatial sides (undoes :func:`pad_to_multiple`)."""
    return x[(slice(None), slice(None), *(slice(0, s) for s in shape))]


def bilinear_kernel(channels: int, kernel: int, dims: int) -> torch.Tensor:
    """Transposed-convolution weights (channels, channels, kernel^dims) that upsample each
    channel (bi/tri)linearly, as FCN initialises its deconvolutions."""
    factor = (kernel + 1) // 2
    centre = factor - 1 if kernel % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(kernel, dtype=torch.float32) - centre).abs() / factor
    k = ramp
    for _ in range(dims - 1):
        k = k.unsqueeze(-1) * ramp
    w = torch.zeros(channels, channels, *(kernel,) * dims)
    for c in range(channels):
        w[c, c] = k
    return w


def as_sizes(size: int | list[int] | tuple[int, ...], dims: int) -> tuple[int, ...]:
    """``size`` per spatial axis."""
    return (size,) * dims if isinstance(size, int) else tuple(size)


def num_cells(size: int | list[int] | tuple[int, ...], dims: int) -> int:
    return math.prod(as_sizes(size, dims))
