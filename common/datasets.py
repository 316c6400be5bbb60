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

Image folders (``images``: one sub-folder per class; ``image-masks``: ``images/`` and
``masks/`` with matching stems) hold PNG/JPEG/TIFF files, 8-bit or 16-bit grey or RGB. An
image is a case, split like a NIfTI case. Each image is read as 1 (grey) or 3 (colour)
channels scaled to [0, 1] by its bit depth (/255, 16-bit /65535; an alpha channel is
dropped), converted to the task's ``in_channels`` (colour to grey by ITU-R 601 luminance,
as Pillow does; grey to colour by repeating it), resized to the task's ``input_shape``
(antialiased bilinear; a mask nearest) and mapped to [-1, 1] as MedMNIST images are. So a
folder mixing sizes or grey and colour images is used whole. A file that cannot be used is
skipped with a reason code (:data:`IMAGE_SKIP_REASONS`, ``"code: why"`` in
:attr:`SiteData.skipped`) and the rest kept; a class sub-folder that names no class of the
task stops the reader (a DataError naming it and the classes expected).

NIfTI channels: a 3D file is one channel; a 4D file (x, y, z, c), as BraTS stores its
modalities, is c channels (a 5D (x, y, z, 1, c) vector image alike), each z-scored on its
own. A case whose channel count is not the task's ``in_channels`` is skipped with a
reason naming the file, the channels found and expected, and the fix; the rest are kept.

Native resolution (a task's ``sampling = "patches"``, 3D segmentation): the NIfTI cases
are not read here but streamed (:mod:`fedpacs.common.patches`): one :class:`NiftiReader`
per case, each checked first from its header and its label (so skipped cases are known
before training starts), read from disk when the trainer asks for it. A task's
``spacing`` (mm, per axis of ``input_shape``: the NIfTI's (i, j, k)) resamples each case
from its header's voxel sizes, image trilinear and label nearest (fedpacs.client.dicom's
``resample``), in both samplings; ``()`` keeps each case's own grid.
"""

from __future__ import annotations

import logging
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from fedpacs.common.config import DATA_FORMATS, IMAGE_FORMATS, IMAGE_LAYOUTS, DataFormat, DataSpec
from fedpacs.common.errors import DataError
from fedpacs.common.patches import CaseDataset, PatchDataset
from fedpacs.common.tasks import TaskConfig

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_AXIS = 2  # 2D tasks on NIfTI volumes: slices along the third voxel axis (axial)
EMPTY_SLICE_EVERY = 4  # of a case's slices without foreground, every 4th is kept
__all__ = ["DATA_FORMATS", "DataFormat", "DataSpec", "SiteData"]  # (the first three live
# in fedpacs.common.config, light enough for processes that never touch torch)


# a split as a site trains/evaluates on it: arrays in memory ("fit"), or streamed cases
# ("patches": random patches for training, whole cases for evaluation)
SiteDataset: TypeAlias = TensorDataset | PatchDataset | CaseDataset


@dataclass
class SiteData:
    """A site's training and validation sets plus the files it skipped, with reasons."""

    train: SiteDataset
    val: SiteDataset
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


def zscore_channels(image: np.ndarray) -> np.ndarray:
    """:func:`zscore` of each channel (axis 0) on its own."""
    return np.stack([zscore(c) for c in image])


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


def _nifti_errors() -> tuple[type[BaseException], ...]:
    import zlib

    from nibabel.filebasedimages import ImageFileError

    return OSError, ValueError, EOFError, ImageFileError, zlib.error


def read_nifti(path: Path) -> np.ndarray:
    """Voxel array of a NIfTI file, or a DataError naming the file."""
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
    except _nifti_errors() as exc:
        raise DataError(str(path), f"not a readable NIfTI file ({type(exc).__name__}: {exc})",
                        "re-export the volume or remove it from the folder") from exc


def nifti_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, voxel sizes in mm) of a NIfTI file from its header alone (no voxels read),
    or a DataError naming the file."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)  # type: ignore[attr-defined]
        zooms = tuple(float(z) for z in img.header.get_zooms())  # type: ignore[attr-defined]
    except _nifti_errors() as exc:
        raise DataError(str(path), f"not a readable NIfTI file ({type(exc).__name__}: {exc})",
                        "re-export the volume or remove it from the folder") from exc
    return shape, zooms


