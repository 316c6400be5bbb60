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

A task's own ``spacing`` (mm per axis of its input shape: (column, row, slice) for a 3D
task, the NIfTI reader's (i, j, k)) applies to a PACS site as to a NIfTI one, so every
site and the server's held-out cases share one grid: it wins over the site's ``[data]
spacing``, which stays the site's choice only for tasks without one. A site whose own
spacing contradicts the task's (another value on some axis) is refused with a ConfigError
naming both, rather than silently trained on another grid; the same value is accepted.

Native resolution (``sampling = "patches"``, 3D segmentation): the cache's cases are not
read here but streamed (fedpacs.common.patches): one :class:`PacsReader` per case, checked
first (its label, and the volume's shape from the file's header), read when the trainer
asks, resampled, windowed and z-scored as above but never fitted to the input shape. A
:class:`PacsCase` holds one volume path per channel, so a case can later stack several
series of a study (today: one series, one channel).

Train/validation split by patient, never by series: each volume belongs to a group, the
patient key stored at conversion (fedpacs.client.volumes; a keyed hash, never the
PatientID), overridden by the manifest's ``group`` (or ``PatientID``) column for its rows;
a volume with neither (converted before patient keys) falls back to its
StudyInstanceUID, and the data summary counts those. The groups are partitioned and split
(fedpacs.common.datasets), then expanded to their series, so every series of one patient
is in one partition and one of train/validation; deterministic for a seed, independent of
file order. ``val_fraction`` is a fraction of groups, not of series.

