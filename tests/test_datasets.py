"""Readers and splits on the real files in ../shared/data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedpacs.common.datasets import (
    DataSpec,
    fit_to_shape,
    list_nifti_cases,
    load_holdout,
    load_partition,
    partition_ids,
    split_ids,
)
from fedpacs.common.errors import DataError
from fedpacs.common.tasks import TASK_PRESETS


def test_fit_to_shape_pads_and_crops_centred() -> None:
    a = np.arange(6).reshape(2, 3)
    out = fit_to_shape(a, (4, 1))
    assert out.tolist() == [[0], [1], [4], [0]]


def test_splits_are_disjoint_deterministic_and_cover() -> None:
    ids = [f"c{i:03d}" for i in range(101)]
    pool, hold = split_ids(ids, holdout_fraction=0.2, seed=0)
    assert len(hold) == 20 and not set(pool) & set(hold) and set(pool) | set(hold) == set(ids)
    assert split_ids(list(reversed(ids)), holdout_fraction=0.2, seed=0) == (pool, hold)
    parts = [partition_ids(pool, partition=k, num_partitions=3, seed=0) for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(pool)
    assert all(not set(parts[i]) & set(parts[j]) for i in range(3) for j in range(i + 1, 3))
    assert {len(p) for p in parts} <= {26, 27}


def test_hippocampus_real_files(data_dir: Path) -> None:
    root = data_dir / "msd_hippocampus_udacity"
    cases, skipped = list_nifti_cases(root)
    assert len(cases) == 260 and skipped == []
    task = TASK_PRESETS["hippocampus"]
    site = load_partition(DataSpec("nifti", root, partition=1, num_partitions=3), task)
    assert len(site.train) + len(site.val) in (69, 70)
    x, y = site.train[0]
    assert x.shape == (1, 48, 64, 48) and y.shape == (1, 48, 64, 48)
    assert set(np.unique(y.numpy())) <= {0, 1, 2} and abs(float(x.mean())) < 0.5
    hold = load_holdout(DataSpec("nifti", root), task)
    assert len(hold) == 52


def test_breastmnist_partitions(data_dir: Path) -> None:
    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    task = TASK_PRESETS["breastmnist"]
    sizes = [len(load_partition(DataSpec("medmnist", npz, partition=k, num_partitions=3),
                                task).train) for k in range(3)]
    assert sum(sizes) == 546 and max(sizes) - min(sizes) <= 1
    hold = load_holdout(DataSpec("medmnist", npz), task)
    assert len(hold) == 156 and hold[0][0].shape == (1, 28, 28)


def test_adrenal3d_and_pneumonia(data_dir: Path) -> None:
    adr = load_partition(DataSpec("medmnist", data_dir / "medmnist_adrenal3d" /
                                  "adrenalmnist3d.npz"), TASK_PRESETS["adrenalmnist3d"])
    assert len(adr.train) == 1188 and adr.train[0][0].shape == (1, 28, 28, 28)
    pn = load_partition(DataSpec("medmnist", data_dir / "medmnist_pneumonia" /
                                 "pneumoniamnist_balanced_aksufatih.npz"),
                        TASK_PRESETS["pneumoniamnist"])
    assert len(pn.train) == 2428


def test_broken_nifti_is_skipped_with_its_name(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "msd_hippocampus_udacity"
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        for name in ("hippocampus_001.nii.gz", "hippocampus_003.nii.gz",
                     "hippocampus_004.nii.gz", "hippocampus_006.nii.gz"):
            shutil.copy(src / sub / name, tmp_path / sub / name)
    broken = tmp_path / "images" / "hippocampus_004.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    (tmp_path / "images" / "orphan.nii.gz").write_bytes(b"not nifti")
    site = load_partition(DataSpec("nifti", tmp_path, holdout_fraction=0.0, val_fraction=0.0),
                          TASK_PRESETS["hippocampus"])
    reasons = dict(site.skipped)
    assert str(broken) in reasons and "NIfTI" in reasons[str(broken)]
    assert str(tmp_path / "images" / "orphan.nii.gz") in reasons
    assert len(site.train) == 3  # the rest of the cohort is still there


def test_not_an_npz_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    bad.write_text("hello")
    with pytest.raises(DataError) as exc:
        load_partition(DataSpec("medmnist", bad), TASK_PRESETS["breastmnist"])
    assert str(bad) in str(exc.value) and "Fix:" in str(exc.value)