def nifti_layout(shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(channels, spatial shape) of a NIfTI image's array shape: a 4D (x, y, z, c) or 5D
    (x, y, z, 1, c) image has c channels, a 2D or 3D image one."""
    if len(shape) == 5 and shape[3] == 1:
        return shape[4], shape[:3]
    if len(shape) == 4:
        return shape[3], shape[:3]
    return 1, shape


def channels_first(arr: np.ndarray) -> np.ndarray:
    """A NIfTI image's voxels as (channels, *spatial) (see :func:`nifti_layout`)."""
    if arr.ndim == 5 and arr.shape[3] == 1:
        arr = arr[:, :, :, 0]
    return np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[None]


def check_nifti_case(case: NiftiCase, task: TaskConfig, image_shape: tuple[int, ...],
                     label: np.ndarray | None) -> bool:
    """Whether ``task`` reads the case as 2D slices of a volume; a DataError naming the file,
    what it holds, what the task expects and the fix when the case does not fit it."""
    channels, spatial = nifti_layout(image_shape)
    slicing = task.spatial_dims == 2 and len(spatial) == 3  # a 2D task on volumes
    if len(spatial) != task.spatial_dims and not slicing:
        raise DataError(str(case.image), f"{len(image_shape)}D image, task needs "
                        f"{task.spatial_dims}D", "use data matching the task")
    if channels != task.in_channels:
        raise DataError(str(case.image), f"{channels} channel(s) (shape {image_shape}; a 4D "
                        f"NIfTI's last axis is its channels), task {task.name!r} expects "
                        f"in_channels = {task.in_channels}", f"set the task's in_channels "
                        f"to {channels} if every case has them, else convert this image to "
                        f"{task.in_channels} channel(s) (one 4D file (x, y, z, channel)) or "
                        "remove it", kind="channels")
    if label is None or label.shape != spatial:
        got = None if label is None else label.shape
        raise DataError(str(case.label), f"label shape {got} != image shape {spatial}",
                        "re-export the mask on the image grid")
    if label.min() < 0 or label.max() >= task.num_classes:
        raise DataError(str(case.label), f"label values {int(label.min())}..{int(label.max())}"
                        f" outside 0..{task.num_classes - 1}",
                        "remap the labels or fix task.num_classes")
    return slicing


def spacing_problem(task: TaskConfig, where: Path) -> DataError | None:
    """A task's ``spacing`` resamples 3D cases; on a 2D task this reader refuses it."""
    if task.spacing and task.spatial_dims != 3:
        return DataError(str(where), f"task {task.name!r} sets spacing {list(task.spacing)} "
                         f"on a {task.spatial_dims}D task; cases are resampled as 3D "
                         "volumes only", "leave spacing out of a 2D task", kind="spacing")
    return None


def resample_case(image: np.ndarray, label: np.ndarray, spacing: tuple[float, ...],
                  target: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A case (image (C, *s), label (*s)) resampled from voxel sizes ``spacing`` to
    ``target`` (mm): each channel trilinear, the label nearest."""
    spacing = tuple(spacing[: len(target)])
    return (np.stack([resample(c, spacing, target, order=1) for c in image]),
            resample(label, spacing, target, order=0))


def read_nifti_case(case: NiftiCase, task: TaskConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """A checked case as (image (C, *spatial) z-scored per channel, label as stored,
    slicing), resampled to the task's ``spacing`` when it sets one."""
    img = read_nifti(case.image)
    lab = read_nifti(case.label) if case.label else None
    slicing = check_nifti_case(case, task, img.shape, lab)
    assert lab is not None  # (checked)
    image, label = channels_first(img), lab
    if task.spacing:
        _, zooms = nifti_header(case.image)
        image, label = resample_case(image, label, zooms, task.spacing)
    return zscore_channels(image), label, slicing


@dataclass(frozen=True)
class NiftiReader:
    """One NIfTI case streamed from disk (:class:`fedpacs.common.patches.CaseReader`)."""

    case: NiftiCase
    task: TaskConfig

    @property
    def case_id(self) -> str:
        return self.case.case_id

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        image, label, _ = read_nifti_case(self.case, self.task)
        return image, compact_labels(label, self.task.num_classes)[None]


def compact_labels(label: np.ndarray, num_classes: int) -> np.ndarray:
    """A checked label map in the smallest integer type of its classes (a streamed case's
    label: uint8 for up to 256 classes, an eighth of int64's memory on a large CT)."""
    return label.astype(np.uint8 if num_classes <= 256 else np.int16, copy=False)


def nifti_readers(cases: list[NiftiCase], task: TaskConfig
                  ) -> tuple[list[NiftiReader], list[tuple[str, str]]]:
    """A reader per usable case, checked from its image header and its label (read, one
    at a time, then dropped); the others skipped with the reason."""
    readers, skipped = [], []
    for case in cases:
        try:
            shape, _ = nifti_header(case.image)
            check_nifti_case(case, task, shape, read_nifti(case.label) if case.label else None)
        except DataError as err:
            log.warning("skipping case %s: %s", case.case_id, err)
            skipped.append((err.path, err.problem))
            continue
        readers.append(NiftiReader(case, task))
    return readers, skipped


def _nifti_arrays(cases: list[NiftiCase], task: TaskConfig
                  ) -> tuple[TensorDataset, list[tuple[str, str]]]:
    images, labels, skipped = [], [], []
    for case in cases:
        try:
            vol, stored, slicing = read_nifti_case(case, task)
        except DataError as err:
            log.warning("skipping case %s: %s", case.case_id, err)
            skipped.append((err.path, err.problem))
            continue
        mask = stored.astype(np.int64)
        if slicing:
            for k in kept_slices(mask):
                images.append(np.stack([fit_to_shape(np.take(c, k, axis=SLICE_AXIS),
                                                     task.input_shape) for c in vol]))
                labels.append(fit_to_shape(np.take(mask, k, axis=SLICE_AXIS),
                                           task.input_shape)[None])
            continue
        images.append(np.stack([fit_to_shape(c, task.input_shape) for c in vol]))
        labels.append(fit_to_shape(mask, task.input_shape)[None])
    if not images:
        return empty_dataset(task), skipped
    x = torch.from_numpy(np.stack(images))
    y = torch.from_numpy(np.stack(labels))
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


def medmnist_pool_ids(data: dict[str, np.ndarray]) -> list[str]:
    """The case IDs of a MedMNIST pool (what a split partitions): ``train/NNNNNN`` and
    ``val/NNNNNN``, the row in that array (``test`` is the held-out split)."""
    return [f"{split}/{i:06d}" for split in ("train", "val")
            for i in range(len(data[f"{split}_labels"]))]


def _medmnist_split_sets(data: dict[str, np.ndarray], spec: DataSpec, task: TaskConfig
                         ) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) of this site's cases in the split ``spec.split``: its train and val
    rows together, split again by ``val_fraction`` as NIfTI cases are (a split's site
    has cases of both official splits, so that every site can validate)."""
    from fedpacs.common.partition import split_site_cases

    assert spec.split is not None
    mine = split_site_cases(spec.split, spec.partition, medmnist_pool_ids(data))
    out = []
    for ids in site_train_val(mine, spec):
        rows = {s: np.array(sorted(int(c.split("/")[1]) for c in ids if c.startswith(f"{s}/")),
                            dtype=np.int64) for s in ("train", "val")}
        parts = [empty_dataset(task)] + [_medmnist_split(data, s, r, task, spec.root)
                                         for s, r in rows.items() if len(r)]
        out.append(TensorDataset(*(torch.cat([p.tensors[k] for p in parts])
                                   for k in range(2))))
    return out[0], out[1]


# --------------------------------------------------------------------------- resampling
def resample(arr: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...],
             *, order: int = 1) -> np.ndarray:
    """Resample to ``target`` spacing (mm) with trilinear (order 1) or nearest (order 0):
    the one resampler of NIfTI cases and PACS volumes (fedpacs.client.dicom)."""
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in
                  zip(arr.shape, spacing, target, strict=True))
    if shape == arr.shape:
        return arr.copy()
    return resize(arr, shape, nearest=order == 0)


def resize(arr: np.ndarray, shape: tuple[int, ...], *, nearest: bool = False,
           antialias: bool = False) -> np.ndarray:
    """Interpolate a 2D/3D array to ``shape``: (bi/tri)linear, or nearest for label maps
    (then the dtype is kept); ``antialias`` (2D linear only) low-passes a shrinking image
    first, as a photo's downscale should."""
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    if nearest:
        out = torch.nn.functional.interpolate(x, size=shape, mode="nearest")
        return out[0, 0].numpy().astype(arr.dtype)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(x, size=shape, mode=mode, align_corners=False,
                                           antialias=antialias and len(shape) == 2)[0, 0]\
        .numpy()


# --------------------------------------------------------------------------- image folders
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2: colour -> grey, as Pillow's convert("L")
# Why an image folder's reader skipped a file (the code, then the reason, in SiteData.skipped)
IMAGE_SKIP_REASONS: dict[str, str] = {
    "unreadable-image": "the file is not a readable PNG/JPEG/TIFF (corrupt or truncated)",
    "unsupported-image": "a readable image the reader does not take (a floating-point or "
                         "32-bit image, several frames, a colour mask)",
    "not-an-image": "a file without a .png/.jpg/.jpeg/.tif/.tiff suffix",
    "not-in-class-folder": "an image directly in data.root, outside every class sub-folder",
    "empty-class": "a class sub-folder without any image",
    "no-mask": "an image in images/ without a mask of the same stem in masks/",
    "mask-size": "a mask whose size differs from its image's",
    "mask-values": "a mask with values outside the task's class indices",
}
C = TypeVar("C", "NiftiCase", "ImageCase")


@dataclass(frozen=True)
class ImageCase:
    """One image of an image folder: its class index (``images``) or mask (``image-masks``)."""

    case_id: str
    image: Path
    label: int = -1
    mask: Path | None = None


def _skip(path: Path, code: str, why: str) -> tuple[str, str]:
    return str(path), f"{code}: {why}"


def class_indices(folders: list[str], task: TaskConfig, root: Path) -> dict[str, int]:
    """Class index of each class sub-folder name. With ``task.class_names``: the class a
    folder names (case-insensitive, a '/' in the name written '-' or '_', or the class's
    index); without: the index itself ("0", "1", ...) or else the folders' sorted order
    (then one folder per class). A DataError names every folder naming no class."""
    if task.class_names:
        aliases: dict[str, int] = {}
        for i, name in enumerate(task.class_names):
            for alias in (name, name.replace("/", "-"), name.replace("/", "_"), str(i)):
                aliases[alias.casefold()] = i
        unknown = [f for f in folders if f.casefold() not in aliases]
        if unknown:
            expected = ", ".join(f"{n!r}" for n in task.class_names)
            raise DataError(str(root / unknown[0]), f"class sub-folder(s) {', '.join(unknown)}"
                            f" name no class of task {task.name!r} (expected one of "
                            f"{expected}, or 0..{len(task.class_names) - 1})",
                            "rename each folder to its class's name (a '/' written as '-' or "
                            "'_') or index, or move it out of data.root", kind="unknown-class")
        index = {f: aliases[f.casefold()] for f in folders}
    elif all(f.isdigit() and int(f) < task.num_classes for f in folders):
        index = {f: int(f) for f in folders}
    elif len(folders) == task.num_classes:
        index = {f: i for i, f in enumerate(sorted(folders))}
    else:
        raise DataError(str(root), f"{len(folders)} class sub-folders ({', '.join(folders)}) "
                        f"for the {task.num_classes} classes of task {task.name!r}, which "
                        "names none", f"name the folders 0..{task.num_classes - 1}, give the "
                        "task class_names, or keep one folder per class", kind="unknown-class")
    seen: dict[int, str] = {}
    for f in sorted(folders):
        if index[f] in seen:
            raise DataError(str(root / f), f"folders {seen[index[f]]!r} and {f!r} both name "
                            f"class {index[f]}", "merge them into one folder",
                            kind="unknown-class")
        seen[index[f]] = f
    return index


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def list_image_folder(root: Path, task: TaskConfig
                      ) -> tuple[list[ImageCase], list[tuple[str, str]]]:
    """The images of ``root/<class>/``, case ID ``<class folder>/<file name>``; files
    that are no image, outside a class folder, and empty class folders are reported."""
    if not root.is_dir():
        raise DataError(str(root), "not a folder", f"lay the images out as "
                        f"{IMAGE_LAYOUTS['images']} and point data.root at it")
    entries = _visible(root)
    folders = [p for p in entries if p.is_dir()]
    skipped = [_skip(p, "not-in-class-folder", "move it into its class's sub-folder")
               for p in entries if p.is_file()]
    if not folders:
        raise DataError(str(root), "no class sub-folders",
                        f"lay the images out as {IMAGE_LAYOUTS['images']}")
    index = class_indices([p.name for p in folders], task, root)
    cases: list[ImageCase] = []
    for folder in folders:
        files = [p for p in _visible(folder) if p.is_file()]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += [_skip(p, "not-an-image", f"suffix {p.suffix!r} is not one of "
                          f"{', '.join(IMAGE_SUFFIXES)}") for p in files if p not in images]
        if not images:
            skipped.append(_skip(folder, "empty-class", f"no image of class "
                                 f"{index[folder.name]} in the folder"))
        cases += [ImageCase(f"{folder.name}/{p.name}", p, label=index[folder.name])
                  for p in images]
    if not cases:
        raise DataError(str(root), "no images in the class sub-folders",
                        f"lay the images out as {IMAGE_LAYOUTS['images']}")
    return cases, skipped


def list_image_masks(root: Path) -> tuple[list[ImageCase], list[tuple[str, str]]]:
    """Pair ``images/X.*`` with ``masks/X.*`` (by stem; case ID the image's file name);
    an image without a mask is skipped."""
    img_dir, mask_dir = root / "images", root / "masks"
    if not (img_dir.is_dir() and mask_dir.is_dir()):
        raise DataError(str(root), "no images/ and masks/ folders",
                        f"lay the images out as {IMAGE_LAYOUTS['image-masks']}")
    masks: dict[str, Path] = {}
    for p in reversed(_visible(mask_dir)):  # (of two masks with one stem, the first by name)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            masks[p.stem] = p
    cases, skipped = [], []
    for p in _visible(img_dir):
        if not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(_skip(p, "not-an-image", f"suffix {p.suffix!r} is not one of "
                                 f"{', '.join(IMAGE_SUFFIXES)}"))
        elif p.stem not in masks:
            skipped.append(_skip(p, "no-mask", f"no masks/{p.stem}.* beside the image"))
        else:
            cases.append(ImageCase(p.name, p, mask=masks[p.stem]))
    if not cases:
        raise DataError(str(root), "no image/mask pairs found",
                        f"lay the images out as {IMAGE_LAYOUTS['image-masks']}")
    return cases, skipped


def _open_image(path: Path, what: str) -> Image.Image:
    """The decoded Pillow image of one frame, or a DataError naming the file. Pillow's
    warnings on a damaged file (corrupt EXIF, ...) go to this module's log, once each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as im:
                frames = int(getattr(im, "n_frames", 1))
                if frames > 1:
                    raise DataError(str(path), f"{frames} frames in one {what} file",
                                    "save each image as its own file",
                                    kind="unsupported-image")
                im.load()
                return im
        except (OSError, ValueError, SyntaxError, EOFError, struct.error,
                Image.DecompressionBombError) as exc:
            raise DataError(str(path), f"not a readable {what} ({type(exc).__name__}: "
                            f"{exc})", "re-export the file or remove it from the folder",
                            kind="unreadable-image") from exc
        finally:
            for w in caught:
                log.warning("%s: %s", path, w.message)


def read_image(path: Path) -> np.ndarray:
    """A PNG/JPEG/TIFF image as (channels, rows, columns) float32 in [0, 1]: 1 channel for
    grey (8-bit /255, 16-bit /65535), 3 for colour (palette and CMYK/YCbCr images
    converted to RGB, alpha dropped); a DataError with a reason code otherwise."""
    im = _open_image(path, "image")
    mode = im.mode
    if mode in ("1", "L", "LA", "La"):
        grey = np.asarray(im.convert("L") if mode == "1" else im.getchannel(0))
        return grey.astype(np.float32)[None] / 255.0
    if mode.startswith("I"):  # 16-bit grey ("I;16", "I;16B", ...; "I" from some readers)
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(str(path), f"32-bit grey values {a.min()}..{a.max()} outside "
                            "16 bits", "export the image as 8- or 16-bit",
                            kind="unsupported-image")
        return a.astype(np.float32)[None] / 65535.0
    if mode == "F":
        raise DataError(str(path), "a floating-point image (no fixed intensity range)",
                        "export the image as 8- or 16-bit", kind="unsupported-image")
    rgb = np.asarray(im.convert("RGB"))
    return np.moveaxis(rgb, -1, 0).astype(np.float32) / 255.0


def read_mask_image(path: Path) -> np.ndarray:
    """A mask image's class indices (rows, columns) int64: grey or palette values as
    stored (8 or 16 bit); a colour mask is refused."""
    im = _open_image(path, "mask")
    if im.mode not in ("1", "L", "P") and not im.mode.startswith("I"):
        raise DataError(str(path), f"a mask of mode {im.mode} (not one channel of class "
                        "indices)", "save the mask as 8-bit grey or palette PNG whose values "
                        "are the class indices", kind="unsupported-image")
    return np.asarray(im).astype(np.int64)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(c, rows, columns) -> (channels, rows, columns): colour to grey by luminance, grey to
    colour by repetition."""
    have = img.shape[0]
    if have == channels:
        return img
    if have == 3 and channels == 1:
        return (LUMA[0] * img[0] + LUMA[1] * img[1] + LUMA[2] * img[2])[None] \
            .astype(np.float32)
    if have == 1 and channels == 3:
        return np.repeat(img, 3, axis=0)
    raise ValueError(f"cannot convert {have} channel(s) to {channels}")


def fit_image(img: np.ndarray, task: TaskConfig) -> np.ndarray:
    """A [0, 1] image (c, rows, columns) as a sample of ``task``: its channels, resized to
    its input shape, mapped to [-1, 1] as MedMNIST images are."""
    x = to_channels(img, task.in_channels)
    if x.shape[1:] != task.input_shape:
        x = np.stack([resize(c, task.input_shape, antialias=True) for c in x])
    return (x - 0.5) / 0.5


def _image_arrays(cases: list[ImageCase], task: TaskConfig
                  ) -> tuple[TensorDataset, list[tuple[str, str]]]:
    images: list[np.ndarray] = []
    labels: list[np.ndarray | int] = []
    skipped = []
    for case in cases:
        try:
            img = read_image(case.image)
            if case.mask is None:
                label: np.ndarray | int = case.label
            else:
                mask = read_mask_image(case.mask)
                if mask.shape != img.shape[1:]:
                    raise DataError(str(case.mask), f"mask size {mask.shape} != image size "
                                    f"{img.shape[1:]} (rows, columns)",
                                    "export the mask on the image's grid", kind="mask-size")
                if mask.size and (mask.min() < 0 or mask.max() >= task.num_classes):
                    raise DataError(str(case.mask), f"mask values {mask.min()}..{mask.max()} "
                                    f"outside 0..{task.num_classes - 1}", "write class "
                                    "indices (a lossless PNG), or fix task.num_classes",
                                    kind="mask-values")
                label = (mask if mask.shape == task.input_shape
                         else resize(mask, task.input_shape, nearest=True))[None]
        except DataError as err:
            log.warning("skipping image %s: %s", case.case_id, err)
            skipped.append((err.path, f"{err.kind}: {err.problem}"))
            continue
        images.append(fit_image(img, task))
        labels.append(label)
    if not images:
        return empty_dataset(task), skipped
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images), dtype=np.float32))
    y = torch.from_numpy(np.stack(labels).astype(np.int64)) if task.kind == "segmentation" \
        else torch.tensor(labels, dtype=torch.long)
    return TensorDataset(x, y), skipped


