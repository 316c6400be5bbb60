"""Training-time data augmentation: MONAI dictionary transforms, seeded per sample.

Array core, dict adapter: MONAI's dictionary transforms are the adapter that maps one
random draw over the keys of a sample, ``{"image": x}`` for classification and
``{"image": x, "label": y}`` for segmentation. Every spatial transform (flip, rotate,
scale, elastic) moves image and mask with the same draw, the mask by nearest-neighbour
interpolation so it keeps its integer classes; the intensity transforms touch the image
only. Augmentation is applied to a site's training split only (:func:`augmented`).

Seeding: sample ``i`` of epoch ``e`` of a call seeded ``seed`` is augmented with a random
state derived from ``(seed, e, i)`` alone (:func:`sample_seed`), so the same seed gives the
same augmented samples whatever the order in which DataLoader workers ask for them.

The augmentations and their parameters (each drawn with probability ``prob``, 0.5):

- ``flip``: a flip along each spatial axis.
- ``rotate``: 2D in-plane up to +-15 degrees; 3D up to +-10 degrees about each axis.
- ``scale``: each axis scaled by 0.9..1.1 about the centre (an affine resampling, the
  input's size kept, edges replicated).
- ``elastic``: 2D a random grid of control points every quarter of each side, displaced
  with magnitude 1..2 (MONAI ``Rand2DElasticd``; 1-2 pixels on average); 3D a dense
  random field smoothed with a Gaussian of sigma 4..5 voxels, magnitude 40..100
  (``Rand3DElasticd``): about 1 voxel mean and up to 4 voxels largest displacement.
  Cost on CPU, measured with ``python -m fedpacs.common.augment`` on the 2-core
  development machine (under another job's load), one torch thread as in a DataLoader
  worker: the hippocampus volume (48x64x48, image and mask) 0.09 s per sample (0.04 s on
  two idle cores), every augmentation together 0.12 s (a flip alone: 0.003 s); a 48x64
  slice 0.003 s.
- ``intensity``: shift by +-0.1, scale by 1+-0.1, Gaussian noise (std up to 0.05) and a
  gamma (contrast) change 0.7..1.5, on the image only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from fedpacs.common.recipe import AUGMENTATIONS, Recipe
from fedpacs.common.tasks import TaskConfig

IMAGE, LABEL = "image", "label"
SPATIAL = ("flip", "rotate", "scale", "elastic")  # move image and mask together
PROB = 0.5  # each augmentation is drawn for a sample with this probability
ROTATE_2D = math.radians(15)
ROTATE_3D = math.radians(10)
SCALE = 0.1  # each axis scaled by 1 +- up to 10%
ELASTIC_2D_MAGNITUDE = (1.0, 2.0)
ELASTIC_3D_SIGMA = (4.0, 5.0)
ELASTIC_3D_MAGNITUDE = (40.0, 100.0)


def _spatial(name: str, task: TaskConfig, keys: tuple[str, ...], prob: float) -> list[Any]:
    seg = len(keys) == 2
    grid_mode = ("bilinear", "nearest") if seg else "bilinear"
    if name == "flip":
        return [RandFlipd(keys, prob=prob, spatial_axis=a) for a in range(task.spatial_dims)]
    if name == "rotate":
        angle = ROTATE_2D if task.spatial_dims == 2 else ROTATE_3D
        other = 0.0 if task.spatial_dims == 2 else angle  # 2D: in-plane only
        return [RandRotated(keys, range_x=angle, range_y=other, range_z=other, prob=prob,
                            keep_size=True, mode=grid_mode, padding_mode="border")]
    if name == "scale":  # an affine resampling: exact for small images, unlike a resize
        return [RandAffined(keys, prob=prob, scale_range=(SCALE,) * task.spatial_dims,
                            mode=grid_mode, padding_mode="border")]
    # elastic
    if task.spatial_dims == 2:
        spacing = tuple(max(4, s // 4) for s in task.input_shape)
        return [Rand2DElasticd(keys, spacing=spacing, magnitude_range=ELASTIC_2D_MAGNITUDE,
                               prob=prob, mode=grid_mode, padding_mode="border")]
    return [Rand3DElasticd(keys, sigma_range=ELASTIC_3D_SIGMA,
                           magnitude_range=ELASTIC_3D_MAGNITUDE, prob=prob, mode=grid_mode,
                           padding_mode="border")]


def _intensity(prob: float) -> list[Any]:
    return [RandShiftIntensityd(IMAGE, offsets=0.1, prob=prob),
            RandScaleIntensityd(IMAGE, factors=0.1, prob=prob),
            RandAdjustContrastd(IMAGE, gamma=(0.7, 1.5), prob=prob),
            RandGaussianNoised(IMAGE, std=0.05, prob=prob)]


def build_transform(task: TaskConfig, augmentations: Sequence[str], *,
                    prob: float = PROB) -> Compose:
    """One MONAI Compose of the named augmentations, in the fixed order of
    :data:`fedpacs.common.recipe.AUGMENTATIONS` (spatial first, then intensity) whatever
    the order they are named in; spatial transforms act on image and label for
    segmentation, on the image alone for classification."""
    unknown = sorted(set(augmentations) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; known: {AUGMENTATIONS}")
    keys = (IMAGE, LABEL) if task.kind == "segmentation" else (IMAGE,)
    parts: list[Any] = []
    for name in AUGMENTATIONS:
        if name in augmentations:
            parts += _intensity(prob) if name == "intensity" else _spatial(name, task, keys, prob)
    return Compose(parts)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The random state of one sample: a function of (seed, epoch, index) only."""
    words = [seed & (2**64 - 1), epoch & (2**64 - 1), index & (2**64 - 1)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def augment_sample(transform: Callable[[dict[str, Any]], Any] | Compose, x: torch.Tensor,
                   y: torch.Tensor, *, segmentation: bool, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` through ``transform`` with its random state set from ``seed``: a float
    image of the input's shape and, for segmentation, an integer mask of the same classes
    (a classification label is returned unchanged)."""
    if isinstance(transform, Compose):
        transform.set_random_state(seed=seed)
    sample: dict[str, Any] = {IMAGE: x.clone()}
    if segmentation:
        sample[LABEL] = y
    out = transform(sample)
    image = convert_to_tensor(out[IMAGE], track_meta=False, dtype=x.dtype)
    if not segmentation:
        return image.contiguous(), y
    label = convert_to_tensor(out[LABEL], track_meta=False)
    return image.contiguous(), torch.round(label).to(y.dtype).contiguous()


class AugmentedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``base`` with every sample augmented, seeded by (seed, epoch, index).

    Not thread-safe (the transform's random state is reset for each sample); DataLoader
    worker processes each hold their own copy."""

    def __init__(self, base: Dataset[Any], task: TaskConfig, augmentations: Sequence[str], *,
                 seed: int, epoch: int = 0, prob: float = PROB) -> None:
        self.base = base
        self.task = task
        self.augmentations = tuple(augmentations)
        self.seed = seed
        self.epoch = epoch
        self.prob = prob
        self.transform = build_transform(task, self.augmentations, prob=prob)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[index]
        return augment_sample(self.transform, x, y, segmentation=self.task.kind ==
                              "segmentation", seed=sample_seed(self.seed, self.epoch, index))

    def at_epoch(self, epoch: int) -> AugmentedDataset:
        """The same data and augmentations, drawn afresh for ``epoch``."""
        return AugmentedDataset(self.base, self.task, self.augmentations, seed=self.seed,
                                epoch=epoch, prob=self.prob)


def augmented(dataset: Dataset[Any], task: TaskConfig, recipe: Recipe, seed: int, *,
              epoch: int = 0) -> Dataset[Any]:
    """The training split ``dataset`` augmented as ``recipe.augment`` says (unchanged when
    it names no augmentation)."""
    names = recipe.augmentations()
    if not names:
        return dataset
    return AugmentedDataset(dataset, task, names, seed=seed, epoch=epoch)


def _bench() -> None:
    """python -m fedpacs.common.augment: per-sample cost of the elastic deformation (and of
    every augmentation) on the hippocampus volume and on one of its slices, this machine."""
    import dataclasses
    import time

    from fedpacs.common.tasks import TASK_PRESETS

    vol = TASK_PRESETS["hippocampus"]
    for task in (vol, dataclasses.replace(vol, spatial_dims=2, input_shape=vol.input_shape[:2])):
        x = torch.randn(1, *task.input_shape)
        y = torch.randint(0, task.num_classes, (1, *task.input_shape))
        for names in (("flip",), ("elastic",), AUGMENTATIONS):
            t = build_transform(task, names, prob=1.0)
            times = []
            for i in range(9):
                t0 = time.perf_counter()
                augment_sample(t, x, y, segmentation=True, seed=i)
                times.append(time.perf_counter() - t0)
            print(f"{'+'.join(names):>35} on {task.input_shape}: median "
                  f"{sorted(times)[4]:.3f} s per sample ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    _bench()
