"""DICOM SEG and RTSTRUCT -> label maps on the grid of the image series they reference.

A label series found by the ingest (``[cohort] labels``) is turned into one label map per
image series it references that this ingest converted (fedpacs.client.volumes
``labels/<image series>.npz``, int (slice, row, column) on that series' converted volume):

* SEG (binary or fractional; a fractional value counts when it is at least half of
  MaximumFractionalValue): each frame lands on a slice by its source image (per-frame
  DerivationImage/SourceImage ReferencedSOPInstanceUID and frame number), else by its plane
  position matched to the volume's slice positions (along the normal, within a tenth of
  the slice spacing); its Rows/Columns, pixel spacing, orientation and in-plane position
  must be the image's (else ``label-off-grid``).
* RTSTRUCT: each ROI's CLOSED_PLANAR contours (patient mm, LPS) are mapped to voxel
  coordinates through the slice's position and the volume's direction and spacing, and
  filled on their slice (skimage.draw.polygon: pixel centres inside the contour, or on it
  when the vertices lie on pixel centres); the contours of one ROI on one slice combine
  even-odd, so an inner contour is a hole. A contour off every slice is ``label-off-grid``.

Segment (ROI) -> class: with the task's class names known, the class whose name equals the
segment label (ROI name) case-insensitively, a segment matching none being
``label-classes``; without them, the segment number (ROI order, 1..n). Where segments
(ROIs) overlap, the later segment number (ROI order) wins.

Each problem is a :class:`DataError` naming the instance (local only), what is wrong and
the fix, with one of the reason codes below, which the ingest summary counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from fedpacs.client import volumes
from fedpacs.client.dicom import (
    LABEL_SOP_CLASSES,
    RTSTRUCT_STORAGE,
    SEG_STORAGE,
    frame_planes,
    read_dicom,
    shown,
    stored_frames,
    valid_uid,
)
from fedpacs.common.errors import DataError

# Reason codes of label series (counted in the ingest summary, safe to report centrally).
LABEL_UNMATCHED = "label-unmatched"  # references no image series this ingest converted
LABEL_OFF_GRID = "label-off-grid"    # does not lie on the referenced image series' grid
LABEL_UNREADABLE = "label-unreadable"  # a SEG/RTSTRUCT missing what a label map needs
LABEL_CLASSES = "label-classes"      # a segment/ROI that maps to no class of the task
LABEL_AMBIGUOUS = "label-ambiguous"  # two label instances for one image series
# Tolerances as a fraction of the grid spacing (DICOM positions are decimal strings).
SLICE_TOLERANCE = 0.1
PLANE_TOLERANCE = 0.1
MAX_CLASS = int(np.iinfo(np.int16).max)  # label maps are stored as int16
CONVERTER_VERSION = "1"  # part of a label map's fingerprint: a new converter makes it again

FIX_REFERENCE = ("export the SEG/RTSTRUCT from the image series in the [cohort], or widen "
                  "the [cohort] to that image series")


@dataclass
class ImageGrid:
    """The converted volume of one image series as a label map must lie on it: ``slice_z``
    (position of each slice along the normal), ``slice_pos`` (each slice's
    ImagePositionPatient), and the position along the normal of each source frame
    ((SOP Instance UID, frame number from 1) -> z)."""

    series_uid: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (slice, row, column) mm
    direction: np.ndarray  # rows: row direction (column axis), column direction, normal
    slice_z: np.ndarray
    slice_pos: np.ndarray  # (slices, 3)
    sop_z: dict[tuple[str, int], float]
    fingerprint: str

    def slice_of(self, z: float) -> int | None:
        """The slice at ``z`` mm along the normal (within :data:`SLICE_TOLERANCE`)."""
        k = int(np.argmin(np.abs(self.slice_z - z)))
        return k if abs(float(self.slice_z[k]) - z) <= SLICE_TOLERANCE * self.spacing[0] \
            else None

    def in_plane(self, k: int, pos: np.ndarray) -> np.ndarray:
        """(row, column) of patient point ``pos`` (LPS mm) on slice ``k``."""
        v = pos - self.slice_pos[k]
        return np.array([float(np.dot(v, self.direction[1])) / self.spacing[1],
                         float(np.dot(v, self.direction[0])) / self.spacing[2]])


def image_grid(series_uid: str, volume_path: Path, files: list[Path]) -> ImageGrid:
    """The grid of a converted series, from its volume and its instances' headers; a
    DataError ``label-off-grid`` for a series without patient geometry."""
    arr, meta = volumes.load_volume(volume_path)
    direction = np.asarray(meta["direction"], float)
    spacing = tuple(float(v) for v in meta["spacing"])
    normal = direction[2]
    sop_z: dict[tuple[str, int], float] = {}
    positions: list[tuple[float, np.ndarray]] = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for i, plane in enumerate(frame_planes(ds, str(f))):
            if plane is None:
                raise DataError(series_uid, "the image series has no patient geometry "
                                "(ImagePositionPatient/ImageOrientationPatient)", "label maps "
                                "are made for image series with patient geometry only",
                                kind=LABEL_OFF_GRID)
            z = float(np.dot(plane[0], normal))
            sop_z[(f.stem, i + 1)] = z
            positions.append((z, plane[0]))
    positions.sort(key=lambda t: t[0])
    origin = np.asarray(meta["origin"], float)
    if len(positions) == arr.shape[0] and not meta.get("irregular_spacing"):
        slice_z = np.array([z for z, _ in positions])  # the slices are the instances
        slice_pos = np.stack([p for _, p in positions])
    else:  # resampled to a regular grid from the first slice
        steps = np.arange(arr.shape[0])[:, None] * spacing[0] * normal
        slice_pos = origin + steps
        slice_z = slice_pos @ normal
    return ImageGrid(series_uid, (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2])),
                     (spacing[0], spacing[1], spacing[2]), direction, slice_z, slice_pos,
                     sop_z, str(meta.get("fingerprint", "")))


@dataclass
class ImageIndex:
    """The image series a label may lie on (those this ingest converted): series UID ->
    (volume file, instance files); the instances' SOP UIDs are their file names."""

    series: dict[str, tuple[Path, list[Path]]]
    _grids: dict[str, ImageGrid] = field(default_factory=dict)
    _sops: dict[str, str] | None = None

    def series_of(self, sop_uid: str) -> str | None:
        if self._sops is None:
            self._sops = {f.stem: uid for uid, (_, files) in self.series.items()
                          for f in files}
        return self._sops.get(sop_uid)

    def grid(self, series_uid: str) -> ImageGrid:
        if series_uid not in self._grids:
            vol, files = self.series[series_uid]
            self._grids[series_uid] = image_grid(series_uid, vol, files)
        return self._grids[series_uid]


