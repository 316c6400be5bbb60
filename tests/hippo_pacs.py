"""Each hospital's part of the hippocampus task, served from its own PACS (test support).

The MSD hippocampus cases exist only as NIfTI. :func:`write_case_dicom` turns one case into
an MR series (MR Image Storage, one instance per slice) that ``fedpacs site ingest``
converts back voxel for voxel: a NIfTI voxel (i, j, k) is column i, row j of slice k, so
the converted volume (slice, row, column) is ``np.transpose`` of the NIfTI array, which is
the grid :func:`fedpacs.client.data.read_mask` reads the case's label NIfTI on. Geometry
comes from the NIfTI affine (RAS, turned into DICOM's LPS); pixel values are stored so that
the ingest's modality LUT gives back the NIfTI's values (:func:`encode_pixels`).

:func:`hospital_holdings` writes the cases a ``format = "nifti"`` site of the same
partition would train on (the split functions of fedpacs.common.datasets), so hospitals
hold disjoint parts and the server's held-out cases are in no hospital's PACS.
:func:`write_pacs_site_config` writes that hospital's site config (``format = "pacs"``)
and its label manifest (SeriesInstanceUID -> label NIfTI), which the ingest does not read:
it is written before the ingest, from the UIDs the DICOM was written with.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import tomli_w
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from fedpacs.client.dicom import modality_lut
from fedpacs.client.pacs import PacsConfig
from fedpacs.common.datasets import list_nifti_cases, partition_ids, read_nifti, split_ids

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
SERIES_DESCRIPTION = "hippocampus T1"
TASK = "hippocampus"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI world (RAS) -> DICOM patient (LPS)
UINT16_MAX = 65535
LATTICE_ULPS = 64  # float32 neighbours of the fitted step tried by the lattice search


# --------------------------------------------------------------------------- pixels
@dataclass(frozen=True)
class PixelEncoding:
    """Stored 16-bit values and the RescaleSlope/Intercept (DS text) that give ``arr`` back
    through the ingest's modality LUT. ``exact``: they give it back bit for bit;
    otherwise within ``slope / 2`` (a 16-bit quantisation)."""

    stored: np.ndarray  # uint16 or int16, the NIfTI's shape
    slope: str
    intercept: str
    exact: bool

    @property
    def rescaled(self) -> bool:
        """Stored values differ from the image's: the instances need RescaleSlope/Intercept."""
        return float(self.slope) != 1.0 or float(self.intercept) != 0.0

    @property
    def signed(self) -> bool:
        return self.stored.dtype == np.int16

    def decoded(self) -> np.ndarray:
        """The values the ingest computes (fedpacs.client.dicom.modality_lut)."""
        return modality_lut(self._rescale(), self.stored)

    def _rescale(self) -> Dataset:
        ds = Dataset()
        ds.RescaleSlope = self.slope
        ds.RescaleIntercept = self.intercept
        return ds


def _ds_text(value: float) -> str:
    """A number as DICOM DS text (<= 16 characters) that reads back as the same float32."""
    text = str(np.float32(value))
    if len(text) > 16 or np.float32(float(text)) != np.float32(value):
        text = format_number_as_ds(float(value))
    return text


def _encoding(arr: np.ndarray, stored: np.ndarray, slope: float, intercept: float
              ) -> PixelEncoding:
    enc = PixelEncoding(stored, _ds_text(slope), _ds_text(intercept), exact=False)
    exact = np.array_equal(enc.decoded(), arr.astype(np.float32))
    return PixelEncoding(stored, enc.slope, enc.intercept, exact=exact)


def _integer_dtype(lo: float, hi: float) -> type[np.integer[Any]] | None:
    if lo >= 0 and hi <= UINT16_MAX:
        return np.uint16
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return np.int16
    return None


def _lattice(arr: np.ndarray) -> PixelEncoding | None:
    """``arr`` as float32(n) * step for 16-bit integers n (how the MSD float32 images were
    made from integer scans), when such a float32 step exists."""
    u = np.unique(arr).astype(np.float64)
    if len(u) < 2:
        return None
    step = float(np.diff(u).min())
    for _ in range(2):  # least squares over all levels refines the smallest gap
        n = np.round(u / step)
        step = float((u * n).sum() / (n * n).sum())
    n = np.round(u / step)
    dtype = _integer_dtype(float(n.min()), float(n.max()))
    if dtype is None:
        return None
    target = u.astype(np.float32)
    levels = n.astype(np.float32)
    lo = hi = np.float32(step)
    candidates = [lo]
    for _ in range(LATTICE_ULPS):  # the float32 steps nearest the fitted one, nearest first
        lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
        candidates += [lo, hi]
    for candidate in candidates:
        if np.array_equal(levels * candidate, target):
            enc = _encoding(arr, np.round(arr / np.float64(candidate)).astype(dtype),
                            float(candidate), 0.0)
            if enc.exact:
                return enc
    return None