def list_image_cases(spec: DataSpec, task: TaskConfig
                     ) -> tuple[list[ImageCase], list[tuple[str, str]]]:
    """The cases of an ``images`` or ``image-masks`` folder, after checking the task can
    read them (2D, 1 or 3 channels; the format's task kind)."""
    if task.spatial_dims != 2 or task.in_channels not in (1, 3) \
            or task.kind != IMAGE_FORMATS[spec.format]:
        raise DataError(str(spec.root), f"format {spec.format!r} holds 2D "
                        f"{IMAGE_FORMATS[spec.format]} images of 1 or 3 channels; task "
                        f"{task.name!r} is {task.spatial_dims}D {task.kind} with "
                        f"{task.in_channels} channel(s)", "use a format that fits the task",
                        kind="wrong-format")
    if spec.format == "images":
        return list_image_folder(spec.root, task)
    return list_image_masks(spec.root)


# --------------------------------------------------------------------------- entry points
def _site_cases(cases: list[C], spec: DataSpec) -> tuple[list[C], list[C]]:
    """(train, validation) cases of one site: its partition of the pool (all cases but the
    held-out split), split again by ``val_fraction``."""
    by_id = {c.case_id: c for c in cases}
    pool, _ = split_ids(list(by_id), holdout_fraction=spec.holdout_fraction, seed=spec.seed)
    train_ids, val_ids = site_case_ids(pool, spec)
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def site_case_ids(pool: list[str], spec: DataSpec) -> tuple[list[str], list[str]]:
    """(train, validation) case IDs of one site from the pool (NIfTI, image folders): its
    cases in the saved split ``spec.split`` when there is one (fedpacs.common.partition),
    else its near-equal random shard; then split again by ``val_fraction``."""
    if spec.split is not None:
        from fedpacs.common.partition import split_site_cases

        mine = split_site_cases(spec.split, spec.partition, pool)
    else:
        mine = partition_ids(pool, partition=spec.partition,
                             num_partitions=spec.num_partitions, seed=spec.seed)
    return site_train_val(mine, spec)