Multi-channel cases (``[data] channels``, fedpacs.client.channels): the series of one
study matching the channel rules are one case, named (for its label, patient group and
split) by its channel-0 series, every other channel resampled onto channel 0's grid in
patient space; each channel is then prepared (spacing, CT window for a CT channel) and
z-scored on its own. A case whose channel count is not the task's ``in_channels`` is
skipped with the reason, as are studies the rules cannot form (``missing-channel``,
``ambiguous-channel``, ``channel-off-grid``).
"""

from __future__ import annotations

import csv
import logging
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedpacs.client.channels import ChannelCase, group_channels, load_channels, read_series
from fedpacs.client.config import PacsPreprocess
from fedpacs.client.dicom import prepare_image, prepare_mask
from fedpacs.client.volumes import (
    cache_salt,
    list_volumes,
    load_label,
    load_volume,
    patient_key,
    stored_patient_key,
    volume_meta,
)
from fedpacs.common.datasets import (
    DataSpec,
    SiteData,
    check_sampling,
    compact_labels,
    empty_dataset,
    fit_to_shape,
    load_partition,
    partition_ids,
    read_nifti,
    resize,
    split_ids,
    zscore,
)
from fedpacs.common.errors import ConfigError, DataError, FieldError
from fedpacs.common.patches import CaseDataset, PatchDataset
from fedpacs.common.tasks import TaskConfig

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("group", "PatientID")  # manifest columns that group series, first wins


@dataclass
class PacsSiteData(SiteData):
    """A PACS site's data plus notes for the data summary (printed by `site check`; local
    only, like the skipped files: never sent)."""

    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PacsSplit:
    """Which volumes (by SeriesInstanceUID) one partition trains and validates on."""

    train: list[str]
    val: list[str]
    groups: dict[str, str]  # volume -> its group (in memory only: never written or sent)
    no_patient_key: int  # volumes grouped by their StudyInstanceUID: no key, no manifest group


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
    out: dict[str, int | Path] = {}
    for i, row in enumerate(_manifest_rows(path), start=2):
        uid = _row_uid(row)
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


def read_manifest_groups(path: Path) -> dict[str, tuple[str, str]]:
    """UID -> (column, value) from a label manifest's ``group`` (or ``PatientID``) column,
    for the rows that give one ({} when the manifest has neither column)."""
    out: dict[str, tuple[str, str]] = {}
    for row in _manifest_rows(path):
        uid = _row_uid(row)
        for column in GROUP_COLUMNS:
            value = str(row.get(column) or "").strip()
            if uid and value:
                out[uid] = (column, value)
                break
    return out


def _manifest_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        raise DataError(str(path), f"cannot read the label manifest ({exc.strerror})",
                        "set data.labels to the CSV of labels") from exc


def _row_uid(row: Mapping[str, str | None]) -> str:
    return str(row.get("SeriesInstanceUID") or row.get("StudyInstanceUID") or "").strip()


def volume_groups(paths: list[Path], manifest_groups: Mapping[str, tuple[str, str]],
                  salt: bytes | None) -> tuple[dict[str, str], int]:
    """Volume id (file stem = SeriesInstanceUID) -> its group, and how many volumes fell
    back to their StudyInstanceUID. A manifest row of the series (else of its study)
    decides first: a ``group`` value as it is, a ``PatientID`` hashed like a stored key
    (so it joins that patient's other series); then the volume's own patient key; then its
    StudyInstanceUID. Group kinds are prefixed, so a value of one never equals another."""
    groups: dict[str, str] = {}
    fallback = 0
    for p in paths:
        meta = volume_meta(p)
        study = str(meta.get("study_uid") or "")
        given = manifest_groups.get(str(meta.get("series_uid") or p.stem)) or \
            manifest_groups.get(study)
        key = stored_patient_key(meta, salt)
        if given is not None and given[0] == "group":
            groups[p.stem] = f"group:{given[1]}"
        elif given is not None:
            groups[p.stem] = f"patient:{patient_key(salt or b'', given[1])}"
        elif key:
            groups[p.stem] = f"patient:{key}"
        else:
            groups[p.stem] = f"study:{study or p.stem}"
            fallback += 1
    return groups, fallback


def split_groups(groups: Mapping[str, str], *, partition: int, num_partitions: int,
                 val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) volume ids of one partition: the groups are partitioned and split
    (as fedpacs.common.datasets splits case IDs), then expanded to their volumes, so the
    volumes of one group are never on two sides. Each group takes part under its smallest
    volume id, so the split depends on the volumes alone, not on the cache's salt (a
    rebuilt cache splits alike; one series per patient splits as series did), and not on
    their order."""
    members: dict[str, list[str]] = defaultdict(list)
    for vid, group in groups.items():
        members[group].append(vid)
    by_first = {min(vids): vids for vids in members.values()}
    mine = partition_ids(list(by_first), partition=partition, num_partitions=num_partitions,
                         seed=seed)
    train, val = split_ids(mine, holdout_fraction=val_fraction, seed=seed + 7)
    return (sorted(v for first in train for v in by_first[first]),
            sorted(v for first in val for v in by_first[first]))


def pacs_split(spec: DataSpec, paths: list[Path] | None = None) -> PacsSplit:
    """The patient-level split of a PACS cache for ``spec`` (see the module docstring):
    of ``paths`` (the cases' channel-0 volumes), by default every converted volume."""
    paths = list_volumes(spec.root) if paths is None else paths
    if not paths:
        raise DataError(str(spec.root), "no converted volumes in volumes/",
                        "run `fedpacs site ingest` first")
    manifest = read_manifest_groups(spec.labels) if spec.labels is not None else {}
    groups, fallback = volume_groups(paths, manifest, cache_salt(spec.root))
    train, val = split_groups(groups, partition=spec.partition,
                              num_partitions=spec.num_partitions,
                              val_fraction=spec.val_fraction, seed=spec.seed)
    return PacsSplit(train, val, groups, fallback)


def no_key_note(split: PacsSplit) -> str:
    """The data summary's line on volumes without a patient key ("" when none)."""
    if not split.no_patient_key:
        return ""
    return (f"{split.no_patient_key} of {len(split.groups)} volumes have no patient key "
            "(converted before patient keys, or no PatientID) and no group in the label "
            "manifest: each is grouped by its StudyInstanceUID, so two studies of one "
            "patient can fall on both sides of the split. Fix: run `fedpacs site ingest` "
            "again (it converts them again with a key) or add a group column to the "
            "label manifest")


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


def series_mask(root: Path, label: int | Path | None, series_uid: str,
                volume_shape: tuple[int, ...], num_classes: int) -> np.ndarray | None:
    """A segmentation series' mask: the label manifest's NIfTI, else the label map the
    ingest made from a DICOM SEG/RTSTRUCT of the series (fedpacs.client.volumes); None
    when neither exists. A mask off the series' grid or with values outside the task's
    classes is a DataError naming its file."""
    if isinstance(label, Path):
        return read_mask(label, volume_shape, num_classes)
    found = load_label(root, series_uid)
    if found is None:
        return None
    mask, _ = found
    if mask.shape != volume_shape or mask.min() < 0 or mask.max() >= num_classes:
        raise DataError(f"labels/{series_uid}.npz", f"label map {mask.shape} with values "
                        f"{mask.min()}..{mask.max()} for a series of shape {volume_shape} "
                        f"and classes 0..{num_classes - 1}", "run `fedpacs site ingest` "
                        "again, or map the SEG's segments onto the task's classes")
    return mask


def case_volumes(volumes: tuple[Path, ...]) -> tuple[np.ndarray, dict[str, Any],
                                                     tuple[str, ...]]:
    """A case's image (channel, slice, row, column) on its channel-0 grid, channel 0's
    meta (as :func:`load_volume` gives it) and each channel's modality. One volume is read
    as it is; several are stacked by fedpacs.client.channels (DataError
    ``channel-off-grid`` when one does not overlap channel 0)."""
    if len(volumes) == 1:
        arr, meta = load_volume(volumes[0])
        return arr[None], meta, (str(meta["modality"]),)
    series = tuple(read_series(p) for p in volumes)
    arr, meta = load_channels(ChannelCase(series[0].study_uid, series, ()))
    return arr, meta, tuple(x.modality for x in series)


def prepared_channels(image: np.ndarray, meta: dict[str, Any], modalities: tuple[str, ...],
                      preprocess: PacsPreprocess) -> list[np.ndarray]:
    """Each channel (slice, row, column) resampled/windowed by :func:`prepare_image` (the
    CT window on CT channels only) and z-scored on its own."""
    return [zscore(prepare_image(c, meta["spacing"], modality=m, preprocess=preprocess))
            for c, m in zip(image, modalities, strict=True)]


def channel_problem(case: PacsCase, task: TaskConfig) -> str:
    """Why a case cannot feed the task's input channels ("" when it can)."""
    if len(case.volumes) == task.in_channels:
        return ""
    return (f"{len(case.volumes)} channel(s) ({len(case.volumes)} series), task "
            f"{task.name!r} expects in_channels = {task.in_channels}: set [data] channels "
            "to one SeriesDescription pattern per input channel")


def checked_mask(root: Path, label: Path | None, series_uid: str,
                 shape: tuple[int, ...], num_classes: int, item: Path
                 ) -> tuple[np.ndarray | None, tuple[str, str]]:
    """:func:`series_mask`, or None and the skip (file, reason) saying why there is none."""
    try:
        found = series_mask(root, label, series_uid, shape, num_classes)
    except DataError as err:
        return None, (err.path, err.problem)
    if found is None:
        return None, (str(item), "no mask: the series is not in the label manifest and no "
                      "SEG/RTSTRUCT of it was ingested")
    return found, ("", "")


def _pacs_arrays(root: Path, cases: list[PacsCase], labels: dict[str, int | Path],
                 task: TaskConfig, preprocess: PacsPreprocess
                 ) -> tuple[TensorDataset, list[tuple[str, str]]]:
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    skipped: list[tuple[str, str]] = []
    for case in cases:
        p = case.volumes[0]
        problem = channel_problem(case, task)
        if problem:
            skipped.append((str(p), problem))
            continue
        try:
            image, meta, modalities = case_volumes(case.volumes)
        except DataError as err:
            skipped.append((err.path, f"{err.kind}: {err.problem}"))
            continue
        shape = tuple(int(n) for n in image.shape[1:])  # channel 0's grid: the mask's
        label = labels.get(meta["series_uid"], labels.get(meta["study_uid"]))
        if label is None and task.kind != "segmentation":
            skipped.append((str(p), "series not in the label manifest"))
            continue
        vols = prepared_channels(image, meta, modalities, preprocess)
        del image
        if task.kind == "segmentation":
            if isinstance(label, int):
                skipped.append((str(p), "manifest gives a class, the task needs a mask"))
                continue
            found, why = checked_mask(root, label, str(meta["series_uid"]), shape,
                                      task.num_classes, p)
            if found is None:
                skipped.append(why)
                continue
            mask = prepare_mask(found, meta["spacing"], preprocess=preprocess)
            if task.spatial_dims == 3:  # as fedpacs.common.datasets reads a NIfTI case
                xs.append(np.stack([fit_to_shape(np.transpose(v), task.input_shape)
                                    for v in vols]))
                ys.append(fit_to_shape(np.transpose(mask), task.input_shape)[None])
                continue
            for k, m in enumerate(mask):
                xs.append(np.stack([resize(v[k], task.input_shape) for v in vols]))
                ys.append(resize(m, task.input_shape, nearest=True)[None])
            continue
        if not isinstance(label, int) or not 0 <= label < task.num_classes:
            skipped.append((str(p), f"label {label} outside 0..{task.num_classes - 1}"))
            continue
        depth = 1 if task.spatial_dims == 3 else len(vols[0])
        for k in range(depth):
            xs.append(np.stack([resize(v if task.spatial_dims == 3 else v[k],
                                       task.input_shape) for v in vols]))
            ys.append(label)
    if not xs:
        return empty_dataset(task), skipped
    y = torch.from_numpy(np.stack(ys)) if task.kind == "segmentation" else torch.tensor(
        ys, dtype=torch.long)
    return TensorDataset(torch.from_numpy(np.stack(xs)), y), skipped


def task_preprocess(task: TaskConfig, preprocess: PacsPreprocess) -> PacsPreprocess:
    """The site's ``[data]`` preprocessing with the task's ``spacing`` (when it sets one)
    as the volumes' target spacing, in the volumes' (slice, row, column) order; a site
    spacing that contradicts it is a ConfigError (see the module docstring)."""
    if not task.spacing or task.spatial_dims != 3:
        return preprocess
    target = tuple(float(x) for x in reversed(task.spacing))
    if preprocess.spacing is not None and not np.allclose(preprocess.spacing, target):
        raise ConfigError("site config [data]", [FieldError(
            "data.spacing", f"nothing, or the run task {task.name!r}'s spacing "
            f"{list(target)} (slice, row, column; the task's {list(task.spacing)} is "
            "(column, row, slice))", repr(list(preprocess.spacing)),
            "remove spacing from the site's [data] table (the task's spacing applies to "
            "every site), or join runs of a task without spacing")])
    return replace(preprocess, spacing=target)


def npz_array_shape(path: Path) -> tuple[int, ...]:
    """The shape of a converted volume's array from its .npy header, no voxels read."""
    try:
        with zipfile.ZipFile(path) as z, z.open("array.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, _ = reader(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(str(path), f"not a readable converted volume ({type(exc).__name__})",
                        "run `fedpacs site ingest` again") from exc
    return tuple(int(n) for n in shape)


@dataclass(frozen=True)
class PacsCase:
    """One case of a PACS cache: its volumes, one per channel (today one series), and the
    manifest's label for it (a mask NIfTI; None: the cache's label map of the first)."""

    case_id: str
    volumes: tuple[Path, ...]
    label: Path | None
    root: Path


@dataclass(frozen=True)
class PacsReader:
    """One PACS case streamed from the cache (:class:`fedpacs.common.patches.CaseReader`):
    volumes resampled/windowed (:func:`prepare_image`) and z-scored, mask resampled
    (nearest), laid out (column, row, slice) as the NIfTI reader's cases are."""

    case: PacsCase
    task: TaskConfig
    preprocess: PacsPreprocess

    @property
    def case_id(self) -> str:
        return self.case.case_id

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        image, meta, modalities = case_volumes(self.case.volumes)
        found = series_mask(self.case.root, self.case.label, str(meta["series_uid"]),
                            tuple(int(n) for n in image.shape[1:]), self.task.num_classes)
        if found is None:  # (checked by pacs_readers; the cache changed since)
            raise DataError(str(self.case.volumes[0]), "no mask for the series any more",
                            "run the site again after `fedpacs site ingest`")
        mask = prepare_mask(found, meta["spacing"], preprocess=self.preprocess)
        channels = prepared_channels(image, meta, modalities, self.preprocess)
        del image
        return (np.stack([np.transpose(c) for c in channels]),
                compact_labels(np.transpose(mask), self.task.num_classes)[None])


def pacs_readers(root: Path, cases: list[PacsCase], labels: dict[str, int | Path],
                 task: TaskConfig, preprocess: PacsPreprocess
                 ) -> tuple[list[PacsReader], list[tuple[str, str]]]:
    """A reader per usable segmentation case (its mask read once to check it, then
    dropped; channel 0's shape from its file's header), the others skipped with the
    reason."""
    readers: list[PacsReader] = []
    skipped: list[tuple[str, str]] = []
    for case in cases:
        p = case.volumes[0]
        meta = volume_meta(p)
        uid = str(meta.get("series_uid") or p.stem)
        label = labels.get(uid, labels.get(str(meta.get("study_uid"))))
        if isinstance(label, int):
            skipped.append((str(p), "manifest gives a class, the task needs a mask"))
            continue
        problem = channel_problem(case, task)
        if problem:
            skipped.append((str(p), problem))
            continue
        try:
            shape = npz_array_shape(p)
        except DataError as err:
            skipped.append((err.path, err.problem))
            continue
        found, why = checked_mask(root, label, uid, shape, task.num_classes, p)
        if found is None:
            skipped.append(why)
            continue
        del found  # (read to check it; the reader reads it again when asked)
        readers.append(PacsReader(replace(case, label=label), task, preprocess))
    return readers, skipped


def pacs_cases(root: Path, preprocess: PacsPreprocess
               ) -> tuple[dict[str, PacsCase], list[tuple[str, str]], list[str]]:
    """The cache's cases by id (channel 0's SeriesInstanceUID): one per volume, or with
    ``[data] channels`` one per study that has every channel; the studies skipped (as
    ``"code: why"``) and the notes for the data summary (a rule that matched several
    series, a channel covering part of the grid)."""
    paths = list_volumes(root)
    if not preprocess.channels:
        return {p.stem: PacsCase(p.stem, (p,), None, root) for p in paths}, [], []
    grouped, skips = group_channels(paths, preprocess.channels)
    cases = {c.volume_id: PacsCase(c.volume_id, tuple(x.path for x in c.series), None, root)
             for c in grouped}
    notes = [n for c in grouped for n in c.notes]
    return cases, [(k.item, f"{k.kind}: {k.reason}") for k in skips], notes


def _pacs_site(spec: DataSpec, task: TaskConfig, preprocess: PacsPreprocess) -> PacsSiteData:
    if spec.labels is None and task.kind != "segmentation":
        raise DataError(str(spec.root), "no label manifest", "set data.labels to a CSV")
    check_sampling(task, spec.format, spec.root)
    preprocess = task_preprocess(task, preprocess)
    labels = read_label_manifest(spec.labels) if spec.labels is not None else {}
    cases, skipped, notes = pacs_cases(spec.root, preprocess)
    split = pacs_split(spec, [c.volumes[0] for c in cases.values()])
    train_cases = [cases[i] for i in split.train]
    val_cases = [cases[i] for i in split.val]
    train: PatchDataset | TensorDataset
    val: CaseDataset | TensorDataset
    if task.sampling == "patches":
        train_readers, s1 = pacs_readers(spec.root, train_cases, labels, task, preprocess)
        val_readers, s2 = pacs_readers(spec.root, val_cases, labels, task, preprocess)
        train, val = PatchDataset(train_readers, task), CaseDataset(val_readers)
    else:
        train, s1 = _pacs_arrays(spec.root, train_cases, labels, task, preprocess)
        val, s2 = _pacs_arrays(spec.root, val_cases, labels, task, preprocess)
    note = no_key_note(split)
    if note:
        log.warning("%s: %s", spec.root, note)
    for n in notes:
        log.info("%s: %s", spec.root, n)
    return PacsSiteData(train, val, skipped + s1 + s2,
                        notes=([note] if note else []) + notes)
