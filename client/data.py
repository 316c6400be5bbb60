"""A site's data: the shared formats (fedpacs.common.datasets) plus its own PACS cache.

The PACS cache holds the volumes ``fedpacs site ingest`` converted (format owned by
fedpacs.client.volumes) and a label manifest (CSV) naming each series' class or mask; a
2D task trains on the series' slices, a 3D task on whole volumes resized to the task's
input shape, except 3D segmentation: its volumes and masks are laid out and fitted as the
NIfTI reader of fedpacs.common.datasets does (axes (column, row, slice), a NIfTI voxel's
(i, j, k); centre crop/zero pad), so a PACS site's samples are a NIfTI site's and match
the server's held-out cases. The site config's ``[data] spacing`` and ``window`` (a
:class:`~fedpacs.client.dicom.PacsPreprocess`) resample each volume (its mask with nearest)
and window CT volumes before they are normalised and fitted to the input shape.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedpacs.client.config import PacsPreprocess
from fedpacs.client.dicom import prepare_image, prepare_mask
from fedpacs.client.volumes import list_volumes, load_volume
from fedpacs.common.datasets import (
    DataSpec,
    SiteData,
    empty_dataset,
    fit_to_shape,
    load_partition,
    partition_ids,
    read_nifti,
    resize,
    split_ids,
    zscore,
)
from fedpacs.common.errors import DataError
from fedpacs.common.tasks import TaskConfig

log = logging.getLogger(__name__)


def load_site_data(spec: DataSpec, task: TaskConfig, *,
                   preprocess: PacsPreprocess | None = None) -> SiteData:
    """The training and validation sets of one site, from any format a site reads.

    ``preprocess`` (the site config's ``SiteConfig.preprocess``) applies to PACS volumes;
    None keeps them as converted.
    """
    if spec.format == "pacs":
        return _pacs_site(spec, task, preprocess or PacsPreprocess())
    return load_partition(spec, task)


def read_label_manifest(path: Path) -> dict[str, int | Path]:
    """UID -> label from a CSV keyed by SeriesInstanceUID (or StudyInstanceUID).

    Classification: a ``label`` column of class indices. Segmentation: a ``mask`` column
    naming a NIfTI mask on the series' grid (relative to the CSV's folder).
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise DataError(str(path), f"cannot read the label manifest ({exc.strerror})",
                        "set data.labels to the CSV of labels") from exc
    out: dict[str, int | Path] = {}
    for i, row in enumerate(rows, start=2):
        uid = (row.get("SeriesInstanceUID") or row.get("StudyInstanceUID") or "").strip()
        if row.get("mask"):
            mask = Path(str(row["mask"]).strip())
            out[uid] = mask if mask.is_absolute() else path.parent / mask
            continue
        try:
            out[uid] = int(str(row.get("label", "")).strip())
        except ValueError:
            raise DataError(f"{path}:{i}", f"label {row.get('label')!r} is not an integer",
                            "write class indices 0..num_classes-1") from None
        if not uid:
            raise DataError(f"{path}:{i}", "no SeriesInstanceUID/StudyInstanceUID",
                            "give each row a UID column") from None
    return out


def read_mask(path: Path, volume_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """A NIfTI mask (x=column, y=row, z=slice) as a (slice, row, column) label array."""
    mask = np.transpose(read_nifti(path)).astype(np.int64)
    if mask.shape != volume_shape:
        raise DataError(str(path), f"mask shape {mask.shape} (slice, row, column) != series "
                        f"shape {volume_shape}", "export the mask on the series' own grid")
    if mask.min() < 0 or mask.max() >= num_classes:
        raise DataError(str(path), f"mask values {mask.min()}..{mask.max()} outside "
                        f"0..{num_classes - 1}", "remap the mask labels")
    return mask


def _pacs_arrays(paths: list[Path], labels: dict[str, int | Path], task: TaskConfig,
                 preprocess: PacsPreprocess) -> tuple[TensorDataset, list[tuple[str, str]]]:
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    skipped: list[tuple[str, str]] = []
    for p in paths:
        arr, meta = load_volume(p)
        label = labels.get(meta["series_uid"], labels.get(meta["study_uid"]))
        if label is None:
            skipped.append((str(p), "series not in the label manifest"))
            continue
        vol = zscore(prepare_image(arr, meta["spacing"], modality=str(meta["modality"]),
                                   preprocess=preprocess))
        if task.kind == "segmentation":
            if not isinstance(label, Path):
                skipped.append((str(p), "manifest gives a class, the task needs a mask"))
                continue
            try:
                mask = prepare_mask(read_mask(label, arr.shape, task.num_classes),
                                    meta["spacing"], preprocess=preprocess)
            except DataError as err:
                skipped.append((err.path, err.problem))
                continue
            if task.spatial_dims == 3:  # as fedpacs.common.datasets reads a NIfTI case
                xs.append(fit_to_shape(np.transpose(vol), task.input_shape)[None])
                ys.append(fit_to_shape(np.transpose(mask), task.input_shape)[None])
                continue
            for v, m in zip(vol, mask, strict=True):
                xs.append(resize(v, task.input_shape)[None])
                ys.append(resize(m, task.input_shape, nearest=True)[None])
            continue
        if not isinstance(label, int) or not 0 <= label < task.num_classes:
            skipped.append((str(p), f"label {label} outside 0..{task.num_classes - 1}"))
            continue
        samples = [vol] if task.spatial_dims == 3 else list(vol)
        for s in samples:
            xs.append(resize(s, task.input_shape)[None])
            ys.append(label)
    if not xs:
        return empty_dataset(task), skipped
    y = torch.from_numpy(np.stack(ys)) if task.kind == "segmentation" else torch.tensor(
        ys, dtype=torch.long)
    return TensorDataset(torch.from_numpy(np.stack(xs)), y), skipped


def _pacs_site(spec: DataSpec, task: TaskConfig, preprocess: PacsPreprocess) -> SiteData:
    if spec.labels is None:
        raise DataError(str(spec.root), "no label manifest", "set data.labels to a CSV")
    labels = read_label_manifest(spec.labels)
    by_id = {p.stem: p for p in list_volumes(spec.root)}
    if not by_id:
        raise DataError(str(spec.root), "no converted volumes in volumes/",
                        "run `fedpacs site ingest` first")
    mine = partition_ids(list(by_id), partition=spec.partition,
                         num_partitions=spec.num_partitions, seed=spec.seed)
    train_ids, val_ids = split_ids(mine, holdout_fraction=spec.val_fraction, seed=spec.seed + 7)
    train, s1 = _pacs_arrays([by_id[i] for i in train_ids], labels, task, preprocess)
    val, s2 = _pacs_arrays([by_id[i] for i in val_ids], labels, task, preprocess)
    return SiteData(train, val, s1 + s2)