@dataclass(frozen=True)
class LabelMap:
    """One label map made from a label instance, for one image series."""

    image_series_uid: str
    mask: np.ndarray  # int16 (slice, row, column)
    classes: dict[str, int]  # segment label / ROI name -> class


# --------------------------------------------------------------------------- references
def label_kind(ds: Dataset) -> str:
    """"seg" or "rtstruct" for a label SOP class, else ""."""
    return LABEL_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")), "")


def _seq(ds: Dataset, keyword: str) -> list[Dataset]:
    try:
        value = ds.get(keyword)
    except (ValueError, KeyError, TypeError):
        return []
    return list(value) if value else []


def _uid_of(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    text = str(value) if value is not None else ""
    return text if valid_uid(text) else ""


def _frame_sources(group: Dataset) -> list[tuple[str, int]]:
    """(SOP Instance UID, frame number) of a SEG frame's source images."""
    out = []
    for deriv in _seq(group, "DerivationImageSequence"):
        for src in _seq(deriv, "SourceImageSequence"):
            sop = _uid_of(src, "ReferencedSOPInstanceUID")
            if sop:
                frames = src.get("ReferencedFrameNumber") or [1]
                frames = frames if isinstance(frames, Iterable) and not isinstance(
                    frames, str) else [frames]
                out += [(sop, int(n)) for n in frames]
    return out


def _contour_sops(contour: Dataset) -> list[str]:
    return [u for u in (_uid_of(c, "ReferencedSOPInstanceUID")
                        for c in _seq(contour, "ContourImageSequence")) if u]


def referenced(ds: Dataset) -> tuple[set[str], set[str]]:
    """(series UIDs, SOP Instance UIDs) a SEG or RTSTRUCT says it was made from."""
    series: set[str] = set()
    sops: set[str] = set()
    if label_kind(ds) == "seg":
        for item in _seq(ds, "ReferencedSeriesSequence"):
            series.add(_uid_of(item, "SeriesInstanceUID"))
        for group in _seq(ds, "PerFrameFunctionalGroupsSequence"):
            sops.update(s for s, _ in _frame_sources(group))
    else:
        for fr in _seq(ds, "ReferencedFrameOfReferenceSequence"):
            for st in _seq(fr, "RTReferencedStudySequence"):
                for se in _seq(st, "RTReferencedSeriesSequence"):
                    series.add(_uid_of(se, "SeriesInstanceUID"))
        for roi in _seq(ds, "ROIContourSequence"):
            for contour in _seq(roi, "ContourSequence"):
                sops.update(_contour_sops(contour))
    series.discard("")
    return series, sops


def targets(ds: Dataset, index: ImageIndex) -> list[str]:
    """The image series of ``index`` a label instance references (sorted)."""
    series, sops = referenced(ds)
    found = {s for s in series if s in index.series}
    found.update(t for t in (index.series_of(u) for u in sops) if t is not None)
    return sorted(found)


def fingerprint(source: Path, image_fingerprint: str, class_names: tuple[str, ...]) -> str:
    """What a label map is made from: the label instance, the image volume, the classes."""
    text = "|".join((source.name, image_fingerprint, ",".join(class_names), CONVERTER_VERSION))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- classes
def class_map(names: dict[int, str], class_names: tuple[str, ...], *, what: str,
              label: str) -> dict[int, int]:
    """Segment number (or ROI order) -> class: the class named like the segment
    (case-insensitively) when ``class_names`` are known, else the number itself."""
    out: dict[int, int] = {}
    wanted = {n.strip().casefold(): i for i, n in enumerate(class_names)}
    unknown = []
    for number, name in sorted(names.items()):
        cls = wanted.get(name.strip().casefold()) if class_names else number
        if cls is None or not 0 <= cls <= MAX_CLASS:
            unknown.append(f"{number} {shown(name)!r}")
        else:
            out[number] = cls
    if unknown:
        known = (f"of the task ({', '.join(class_names)})" if class_names
                 else f"number 1..{MAX_CLASS}")
        raise DataError(label, f"{what}(s) {', '.join(unknown)} match no class {known}",
                        f"name each {what} like one of the task's class_names, or add the "
                        "class to the task", kind=LABEL_CLASSES)
    return out


# --------------------------------------------------------------------------- SEG
def _segments(ds: Dataset, label: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in _seq(ds, "SegmentSequence"):
        try:
            number = int(item.SegmentNumber)
        except (AttributeError, TypeError, ValueError):
            raise DataError(label, "a segment without a SegmentNumber", "re-export the SEG",
                            kind=LABEL_UNREADABLE) from None
        out[number] = str(item.get("SegmentLabel", "") or "")
    if not out:
        raise DataError(label, "no SegmentSequence", "re-export the SEG",
                        kind=LABEL_UNREADABLE)
    return out


def _shared_item(ds: Dataset, group: Dataset, keyword: str) -> Dataset | None:
    for source in (group, (_seq(ds, "SharedFunctionalGroupsSequence") or [Dataset()])[0]):
        items = _seq(source, keyword)
        if items:
            return items[0]
    return None


def _floats(value: Any, n: int, label: str, what: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], float)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise DataError(label, f"{what} {shown(value)} is not {n} finite numbers",
                        "re-export the label instance", kind=LABEL_UNREADABLE)
    return out


def _check_plane(grid: ImageGrid, ds: Dataset, group: Dataset, label: str) -> None:
    """A SEG frame's orientation and pixel spacing, where given, are the image's."""
    ori = _shared_item(ds, group, "PlaneOrientationSequence")
    if ori is not None and "ImageOrientationPatient" in ori:
        o = _floats(ori.ImageOrientationPatient, 6, label, "ImageOrientationPatient")
        if not np.allclose(o, grid.direction[:2].ravel(), atol=1e-3):
            raise DataError(label, f"orientation {o.round(4).tolist()} is not the image "
                            f"series' {grid.direction[:2].ravel().round(4).tolist()}",
                            "export the SEG on the image series' own grid",
                            kind=LABEL_OFF_GRID)
    measures = _shared_item(ds, group, "PixelMeasuresSequence")
    if measures is not None and "PixelSpacing" in measures:
        ps = _floats(measures.PixelSpacing, 2, label, "PixelSpacing")
        if not np.allclose(ps, grid.spacing[1:], rtol=1e-3):
            raise DataError(label, f"pixel spacing {ps.tolist()} mm is not the image "
                            f"series' {list(grid.spacing[1:])}", "export the SEG on the "
                            "image series' own grid", kind=LABEL_OFF_GRID)


def _frame_slice(grid: ImageGrid, ds: Dataset, group: Dataset, sources: list[tuple[str, int]],
                 label: str, i: int) -> int:
    """The slice of ``grid`` frame ``i`` lies on (by source image, else plane position)."""
    z_ref = next((grid.sop_z[s] for s in sources if s in grid.sop_z), None)
    pos_item = _shared_item(ds, group, "PlanePositionSequence")
    pos = (_floats(pos_item.ImagePositionPatient, 3, label, "ImagePositionPatient")
           if pos_item is not None and "ImagePositionPatient" in pos_item else None)
    if z_ref is None and pos is None:
        raise DataError(label, f"frame {i + 1} has neither a source image of the series nor "
                        "a plane position", "re-export the SEG with per-frame references",
                        kind=LABEL_UNREADABLE)
    z_pos = float(np.dot(pos, grid.direction[2])) if pos is not None else None
    z = z_ref if z_ref is not None else z_pos
    assert z is not None
    k = grid.slice_of(z)
    if k is None or (z_pos is not None and grid.slice_of(z_pos) != k):
        raise DataError(label, f"frame {i + 1} at {z:.2f} mm along the normal lies on no "
                        "slice of the image series", "export the SEG on the image series' "
                        "own grid", kind=LABEL_OFF_GRID)
    if pos is not None:
        shift = grid.in_plane(k, pos)
        if np.any(np.abs(shift) > PLANE_TOLERANCE):
            raise DataError(label, f"frame {i + 1} is shifted by {shift.round(2).tolist()} "
                            "pixels (row, column) from the image's slice", "export the SEG "
                            "on the image series' own grid", kind=LABEL_OFF_GRID)
    return k


def _seg_frames(ds: Dataset, label: str, frames: int, rows: int, cols: int
                ) -> list[np.ndarray]:
    """A SEG's frames as stored (bits 0/1, or fractions). Native 1-bit frames are packed
    one after another, a frame starting mid-byte when Rows x Columns is not a multiple of
    8: unpacked here as one bit stream (little-endian bit order, PS3.5 8.1.1)."""
    meta = getattr(ds, "file_meta", None)
    syntax = pydicom.uid.UID(str(meta.get("TransferSyntaxUID", ""))) if meta else None
    if int(ds.get("BitsAllocated", 0) or 0) == 1 and syntax is not None \
            and not syntax.is_encapsulated and "PixelData" in ds:
        n = frames * rows * cols
        bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")
        if bits.size < n:
            raise DataError(label, f"{bits.size} pixel bits for {frames} frames of {rows}x"
                            f"{cols}", "retrieve the SEG again", kind=LABEL_UNREADABLE)
        return list(bits[:n].reshape(frames, rows, cols))
    return list(stored_frames(ds, label))


def seg_label_maps(ds: Dataset, label: str, index: ImageIndex,
                   class_names: tuple[str, ...]) -> list[LabelMap]:
    """The label maps of one SEG instance (see the module docstring)."""
    segments = _segments(ds, label)
    classes = class_map(segments, class_names, what="segment", label=label)
    seg_type = str(ds.get("SegmentationType", "")).upper()
    if seg_type not in ("BINARY", "FRACTIONAL"):
        raise DataError(label, f"SegmentationType {shown(seg_type)}", "export the SEG as "
                        "BINARY or FRACTIONAL", kind=LABEL_UNREADABLE)
    threshold = 1.0
    if seg_type == "FRACTIONAL":
        threshold = float(ds.get("MaximumFractionalValue", 255) or 255) / 2.0
    per_frame = _seq(ds, "PerFrameFunctionalGroupsSequence")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != frames:
        raise DataError(label, f"{len(per_frame)} per-frame functional groups for {frames} "
                        "frames", "re-export the SEG", kind=LABEL_UNREADABLE)
    wanted = targets(ds, index)
    if not wanted:
        raise DataError(label, "references no image series converted by this ingest",
                        FIX_REFERENCE, kind=LABEL_UNMATCHED)
    grids = {uid: index.grid(uid) for uid in wanted}
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    placed: list[tuple[int, str, int, int]] = []  # (segment, series, slice, frame)
    for i, group in enumerate(per_frame):
        ident = _shared_item(ds, group, "SegmentIdentificationSequence")
        number = int(ident.get("ReferencedSegmentNumber", 0) or 0) if ident else 0
        if number not in segments:
            raise DataError(label, f"frame {i + 1} belongs to segment {number}, which the "
                            "SegmentSequence does not describe", "re-export the SEG",
                            kind=LABEL_UNREADABLE)
        sources = _frame_sources(group)
        hits = [uid for uid, g in grids.items() if any(s in g.sop_z for s in sources)]
        if not hits and sources:
            continue  # a frame of another series (not converted by this ingest)
        if not hits:  # no source image: by plane position, on the one series referenced
            if len(grids) > 1:
                raise DataError(label, f"frame {i + 1} has no source image, and the SEG "
                                "references several series", "re-export the SEG with "
                                "per-frame source images", kind=LABEL_UNREADABLE)
            hits = list(grids)
        grid = grids[hits[0]]
        if (rows, cols) != grid.shape[1:]:
            raise DataError(label, f"frames of {rows}x{cols} pixels on an image series of "
                            f"{grid.shape[1]}x{grid.shape[2]}", "export the SEG on the "
                            "image series' own grid", kind=LABEL_OFF_GRID)
        _check_plane(grid, ds, group, label)
        placed.append((number, hits[0], _frame_slice(grid, ds, group, sources, label, i), i))
    masks = {uid: np.zeros(g.shape, np.int16) for uid, g in grids.items()}
    pixels = _seg_frames(ds, label, frames, rows, cols)
    for number, uid, k, i in sorted(placed):  # the later segment number wins
        masks[uid][k][pixels[i] >= threshold] = classes[number]
    names = {segments[n]: c for n, c in classes.items()}
    return [LabelMap(uid, masks[uid], names) for uid in sorted(masks)]


# --------------------------------------------------------------------------- RTSTRUCT
def _rois(ds: Dataset, label: str) -> tuple[dict[int, str], dict[int, int]]:
    """(ROI order from 1 -> ROI name, ROINumber -> ROI order)."""
    names: dict[int, str] = {}
    order: dict[int, int] = {}
    for i, item in enumerate(_seq(ds, "StructureSetROISequence"), start=1):
        try:
            order[int(item.ROINumber)] = i
        except (AttributeError, TypeError, ValueError):
            raise DataError(label, "an ROI without ROINumber", "re-export the RTSTRUCT",
                            kind=LABEL_UNREADABLE) from None
        names[i] = str(item.get("ROIName", "") or "")
    return names, order


def _contour_points(contour: Dataset, label: str) -> np.ndarray:
    data = contour.get("ContourData") or []
    pts = _floats(data, len(data), label, "ContourData") if len(data) else np.zeros(0)
    if pts.size < 9 or pts.size % 3:
        raise DataError(label, f"a closed contour of {pts.size} coordinates (needs x, y, z "
                        "triples, at least 3 points)", "re-export the RTSTRUCT",
                        kind=LABEL_UNREADABLE)
    return pts.reshape(-1, 3)


def rtstruct_label_maps(ds: Dataset, label: str, index: ImageIndex,
                        class_names: tuple[str, ...]) -> list[LabelMap]:
    """The label map of one RTSTRUCT instance (see the module docstring)."""
    from skimage.draw import polygon  # a heavy import, only for a site that has RTSTRUCTs

    names, order = _rois(ds, label)
    contoured = {order[int(r.get("ReferencedROINumber", -1))]: r
                 for r in _seq(ds, "ROIContourSequence")
                 if int(r.get("ReferencedROINumber", -1)) in order and any(
                     str(c.get("ContourGeometricType", "")).upper() == "CLOSED_PLANAR"
                     for c in _seq(r, "ContourSequence"))}
    if not contoured:
        raise DataError(label, "no ROI with CLOSED_PLANAR contours", "export the structures "
                        "as closed planar contours", kind=LABEL_UNREADABLE)
    classes = class_map({i: names[i] for i in contoured}, class_names, what="ROI",
                        label=label)
    wanted = targets(ds, index)
    if not wanted:
        raise DataError(label, "references no image series converted by this ingest",
                        FIX_REFERENCE, kind=LABEL_UNMATCHED)
    grids = {uid: index.grid(uid) for uid in wanted}
    masks = {uid: np.zeros(g.shape, np.int16) for uid, g in grids.items()}
    for roi in sorted(contoured):  # the later ROI wins
        fills = {uid: np.zeros(g.shape, bool) for uid, g in grids.items()}
        for contour in _seq(contoured[roi], "ContourSequence"):
            if str(contour.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
                continue
            sops = _contour_sops(contour)
            hits = [uid for uid in grids if any(index.series_of(s) == uid for s in sops)]
            if not hits and sops:
                continue  # a contour on another series (not converted by this ingest)
            if not hits and len(grids) > 1:
                raise DataError(label, "a contour without a contour image, and the RTSTRUCT "
                                "references several series", "re-export the RTSTRUCT with "
                                "contour image references", kind=LABEL_UNREADABLE)
            uid = (hits or list(grids))[0]
            grid = grids[uid]
            pts = _contour_points(contour, label)
            zs = pts @ grid.direction[2]
            k = grid.slice_of(float(np.median(zs)))
            if k is None or np.ptp(zs) > SLICE_TOLERANCE * grid.spacing[0]:
                raise DataError(label, f"a contour of ROI {shown(names[roi])!r} at "
                                f"{float(np.median(zs)):.2f} mm along the normal is not on "
                                "one slice of the image series", "export the contours on "
                                "the image series' slices", kind=LABEL_OFF_GRID)
            rc = np.stack([grid.in_plane(k, p) for p in pts])
            rr, cc = polygon(rc[:, 0], rc[:, 1], grid.shape[1:])
            filled = np.zeros(grid.shape[1:], bool)
            filled[rr, cc] = True
            fills[uid][k] ^= filled  # even-odd: an inner contour is a hole
        for uid, fill in fills.items():
            masks[uid][fill] = classes[roi]
    names_out = {names[i]: c for i, c in classes.items()}
    return [LabelMap(uid, masks[uid], names_out) for uid in sorted(masks)]


def label_maps(path: Path, index: ImageIndex, class_names: tuple[str, ...]) -> list[LabelMap]:
    """The label maps of one cached SEG/RTSTRUCT instance (nothing is written)."""
    ds = read_dicom(path, str(path))
    kind = label_kind(ds)
    try:
        if kind == "seg":
            return seg_label_maps(ds, str(path), index, class_names)
        if kind == "rtstruct":
            return rtstruct_label_maps(ds, str(path), index, class_names)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(str(path), f"a {kind.upper()} this site cannot read "
                        f"({type(exc).__name__})", "re-export it", kind=LABEL_UNREADABLE
                        ) from exc
    raise DataError(str(path), f"SOP class {shown(str(ds.get('SOPClassUID', '')))} is not a "
                    "SEG or RTSTRUCT", f"label series are {SEG_STORAGE} (SEG) or "
                    f"{RTSTRUCT_STORAGE} (RTSTRUCT)", kind=LABEL_UNREADABLE)