def site_train_val(mine: list[str], spec: DataSpec) -> tuple[list[str], list[str]]:
    """A site's case IDs (NIfTI, image folders) split into (train, validation)."""
    return split_ids(mine, holdout_fraction=spec.val_fraction, seed=spec.seed + 7)


def _holdout_cases(cases: list[C], spec: DataSpec) -> list[C]:
    by_id = {c.case_id: c for c in cases}
    _, hold = split_ids(list(by_id), holdout_fraction=spec.holdout_fraction, seed=spec.seed)
    return [by_id[i] for i in hold]


STREAMING_FORMATS = ("nifti", "pacs")  # the formats a task's sampling = "patches" reads


def check_sampling(task: TaskConfig, fmt: str, root: Path) -> None:
    """A DataError when the data of ``fmt`` cannot be read the way ``task`` samples them:
    "patches" reads 3D volumes (NIfTI, a PACS cache) of a 3D segmentation task; a task's
    ``spacing`` resamples 3D cases of those formats only (the others store no voxel
    sizes)."""
    err = spacing_problem(task, root)
    if err is not None:
        raise err
    if task.spacing and fmt not in STREAMING_FORMATS:
        raise DataError(str(root), f"task {task.name!r} sets spacing {list(task.spacing)}; "
                        f"format {fmt!r} stores no voxel sizes to resample from",
                        "leave spacing out of the task, or use NIfTI volumes",
                        kind="spacing")
    if task.sampling != "patches":
        return
    if fmt not in STREAMING_FORMATS or task.spatial_dims != 3:
        raise DataError(str(root), f'task {task.name!r} samples "patches", which reads the '
                        f"3D volumes of a {' or '.join(STREAMING_FORMATS)} data set; this "
                        f"is format {fmt!r} for a {task.spatial_dims}D task",
                        'use sampling = "fit" for 2D images and MedMNIST arrays',
                        kind="sampling")