def encode_pixels(arr: np.ndarray) -> PixelEncoding:
    """16-bit stored values for a NIfTI image, exact where 16 bits can hold it.

    1. integers that fit uint16 (else int16): stored as they are, slope 1, intercept 0;
    2. floats on a lattice ``n * step`` (the MSD float32 images): n, with slope = step;
    3. anything else: a linear 16-bit quantisation of [min, max] (``exact`` False).

    Of the 260 MSD hippocampus images, 55 are uint8 (1.) and 204 float32 lattices (2.);
    hippocampus_311 has no single step and is quantised (off by at most 0.02 of 0..2256).
    """
    if not np.all(np.isfinite(arr)):
        raise ValueError("image has NaN/inf voxels: no DICOM pixel value holds them")
    lo, hi = float(arr.min()), float(arr.max())
    dtype = _integer_dtype(lo, hi)
    if dtype is not None and np.array_equal(arr, np.round(arr)):
        return _encoding(arr, arr.astype(dtype), 1.0, 0.0)
    lattice = _lattice(arr) if arr.dtype.kind == "f" else None
    if lattice is not None:
        return lattice
    slope = (hi - lo) / UINT16_MAX or 1.0
    stored = np.clip(np.round((arr.astype(np.float64) - lo) / slope), 0, UINT16_MAX)
    return _encoding(arr, stored.astype(np.uint16), slope, lo)


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class SeriesGeometry:
    """DICOM plane geometry of a NIfTI grid: column = voxel axis i, row = j, slice = k."""

    orientation: tuple[float, ...]  # ImageOrientationPatient: column step, row step (LPS)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) = (dj, di) in mm
    slice_spacing: float  # dk in mm
    positions: tuple[tuple[float, float, float], ...]  # ImagePositionPatient of each k


def series_geometry(affine: np.ndarray, depth: int) -> SeriesGeometry:
    """The slice geometry of a NIfTI affine (voxel -> RAS mm) with ``depth`` slices.

    Raises ValueError for a left-handed voxel grid: the ingest stacks slices along
    row x column, which would then reverse k (the mask would lie on the mirrored slice).
    """
    lps = RAS_TO_LPS @ np.asarray(affine, float)[:3, :]
    steps = lps[:, :3]
    sizes = np.linalg.norm(steps, axis=0)
    if np.any(sizes <= 0):
        raise ValueError(f"affine {affine.tolist()} has a zero voxel axis")
    u_col, u_row = steps[:, 0] / sizes[0], steps[:, 1] / sizes[1]
    if float(np.dot(steps[:, 2], np.cross(u_col, u_row))) <= 0:
        raise ValueError("left-handed voxel axes (det(affine) < 0): the ingest would stack "
                         "slice k in reverse; reorient the NIfTI (e.g. nibabel "
                         "as_closest_canonical) and its label first")
    corners = [lps @ np.array([0.0, 0.0, k, 1.0]) for k in range(depth)]
    return SeriesGeometry(
        orientation=tuple(float(v) for v in (*u_col, *u_row)),
        pixel_spacing=(float(sizes[1]), float(sizes[0])), slice_spacing=float(sizes[2]),
        positions=tuple((float(c[0]), float(c[1]), float(c[2])) for c in corners))


# --------------------------------------------------------------------------- DICOM
def _uid(*parts: str) -> UID:
    """A UID derived from ``parts`` (the same case always gets the same UIDs)."""
    return generate_uid(entropy_srcs=["fedpacs-hippocampus", *parts])


