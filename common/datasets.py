"""Readers for the real data sets (MedMNIST .npz, MSD-style NIfTI) and the site splits.

Array core: :func:`fit_to_shape` and :func:`zscore` transform one array; the readers map
them over cases. Splits are deterministic functions of the sorted case IDs and a seed, so
the server's held-out split never overlaps any site's partition.

A 2D task on NIfTI volumes (the ``hippocampus-slices`` preset) reads each case's axial
slices: the volume is normalised as a whole, then cut along its third voxel axis
(:data:`SLICE_AXIS`, k: superior in RAS), keeping every slice whose mask holds foreground
and every :data:`EMPTY_SLICE_EVERY`-th of the others (:func:`kept_slices`). Cases are
split before they are sliced, so the slices of one case all lie in one site's training
or validation split, or in the held-out split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedpacs.common.config import DATA_FORMATS, DataFormat, DataSpec
from fedpacs.common.errors import DataError
from fedpacs.common.tasks import TaskConfig

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_AXIS = 2  # 2D tasks on NIfTI volumes: slices along the third voxel axis (axial)
EMPTY_SLICE_EVERY = 4  # of a case's slices without foreground, every 4th is kept
__all__ = ["DATA_FORMATS", "DataFormat", "DataSpec", "SiteData"]  # (the first three live
# in fedpacs.common.config, light enough for processes that never touch torch)


@dataclass
class SiteData:
    """A site's training and validation sets plus the files it skipped, with reasons."""

    train: TensorDataset
    val: TensorDataset
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- array core
def fit_to_shape(arr: np.ndarray, shape: tuple[int, ...], *, pad_value: float = 0) -> np.ndarray:
    """Centre-crop or zero-pad ``arr`` (spatial dims only) to exactly ``shape``."""
    if arr.ndim != len(shape):
        raise ValueError(f"array has {arr.ndim} dims, target shape {shape} has {len(shape)}")
    out = np.full(shape, pad_value, dtype=arr.dtype)
    src, dst = [], []
    for n, m in zip(arr.shape, shape, strict=True):
        if n >= m:  # crop
            start = (n - m) // 2
            src.append(slice(start, start + m))
            dst.append(slice(0, m))
        else:  # pad
            start = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def zscore(arr: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (float32); a constant image becomes all zeros."""
    a = arr.astype(np.float32)
    std = float(a.std())
    return (a - float(a.mean())) / std if std > 0 else np.zeros_like(a)


def kept_slices(label: np.ndarray, *, axis: int = SLICE_AXIS,
                empty_every: int = EMPTY_SLICE_EVERY) -> np.ndarray:
    """Indices along ``axis`` of the slices a 2D task keeps from a volume's label map:
    every slice with foreground (a label > 0), and of the empty ones (in order) the first
    and every ``empty_every``-th after it."""
    other = tuple(a for a in range(label.ndim) if a != axis)
    has_fg = np.asarray(np.asarray(label > 0).any(axis=other), dtype=bool)
    idx = np.arange(label.shape[axis])
    empty_kept = idx[~has_fg][::empty_every]
    return idx[has_fg | np.isin(idx, empty_kept)]


def split_ids(ids: list[str], *, holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (pool, holdout) split of case IDs; independent of input order."""
    ordered = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_hold = int(round(len(ordered) * holdout_fraction))
    hold = sorted(ordered[i] for i in perm[:n_hold])
    pool = sorted(ordered[i] for i in perm[n_hold:])
    return pool, hold


def partition_ids(ids: list[str], *, partition: int, num_partitions: int, seed: int) -> list[str]:
    """The ``partition``-th of ``num_partitions`` disjoint, near-equal shards of ``ids``."""
    ordered = sorted(ids)
    perm = np.random.default_rng(seed + 1).permutation(len(ordered))
    shards = np.array_split(perm, num_partitions)
    return sorted(ordered[i] for i in shards[partition])


# --------------------------------------------------------------------------- NIfTI
@dataclass(frozen=True)
class NiftiCase:
    case_id: str
    image: Path
    label: Path | None


def _strip_suffix(name: str) -> str:
    for s in NIFTI_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def list_nifti_cases(root: Path) -> tuple[list[NiftiCase], list[tuple[str, str]]]:
    """Pair ``images/X.nii.gz`` with ``labels/X.nii.gz``; unpaired images are skipped."""
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise DataError(str(img_dir), "no images/ folder",
                        "point data.root at a folder holding images/ and labels/")
    labels = {_strip_suffix(p.name): p for p in lab_dir.glob("*.nii*")} if lab_dir.is_dir() else {}
    cases, skipped = [], []
    for p in sorted(img_dir.glob("*.nii*")):
        cid = _strip_suffix(p.name)
        if cid in labels:
            cases.append(NiftiCase(cid, p, labels[cid]))
        else:
            skipped.append((str(p), "no label file with the same name in labels/"))
    if not cases:
        raise DataError(str(root), "no image/label pairs found",
                        "put matching .nii.gz files in images/ and labels/")
    return cases, skipped


def read_nifti(path: Path) -> np.ndarray:
    """Voxel array of a NIfTI file, or a DataError naming the file."""
    import zlib

    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        return np.asarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
    except (OSError, ValueError, EOFError, ImageFileError, zlib.error) as exc:
        raise DataError(str(path), f"not a readable NIfTI file ({type(exc).__name__}: {exc})",
                        "re-export the volume or remove it from the folder") from exc


def _nifti_arrays(cases: list[NiftiCase], task: TaskConfig
                  ) -> tuple[TensorDataset, list[tuple[str, str]]]:
    images, labels, skipped = [], [], []
    for case in cases:
        try:
            img = read_nifti(case.image)
            lab = read_nifti(case.label) if case.label else None
            slicing = task.spatial_dims == 2 and img.ndim == 3  # a 2D task on volumes
            if img.ndim != task.spatial_dims and not slicing:
                raise DataError(str(case.image), f"{img.ndim}D image, task needs "
                                f"{task.spatial_dims}D", "use data matching the task")
            if lab is None or lab.shape != img.shape:
                got = None if lab is None else lab.shape
                raise DataError(str(case.label), f"label shape {got} != image shape {img.shape}",
                                "re-export the mask on the image grid")
            if lab.min() < 0 or lab.max() >= task.num_classes:
                raise DataError(str(case.label), f"label values {int(lab.min())}..{int(lab.max())}"
                                f" outside 0..{task.num_classes - 1}",
                                "remap the labels or fix task.num_classes")
        except DataError as err:
            log.warning("skipping case %s: %s", case.case_id, err)
            skipped.append((err.path, err.problem))
            continue
        vol, mask = zscore(img), lab.astype(np.int64)
        if slicing:
            for k in kept_slices(mask):
                images.append(fit_to_shape(np.take(vol, k, axis=SLICE_AXIS), task.input_shape))
                labels.append(fit_to_shape(np.take(mask, k, axis=SLICE_AXIS),
                                           task.input_shape))
            continue
        images.append(fit_to_shape(vol, task.input_shape))
        labels.append(fit_to_shape(mask, task.input_shape))
    if not images:
        return empty_dataset(task), skipped
    x = torch.from_numpy(np.stack(images)[:, None])
    y = torch.from_numpy(np.stack(labels)[:, None])
    return TensorDataset(x, y), skipped


def empty_dataset(task: TaskConfig) -> TensorDataset:
    shape = (0, task.in_channels, *task.input_shape)
    if task.kind == "segmentation":
        return TensorDataset(torch.zeros(shape), torch.zeros((0, 1, *task.input_shape),
                                                              dtype=torch.long))
    return TensorDataset(torch.zeros(shape), torch.zeros((0,), dtype=torch.long))


# --------------------------------------------------------------------------- MedMNIST
def read_medmnist(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(str(path), f"not a readable .npz file ({type(exc).__name__})",
                        "point data.root at a MedMNIST .npz file") from exc
    for split in ("train", "val", "test"):
        for kind in ("images", "labels"):
            if f"{split}_{kind}" not in data:
                raise DataError(str(path), f"missing array {split}_{kind}",
                                "use an official MedMNIST .npz (train/val/test images+labels)")
    return data


def _medmnist_split(data: dict[str, np.ndarray], split: str, idx: np.ndarray, task: TaskConfig,
                    path: Path) -> TensorDataset:
    imgs = data[f"{split}_images"][idx]
    labs = data[f"{split}_labels"].reshape(len(data[f"{split}_labels"]), -1)[idx, 0]
    if imgs.ndim - 1 == task.spatial_dims + 1 and imgs.shape[-1] in (1, 3):
        imgs = np.moveaxis(imgs, -1, 1)  # (N, H, W, C) -> (N, C, H, W)
    else:
        imgs = imgs[:, None]
    if imgs.shape[1] != task.in_channels or imgs.ndim - 2 != task.spatial_dims:
        raise DataError(str(path), f"{split} images have shape {imgs.shape[1:]}, task "
                        f"{task.name} needs {task.in_channels} channel(s) of "
                        f"{task.spatial_dims}D", "use the .npz that matches the task")
    x = imgs.astype(np.float32)
    if x.max() > 1.0:
        x = x / 255.0
    x = (x - 0.5) / 0.5
    if labs.size and (labs.min() < 0 or labs.max() >= task.num_classes):
        raise DataError(str(path), f"{split} labels outside 0..{task.num_classes - 1}",
                        "fix task.num_classes")
    x_fit = np.stack([np.stack([fit_to_shape(c, task.input_shape) for c in s]) for s in x]) \
        if x.shape[2:] != task.input_shape and len(x) else x
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x_fit)),
                         torch.from_numpy(labs.astype(np.int64)))


