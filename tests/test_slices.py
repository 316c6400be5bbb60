"""2D tasks on NIfTI volumes: each case's axial slices, split by case (hippocampus-slices)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedpacs.common.datasets import (
    EMPTY_SLICE_EVERY,
    SLICE_AXIS,
    DataSpec,
    kept_slices,
    load_holdout,
    load_partition,
    partition_ids,
    read_nifti,
    split_ids,
    zscore,
)
from fedpacs.common.tasks import TASK_PRESETS, TaskConfig

SHAPE = (8, 6, 7)  # (i, j, k): 7 axial slices of 8x6
TASK = TaskConfig(name="slices", kind="segmentation", network="unet", spatial_dims=2,
                  in_channels=1, num_classes=3, input_shape=(8, 6), width=4)


def test_kept_slices_are_foreground_and_every_nth_empty() -> None:
    lab = np.zeros((4, 4, 10), dtype=np.uint8)
    lab[1, 1, [3, 4, 8]] = 2
    empty = [0, 1, 2, 5, 6, 7, 9]
    expected = sorted({3, 4, 8} | set(empty[::EMPTY_SLICE_EVERY]))
    assert kept_slices(lab).tolist() == expected
    assert kept_slices(lab, empty_every=1).tolist() == list(range(10))
    assert kept_slices(np.zeros((2, 2, 3))).tolist() == [0]  # one empty slice is kept
    assert kept_slices(lab, axis=0).tolist() == [0, 1]  # slices 0, 1 along i (1 holds fg)


def _write_cases(root: Path, n: int) -> dict[bytes, str]:
    """``n`` cases with distinct random images; returns each kept slice's bytes (as the
    reader normalises it) -> its case id."""
    owner: dict[bytes, str] = {}
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for c in range(n):
        cid = f"case_{c:03d}"
        rng = np.random.default_rng(c)
        img = rng.normal(100, 20, SHAPE).astype(np.float32)
        lab = np.zeros(SHAPE, dtype=np.uint8)
        lab[2:5, 1:4, 2 + c % 3] = 1 + c % 2  # one foreground slice per case
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "images" / f"{cid}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labels" / f"{cid}.nii.gz"))
        vol = zscore(read_nifti(root / "images" / f"{cid}.nii.gz"))  # as stored
        for k in kept_slices(lab):
            owner[_key(np.take(vol, k, axis=SLICE_AXIS))] = cid
    return owner


def _key(arr: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).digest()


def _cases_of(ds: object, owner: dict[bytes, str]) -> list[str]:
    return [owner[_key(ds[i][0][0].numpy())] for i in range(len(ds))]  # type: ignore[index,arg-type]


def test_slices_never_cross_sites_val_or_holdout(tmp_path: Path) -> None:
    owner = _write_cases(tmp_path, 15)
    ids = sorted(set(owner.values()))
    where: dict[str, set[str]] = {}  # case -> the splits its slices lie in
    hold = load_holdout(DataSpec("nifti", tmp_path), TASK)
    for cid in _cases_of(hold, owner):
        where.setdefault(cid, set()).add("holdout")
    pool, held_ids = split_ids(ids, holdout_fraction=0.2, seed=0)
    assert set(_cases_of(hold, owner)) == set(held_ids)
    for k in range(3):
        site = load_partition(DataSpec("nifti", tmp_path, partition=k, num_partitions=3), TASK)
        mine = partition_ids(pool, partition=k, num_partitions=3, seed=0)
        got = _cases_of(site.train, owner) + _cases_of(site.val, owner)
        assert set(got) == set(mine)  # the site's cases, no other
        for split, ds in (("train", site.train), ("val", site.val)):
            for cid in _cases_of(ds, owner):
                where.setdefault(cid, set()).add(f"site{k}-{split}")
    assert set(where) == set(ids)
    assert all(len(s) == 1 for s in where.values()), where  # each case in one split only
    # every kept slice of every case is read, once
    total = len(hold) + sum(
        len(s.train) + len(s.val) for s in (load_partition(
            DataSpec("nifti", tmp_path, partition=k, num_partitions=3), TASK) for k in range(3)))
    assert total == len(owner)


def test_slices_shapes_and_labels(tmp_path: Path) -> None:
    _write_cases(tmp_path, 5)
    task = TaskConfig.from_dict(TASK.to_dict() | {"input_shape": [10, 4]})  # pad i, crop j
    site = load_partition(DataSpec("nifti", tmp_path, holdout_fraction=0.0, val_fraction=0.0),
                          task)
    x, y = site.train.tensors
    assert x.shape[1:] == (1, 10, 4) and y.shape[1:] == (1, 10, 4)
    assert x.dtype.is_floating_point and not y.dtype.is_floating_point
    assert set(np.unique(y.numpy())) <= {0, 1, 2}
    assert int((y.flatten(1) > 0).any(1).sum()) == 5  # one foreground slice per case


def test_hippocampus_slices_preset_on_the_real_files(data_dir: Path) -> None:
    task = TASK_PRESETS["hippocampus-slices"]
    assert (task.spatial_dims, task.in_channels, task.num_classes) == (2, 1, 3)
    root = data_dir / "msd_hippocampus_udacity"
    site = load_partition(DataSpec("nifti", root, partition=0, num_partitions=12), task)
    x, y = site.train.tensors
    assert x.shape[1:] == (1, *task.input_shape) and y.shape[1:] == (1, *task.input_shape)
    assert set(np.unique(y.numpy())) == {0, 1, 2}
    has_fg = (y.flatten(1) > 0).any(1).float().mean()
    assert 0.7 < float(has_fg) < 1.0  # foreground slices and a share of empty ones
    assert abs(float(x.mean())) < 0.5


@pytest.mark.parametrize("dims", [2, 3])
def test_volumes_whole_for_a_3d_task_slices_for_a_2d_one(tmp_path: Path, dims: int) -> None:
    _write_cases(tmp_path, 3)
    shape = SHAPE if dims == 3 else SHAPE[:2]
    task = TaskConfig.from_dict(TASK.to_dict() | {"spatial_dims": dims,
                                                  "input_shape": list(shape)})
    site = load_partition(DataSpec("nifti", tmp_path, holdout_fraction=0.0, val_fraction=0.0),
                          task)
    assert len(site.train) == (3 if dims == 3 else sum(
        len(kept_slices(np.asarray(nib.load(str(p)).dataobj)))  # type: ignore[attr-defined]
        for p in sorted((tmp_path / "labels").glob("*.nii.gz"))))