def _ds(values: Sequence[float]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def write_case_dicom(image_nii: Path, out_dir: Path, *, patient_id: str,
                     study_uid: str | None = None) -> tuple[str, list[Path]]:
    """One NIfTI image as an MR series in ``out_dir`` (one file per slice k); returns its
    (SeriesInstanceUID, files). UIDs are derived from ``patient_id`` and the file name."""
    arr = read_nifti(image_nii)  # the reader of the NIfTI site and of read_mask
    if arr.ndim != 3:
        raise ValueError(f"{image_nii}: a {arr.ndim}D image, a series needs 3D")
    affine = nib.load(str(image_nii)).affine  # type: ignore[attr-defined]
    geo = series_geometry(affine, arr.shape[2])
    enc = encode_pixels(arr)
    study_uid = study_uid or _uid(patient_id, "study")
    series_uid = _uid(patient_id, image_nii.name, "series")
    frame_uid = _uid(patient_id, image_nii.name, "frame")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(arr.shape[2]):
        sop_uid = _uid(series_uid, str(k))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.PatientBirthDate = ds.PatientSex = ""
        ds.StudyDate = ds.StudyTime = ds.StudyID = ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MSD Task04 hippocampus"
        ds.Modality = "MR"
        ds.SeriesNumber = 1
        ds.SeriesDescription = SERIES_DESCRIPTION
        ds.InstanceNumber = k + 1
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "NONE", ""
        ds.MRAcquisitionType = "3D"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = _ds(geo.positions[k])
        ds.ImageOrientationPatient = _ds(geo.orientation)
        ds.PixelSpacing = _ds(geo.pixel_spacing)
        ds.SliceThickness = ds.SpacingBetweenSlices = format_number_as_ds(geo.slice_spacing)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = int(enc.signed)
        if enc.rescaled:
            ds.RescaleSlope = enc.slope
            ds.RescaleIntercept = enc.intercept
            ds.RescaleType = "US"  # unspecified units (MR)
        plane = np.ascontiguousarray(enc.stored[:, :, k].T)  # (row j, column i)
        ds.add_new(0x7FE00010, "OW", plane.astype(plane.dtype.newbyteorder("<")).tobytes())
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return str(series_uid), files


# --------------------------------------------------------------------------- holdings
@dataclass(frozen=True)
class Holdings:
    """What one hospital's PACS holds: its partition of the hippocampus cases, as DICOM."""

    partition: int
    num_partitions: int
    case_ids: tuple[str, ...]
    series: Mapping[str, str]  # case ID -> SeriesInstanceUID
    masks: Mapping[str, Path]  # SeriesInstanceUID -> the case's label NIfTI
    files: tuple[Path, ...]  # every instance, for fedpacs.deploy.orthanc.store_files

    def write_labels(self, path: Path) -> Path:
        """The label manifest of a ``format = "pacs"`` site: SeriesInstanceUID -> mask."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["SeriesInstanceUID", "mask"])
            for uid, mask in sorted(self.masks.items()):
                w.writerow([uid, str(mask.resolve())])
        return path


def partition_cases(data_root: Path, *, partition: int, num_partitions: int,
                    holdout_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """The case IDs a ``format = "nifti"`` site of this partition trains and validates on
    (fedpacs.common.datasets.load_partition: the pool left by the held-out split, then
    this partition of it)."""
    cases, _ = list_nifti_cases(data_root)
    pool, _ = split_ids([c.case_id for c in cases], holdout_fraction=holdout_fraction,
                        seed=seed)
    return partition_ids(pool, partition=partition, num_partitions=num_partitions, seed=seed)


def hospital_holdings(data_root: Path, *, partition: int, num_partitions: int, out: Path,
                      holdout_fraction: float = 0.2, seed: int = 0,
                      max_cases: int | None = None) -> Holdings:
    """Write DICOM for the cases of ``partition`` (of ``num_partitions``) under ``out``:
    the cases a NIfTI site with the same [data] partition, num_partitions,
    holdout_fraction and seed gets (the first ``max_cases`` of them, by ID, when given)."""
    by_id = {c.case_id: c for c in list_nifti_cases(data_root)[0]}
    ids = partition_cases(data_root, partition=partition, num_partitions=num_partitions,
                          holdout_fraction=holdout_fraction, seed=seed)[:max_cases]
    series: dict[str, str] = {}
    masks: dict[str, Path] = {}
    files: list[Path] = []
    for cid in ids:
        case = by_id[cid]
        assert case.label is not None  # list_nifti_cases pairs every case with its label
        uid, written = write_case_dicom(case.image, out / cid, patient_id=cid)
        series[cid] = uid
        masks[uid] = case.label
        files += written
    return Holdings(partition, num_partitions, tuple(ids), series, masks, tuple(files))


# --------------------------------------------------------------------------- site config
def write_pacs_site_config(home: Path, *, name: str, pacs: PacsConfig, holdings: Holdings,
                           trusted_app_keys: Sequence[Path], require_secagg: bool = True,
                           val_fraction: float = 0.15, seed: int = 0, threads: int = 1,
                           cache_dir: str = "cache") -> Path:
    """``home/site.toml`` of a hippocampus site that trains on what it ingests from the
    PACS ``pacs`` describes (method c-get or c-move, its host, port and AE titles), and
    ``home/labels.csv`` (written now: the ingest does not read it, the config check wants
    it to exist). The site owns all of its cache (partition 0 of 1): its PACS holds only
    its own part. Returns the config's path, for ``fedpacs site ingest --config``."""
    home.mkdir(parents=True, exist_ok=True)
    holdings.write_labels(home / "labels.csv")
    config = {
        "site": {"name": name, "task": TASK},
        "data": {"format": "pacs", "root": cache_dir, "labels": "labels.csv",
                 "partition": 0, "num_partitions": 1, "val_fraction": val_fraction,
                 "seed": seed},
        "compute": {"threads": threads},
        "pacs": {**asdict(pacs), "cache_dir": cache_dir},
        "security": {"require_secagg": require_secagg,
                     "trusted_app_keys": [str(Path(k).resolve()) for k in trusted_app_keys]},
    }
    path = home / "site.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path