def _medmnist_partition(n: int, spec: DataSpec) -> np.ndarray:
    ids = [f"{i:07d}" for i in range(n)]
    part = partition_ids(ids, partition=spec.partition, num_partitions=spec.num_partitions,
                         seed=spec.seed)
    return np.array([int(i) for i in part], dtype=np.int64)


# --------------------------------------------------------------------------- resampling
def resize(arr: np.ndarray, shape: tuple[int, ...], *, nearest: bool = False) -> np.ndarray:
    """Interpolate a 2D/3D array to ``shape``: (bi/tri)linear, or nearest for label maps
    (then the dtype is kept)."""
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    if nearest:
        out = torch.nn.functional.interpolate(x, size=shape, mode="nearest")
        return out[0, 0].numpy().astype(arr.dtype)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(x, size=shape, mode=mode, align_corners=False)[0, 0]\
        .numpy()


# --------------------------------------------------------------------------- entry points
def load_partition(spec: DataSpec, task: TaskConfig) -> SiteData:
    """The training and validation sets of one site (its partition of the pool) from a
    shared-format data set (a site's own PACS cache is read by fedpacs.client.data)."""
    if spec.format not in DATA_FORMATS:
        raise DataError(str(spec.root), f"format {spec.format!r} has no shared reader",
                        f"use one of {', '.join(DATA_FORMATS)}")
    if spec.format == "medmnist":
        data = read_medmnist(spec.root)
        tr = _medmnist_partition(len(data["train_labels"]), spec)
        va = _medmnist_partition(len(data["val_labels"]), spec)
        return SiteData(_medmnist_split(data, "train", tr, task, spec.root),
                        _medmnist_split(data, "val", va, task, spec.root))
    cases, skipped = list_nifti_cases(spec.root)
    by_id = {c.case_id: c for c in cases}
    pool, _ = split_ids(list(by_id), holdout_fraction=spec.holdout_fraction, seed=spec.seed)
    mine = partition_ids(pool, partition=spec.partition, num_partitions=spec.num_partitions,
                         seed=spec.seed)
    train_ids, val_ids = split_ids(mine, holdout_fraction=spec.val_fraction, seed=spec.seed + 7)
    train, s1 = _nifti_arrays([by_id[i] for i in train_ids], task)
    val, s2 = _nifti_arrays([by_id[i] for i in val_ids], task)
    return SiteData(train, val, skipped + s1 + s2)


def load_holdout(spec: DataSpec, task: TaskConfig) -> TensorDataset:
    """The held-out split (never in any site's partition), for the server's evaluation."""
    if spec.format not in DATA_FORMATS:
        raise DataError(str(spec.root), f"format {spec.format!r} cannot be a held-out set",
                        f"use one of {', '.join(DATA_FORMATS)}")
    if spec.format == "medmnist":
        data = read_medmnist(spec.root)
        return _medmnist_split(data, "test", np.arange(len(data["test_labels"])), task, spec.root)
    cases, _ = list_nifti_cases(spec.root)
    by_id = {c.case_id: c for c in cases}
    _, hold = split_ids(list(by_id), holdout_fraction=spec.holdout_fraction, seed=spec.seed)
    ds, _ = _nifti_arrays([by_id[i] for i in hold], task)
    return ds