def load_partition(spec: DataSpec, task: TaskConfig) -> SiteData:
    """The training and validation sets of one site (its partition of the pool) from a
    shared-format data set (a site's own PACS cache is read by fedpacs.client.data); with
    ``task.sampling == "patches"`` streamed: random patches to train on, whole cases to
    validate on (see :mod:`fedpacs.common.patches`)."""
    if spec.format not in DATA_FORMATS:
        raise DataError(str(spec.root), f"format {spec.format!r} has no shared reader",
                        f"use one of {', '.join(DATA_FORMATS)}")
    check_sampling(task, spec.format, spec.root)
    if spec.format == "medmnist":
        data = read_medmnist(spec.root)
        if spec.split is not None:
            return SiteData(*_medmnist_split_sets(data, spec, task))
        tr = _medmnist_partition(len(data["train_labels"]), spec)
        va = _medmnist_partition(len(data["val_labels"]), spec)
        return SiteData(_medmnist_split(data, "train", tr, task, spec.root),
                        _medmnist_split(data, "val", va, task, spec.root))
    if spec.format in IMAGE_FORMATS:
        images, skipped = list_image_cases(spec, task)
        train_imgs, val_imgs = _site_cases(images, spec)
        train, s1 = _image_arrays(train_imgs, task)
        val, s2 = _image_arrays(val_imgs, task)
        return SiteData(train, val, skipped + s1 + s2)
    cases, skipped = list_nifti_cases(spec.root)
    train_cases, val_cases = _site_cases(cases, spec)
    if task.sampling == "patches":
        train_readers, s1 = nifti_readers(train_cases, task)
        val_readers, s2 = nifti_readers(val_cases, task)
        return SiteData(PatchDataset(train_readers, task), CaseDataset(val_readers),
                        skipped + s1 + s2)
    train, s1 = _nifti_arrays(train_cases, task)
    val, s2 = _nifti_arrays(val_cases, task)
    return SiteData(train, val, skipped + s1 + s2)


def load_holdout(spec: DataSpec, task: TaskConfig) -> TensorDataset | CaseDataset:
    """The held-out split (never in any site's partition), for the server's evaluation;
    with ``task.sampling == "patches"`` its whole cases, streamed, which the server
    evaluates by sliding window as the sites do."""
    if spec.format not in DATA_FORMATS:
        raise DataError(str(spec.root), f"format {spec.format!r} cannot be a held-out set",
                        f"use one of {', '.join(DATA_FORMATS)}")
    check_sampling(task, spec.format, spec.root)
    if spec.format == "medmnist":
        data = read_medmnist(spec.root)
        return _medmnist_split(data, "test", np.arange(len(data["test_labels"])), task, spec.root)
    if spec.format in IMAGE_FORMATS:
        images, _ = list_image_cases(spec, task)
        ds, _ = _image_arrays(_holdout_cases(images, spec), task)
        return ds
    cases, _ = list_nifti_cases(spec.root)
    if task.sampling == "patches":
        readers, _ = nifti_readers(_holdout_cases(cases, spec), task)
        return CaseDataset(readers)
    ds, _ = _nifti_arrays(_holdout_cases(cases, spec), task)
    return ds
