"""Native-resolution samples (a task's ``sampling = "patches"``): cases streamed from disk.

A site's cases stay on disk; the data sets here hold one small :class:`CaseReader` per
case (file paths and the task, no voxels) and read one case per item, so a site's peak
memory is that of one case, whatever the size of its cohort, and the sets fork (the warm
site's parent, DataLoader workers) at no cost. A reader returns the case ready for the
network: resampled to the task's ``spacing`` where set, windowed (CT, a PACS site's
``[data] window``) and z-scored per channel, as ``(image (C, *spatial) float32, label (1,
*spatial) uint8)`` at its own size (items give int64 labels, as the fitted arrays do).

Training (:class:`PatchDataset`): item ``i`` is one random ``input_shape`` patch of case
``i`` (a case smaller than ``input_shape`` along an axis is first zero-padded to it,
symmetrically; zero is the mean of a z-scored image, background in a label map). The patch
is centred on a foreground voxel (label > 0) with probability ``POS / (POS + NEG)`` = 2/3,
else on a background voxel (MONAI ``RandCropByPosNegLabeld``; nnU-Net oversamples
foreground a third of the time, a small structure in a large CT needs more), and clamped to
lie inside the case. A case without foreground gives background patches. Deterministic: the
patch of item ``i`` in epoch ``e`` of a call seeded ``s`` depends on ``(s, e, i)`` alone
(:func:`patch_seed`, beside fedpacs.common.augment's ``sample_seed``, whose augmentation then
applies to the patch), whatever order DataLoader workers ask in.

Evaluation (:class:`CaseDataset`): item ``i`` is case ``i`` whole, for sliding-window
inference (fedpacs.common.engine), one case per batch since cases differ in size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from fedpacs.common.tasks import TaskConfig

POS, NEG = 2, 1  # patches centred on foreground : on background
_PATCH_STREAM = 0x5041544348  # ("PATCH") keeps patch draws apart from augmentation draws
# image (C, *spatial) float32, label (1, *spatial) of integer class indices (a small type)
Case = tuple[np.ndarray, np.ndarray]


class CaseReader(Protocol):
    """One case on disk: what a streaming data set holds per case (paths, no voxels)."""

    @property
    def case_id(self) -> str: ...

    def read(self) -> Case:
        """The case ready for the network (see the module docstring)."""
        ...


def patch_seed(seed: int, epoch: int, index: int) -> int:
    """The random state of one training patch: a function of (seed, epoch, index) only."""
    words = [seed & (2**64 - 1), epoch & (2**64 - 1), index & (2**64 - 1), _PATCH_STREAM]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def patch_transform(shape: tuple[int, ...], *, pos: int = POS, neg: int = NEG) -> Compose:
    """Pad to at least ``shape`` (zeros), then one ``shape`` patch centred on foreground
    with probability pos / (pos + neg) (MONAI dictionary transforms on image and label)."""
    keys = ("image", "label")
    return Compose([SpatialPadd(keys, spatial_size=shape),
                    RandCropByPosNegLabeld(keys, label_key="label", spatial_size=shape,
                                           pos=pos, neg=neg, num_samples=1,
                                           allow_smaller=False)])


def sample_patch(transform: Compose, image: np.ndarray, label: np.ndarray, *, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One patch of a case (image (C, *s), label (1, *s)) through ``transform`` with its
    random state set from ``seed``: (float32 image, int64 label) tensors."""
    transform.set_random_state(seed=seed)
    out = transform({"image": image, "label": label})
    (sample,) = out if isinstance(out, list) else [out]
    x = convert_to_tensor(sample["image"], track_meta=False, dtype=torch.float32)
    y = convert_to_tensor(sample["label"], track_meta=False)
    return x.contiguous(), torch.round(y).to(torch.int64).contiguous()


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Training samples of ``input_shape``: a random patch of case ``i`` per item, read
    from disk when asked (see the module docstring). Each item builds its own crop (a
    tiny object), so the set holds nothing but its readers and draws the same patches
    from any thread or worker process."""

    def __init__(self, readers: Sequence[CaseReader], task: TaskConfig, *, seed: int = 0,
                 epoch: int = 0, pos: int = POS, neg: int = NEG) -> None:
        self.readers = tuple(readers)
        self.task = task
        self.seed, self.epoch = seed, epoch
        self.pos, self.neg = pos, neg

    def __len__(self) -> int:
        return len(self.readers)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.readers[index].read()
        crop = patch_transform(self.task.input_shape, pos=self.pos, neg=self.neg)
        return sample_patch(crop, image, label,
                            seed=patch_seed(self.seed, self.epoch, index))

    def drawn(self, *, seed: int, epoch: int) -> PatchDataset:
        """The same cases with the patches of a call seeded ``seed``, at ``epoch``."""
        return PatchDataset(self.readers, self.task, seed=seed, epoch=epoch, pos=self.pos,
                            neg=self.neg)

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """Voxels of each class over the whole cases (one case in memory at a time)."""
        return case_class_counts(self.readers, num_classes)


class CaseDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Whole cases, read from disk when asked: (image (C, *s), label (1, *s)) tensors of
    each case's own size, for evaluation by sliding window."""

    def __init__(self, readers: Sequence[CaseReader]) -> None:
        self.readers = tuple(readers)

    def __len__(self) -> int:
        return len(self.readers)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.readers[index].read()
        return torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))

    def class_counts(self, num_classes: int) -> torch.Tensor:
        return case_class_counts(self.readers, num_classes)


def case_class_counts(readers: Sequence[CaseReader], num_classes: int) -> torch.Tensor:
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for reader in readers:
        _, label = reader.read()
        counts += torch.bincount(torch.from_numpy(label.astype(np.int64)).reshape(-1),
                                 minlength=num_classes)[:num_classes]
    return counts

