"""DICOM instances -> volumes with pydicom: geometry, modality LUT, windowing, resampling.

Array core: :func:`apply_window` and :func:`resample` work on one array; :func:`build_volume`
turns one series' files into a :class:`Volume` whose geometry comes from the headers
(ImagePositionPatient / ImageOrientationPatient / PixelSpacing), never from file order.
:func:`read_dicom` is the one place a DICOM byte stream or file becomes a Dataset (or a
:class:`DataError` of kind ``not-dicom`` / ``unreadable``). :class:`PacsPreprocess` (the site
config's ``[data] window`` and ``spacing``) says how a converted volume is prepared for
training by :func:`prepare_image` and :func:`prepare_mask`.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fedpacs.client.config import PacsPreprocess
from fedpacs.common.datasets import resize
from fedpacs.common.errors import ConfigError, DataError, FieldError, did_you_mean

# (center, width) in HU for CT; the clinical presets radiologists use.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "stroke": (40.0, 40.0),
    "bone": (600.0, 2800.0),
    "lung": (-600.0, 1500.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
}
# DataError kinds of instances that cannot be read (counted in the ingest summary).
NOT_DICOM = "not-dicom"
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
NO_PIXELS = "no-pixels"
MISSING_SLICES = "missing-slices"
BAD_UID = "bad-uid"      # a Study/Series/SOP Instance UID that is not a DICOM UID
TOO_LARGE = "too-large"  # more bytes (received, or promised as pixels) than the site's cap
# The largest instance a site accepts unless [pacs] max_instance_mb says otherwise: as
# received, and as its header's decoded pixel data (Rows x Columns x frames x samples x bits).
DEFAULT_MAX_INSTANCE_MB = 512
MIB = 1024 * 1024
MAX_UID_LENGTH = 64
# Digits and dots, no empty component (PS3.5 9.1; a leading zero is tolerated: PACS send them).
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)
UID_TAGS = {"StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E,
            "SOPInstanceUID": 0x00080018}
# A gap this many times the typical spacing means slices are missing.
MISSING_GAP_FACTOR = 1.9
# With instance numbers that skip, a smaller gap already counts as missing.
MISSING_GAP_FACTOR_NUMBERED = 1.5


@dataclass
class Volume:
    """A 3D (or 2D, depth 1) image in patient space, as float32 after the modality LUT.

    ``array`` is indexed (slice, row, column); ``spacing`` is (slice, row, column) in mm;
    ``direction`` rows are the unit vectors of (column, row, slice) axes in patient (LPS)
    coordinates: ImageOrientationPatient row, column and their cross product.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    modality: str
    study_uid: str
    series_uid: str
    series_description: str = ""
    irregular_spacing: bool = False
    source_files: list[str] = field(default_factory=list)


def valid_uid(uid: object) -> bool:
    """A DICOM UID: 1..64 characters, digits and dots, no empty component. Only such a
    string may become part of a cache path or a URL (``..``, ``1..2``, ``a/b`` never do)."""
    return (isinstance(uid, str) and 0 < len(uid) <= MAX_UID_LENGTH
            and _UID_RE.fullmatch(uid) is not None)


def shown(value: object, limit: int = 70) -> str:
    """A value from the network, safe to put in a local log or message: printable ASCII
    as it is, anything else ASCII-escaped (no terminal control characters); cut to
    ``limit`` characters."""
    text = value if isinstance(value, str) and value.isascii() and value.isprintable() \
        else ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def uid_problem(uid: object, field: str) -> str:
    """Why ``uid`` is not a DICOM UID, for a DataError's ``problem``."""
    return (f"{field} {shown(uid)} is not a DICOM UID (1..{MAX_UID_LENGTH} digits and dots, "
            "no empty component)")


def header_uid(ds: Dataset, keyword: str) -> str | None:
    """A UID element as the bytes on the wire say (None when absent), without pydicom's
    own value conversion, so that a hostile value is judged by :func:`valid_uid` alone."""
    elem = ds.get_item(UID_TAGS[keyword])
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\0 ")
    return value if isinstance(value, str) else str(value)  # a multi-value: never valid


def check_uids(ds: Dataset, label: str) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of an instance, each a valid DICOM UID, or a
    DataError: ``unreadable`` when one is missing, ``bad-uid`` when one is not a UID."""
    out = []
    for keyword in UID_TAGS:
        uid = header_uid(ds, keyword)
        if not uid:
            raise DataError(label, f"no {keyword}", "only complete instances can be cached",
                            kind=UNREADABLE)
        if not valid_uid(uid):
            raise DataError(label, uid_problem(uid, keyword), "ask the PACS administrator "
                            "to correct the instance; it was not written", kind=BAD_UID)
        out.append(uid)
    return out[0], out[1], out[2]


def read_dicom(source: bytes | Path, label: str) -> Dataset:
    """Parse one DICOM instance (Part-10 bytes or a file), or raise a DataError naming
    ``label`` with kind ``not-dicom`` (no DICOM preamble/meta) or ``unreadable``."""
    try:
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    except InvalidDicomError as exc:
        raise DataError(label, "not a DICOM file (no DICM preamble/meta)",
                        "remove it from the series or re-export it", kind=NOT_DICOM) from exc
    except (OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        raise DataError(label, f"unreadable DICOM ({type(exc).__name__})",
                        "retrieve the instance again", kind=UNREADABLE) from exc


def read_instance(path: Path, *,
                  max_pixel_bytes: int = DEFAULT_MAX_INSTANCE_MB * MIB) -> Dataset:
    """Read one DICOM file with pixels, or raise a DataError naming it and the fix (also
    when its header promises more than ``max_pixel_bytes`` of decoded pixels)."""
    ds = read_dicom(path, str(path))
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DataError(str(path), "no pixel data", "only image instances can be converted",
                        kind=NO_PIXELS)
    check_pixel_size(ds, path, max_pixel_bytes)
    check_pixel_length(ds, path)
    return ds


_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _header_int(ds: Dataset, keyword: str, default: int | None, label: str) -> int:
    """A non-negative integer header field (``default`` when absent; required if None)."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise DataError(label, f"pixel data without {keyword}", "re-export the instance",
                            kind=UNREADABLE)
        return default
    try:
        n = int(value)
    except (TypeError, ValueError) as exc:
        raise DataError(label, f"{keyword} {shown(value)} is not a whole number",
                        "re-export the instance", kind=UNREADABLE) from exc
    if n < 0:
        raise DataError(label, f"{keyword} {n} is negative", "re-export the instance",
                        kind=UNREADABLE)
    return n


def promised_pixel_bytes(ds: Dataset, path: Path | str) -> int:
    """Decoded pixel bytes the header promises: Rows x Columns x NumberOfFrames x
    SamplesPerPixel x BitsAllocated / 8 (0 without pixel data). Python integers: a
    crafted header cannot overflow it. A header without those fields is ``unreadable``."""
    if not any(t in ds for t in _PIXEL_TAGS):
        return 0
    label = str(path)
    rows = _header_int(ds, "Rows", None, label)
    cols = _header_int(ds, "Columns", None, label)
    bits = _header_int(ds, "BitsAllocated", None, label)
    samples = _header_int(ds, "SamplesPerPixel", 1, label)
    frames = _header_int(ds, "NumberOfFrames", 1, label) or 1
    return (rows * cols * frames * samples * bits + 7) // 8


def check_pixel_size(ds: Dataset, path: Path | str, max_bytes: int) -> None:
    """Refuse (kind ``too-large``) an instance whose header promises more decoded pixel
    bytes than ``max_bytes``, before anything decodes it (compressed pixel data is small
    on the wire whatever the header says)."""
    promised = promised_pixel_bytes(ds, path)
    if promised > max_bytes:
        raise DataError(str(path), f"header promises {promised} bytes of pixels, more than "
                        f"the {max_bytes // MIB} MB allowed", "raise [pacs] max_instance_mb "
                        "if such instances are expected; it was not decoded", kind=TOO_LARGE)


def check_pixel_length(ds: Dataset, path: Path | str) -> None:
    """A truncated uncompressed instance has fewer pixel bytes than its header promises."""
    if "PixelData" not in ds or ds.file_meta.get("TransferSyntaxUID") is None \
            or ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    expected = promised_pixel_bytes(ds, path)
    got = len(ds.PixelData)
    if got < expected:
        raise DataError(str(path), f"truncated: {got} pixel bytes, header promises {expected}",
                        "retrieve the instance again", kind=TRUNCATED)


def modality_lut(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> modality units (HU for CT) with RescaleSlope/Intercept."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def apply_window(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window to [0, 1]: values below center-width/2 -> 0, above center+width/2 -> 1."""
    lo = center - width / 2.0
    return np.clip((arr.astype(np.float32) - lo) / np.float32(width), 0.0, 1.0)


def window_error(preset: object, field: str = "data.window") -> FieldError | None:
    """The FieldError for a window name that is not a preset (None when it is one)."""
    if isinstance(preset, str) and preset in WINDOW_PRESETS:
        return None
    hint = did_you_mean(preset, tuple(WINDOW_PRESETS)) if isinstance(preset, str) else ""
    return FieldError(field, f"a CT window preset: one of {', '.join(WINDOW_PRESETS)}",
                      f"{preset!r}{hint}", 'name a preset, e.g. window = "brain", or remove '
                      "the key to train on unwindowed values")


def window_preset(arr: np.ndarray, preset: str, *, field: str = "data.window") -> np.ndarray:
    """:func:`apply_window` with a clinical preset; an unknown name is a ConfigError
    naming ``field``, the presets and the fix."""
    err = window_error(preset, field)
    if err is not None:
        raise ConfigError("window preset", [err])
    return apply_window(arr, *WINDOW_PRESETS[preset])


def resample(arr: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...],
             *, order: int = 1) -> np.ndarray:
    """Resample to ``target`` spacing (mm) with trilinear (order 1) or nearest (order 0)."""
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in
                  zip(arr.shape, spacing, target, strict=True))
    if shape == arr.shape:
        return arr.copy()
    return resize(arr, shape, nearest=order == 0)


def prepare_image(arr: np.ndarray, spacing: tuple[float, ...], *, modality: str,
                  preprocess: PacsPreprocess) -> np.ndarray:
    """One converted volume as training reads it, before normalisation: resampled to
    ``preprocess.spacing`` (trilinear), then, for CT only, the ``preprocess.window``
    preset (values in [0, 1]). With neither set it is returned unchanged."""
    out = arr
    if preprocess.spacing is not None:
        out = resample(out, spacing, preprocess.spacing, order=1)
    if preprocess.window and modality.upper() == "CT":
        out = window_preset(out, preprocess.window)
    return out


def prepare_mask(mask: np.ndarray, spacing: tuple[float, ...], *,
                 preprocess: PacsPreprocess) -> np.ndarray:
    """A label map on a volume's grid, resampled like :func:`prepare_image` (nearest)."""
    if preprocess.spacing is None:
        return mask
    return resample(mask, spacing, preprocess.spacing, order=0)


def _frames(ds: Dataset, path: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """(pixels, position, orientation, number) for each frame of one instance."""
    try:
        pixels = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
        raise DataError(str(path), f"pixel data cannot be decoded ({type(exc).__name__}: "
                        f"{exc})", "install a pydicom pixel plugin for this transfer syntax "
                        "(pylibjpeg, gdcm) or ask the PACS for an uncompressed syntax") from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames == 1:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise DataError(str(path), "no ImagePositionPatient/ImageOrientationPatient",
                            "only images with patient geometry can be stacked into volumes")
        return [(pixels, np.array(ds.ImagePositionPatient, float),
                 np.array(ds.ImageOrientationPatient, float), int(ds.get("InstanceNumber", 0)))]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    out = []
    for i in range(n_frames):
        group = per_frame[i] if i < len(per_frame) else Dataset()
        pos_seq = group.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        ori_seq = group.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence")
        if not pos_seq or not ori_seq:
            raise DataError(str(path), f"frame {i + 1} has no plane position/orientation",
                            "export the multi-frame instance with functional groups")
        out.append((pixels[i], np.array(pos_seq[0].ImagePositionPatient, float),
                    np.array(ori_seq[0].ImageOrientationPatient, float), i + 1))
    return out


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    if "PixelSpacing" in ds:
        return float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures:
        return float(measures[0].PixelSpacing[0]), float(measures[0].PixelSpacing[1])
    return 1.0, 1.0


def build_volume(paths: list[Path], *, series_uid: str = "", resample_irregular: bool = True,
                 max_pixel_bytes: int = DEFAULT_MAX_INSTANCE_MB * MIB) -> Volume:
    """Stack one series' instances into a volume sorted along the slice normal.

    Raises DataError when a file is unreadable, orientations disagree, two slices share
    a position, slices are missing (a gap far above the typical spacing) or an instance's
    header promises more than ``max_pixel_bytes`` of pixels (checked before decoding).
    Irregular spacing without missing slices (e.g. variable-pitch CT) is resampled to the
    median.
    """
    if not paths:
        raise DataError(series_uid or "series", "no instances", "retrieve the series again")
    datasets = [(p, read_instance(p, max_pixel_bytes=max_pixel_bytes)) for p in paths]
    first = datasets[0][1]
    frames = []
    for p, ds in datasets:
        for pix, pos, ori, num in _frames(ds, p):
            frames.append((modality_lut(ds, pix), pos, ori, num, p))
    ori0 = frames[0][2]
    label = series_uid or str(first.get("SeriesInstanceUID", "series"))
    for _, _, ori, _, p in frames:
        if not np.allclose(ori, ori0, atol=1e-3):
            raise DataError(str(p), f"orientation {ori.round(4).tolist()} differs from the "
                            f"series' {ori0.round(4).tolist()}", "split the series by orientation")
    shapes = {f[0].shape for f in frames}
    if len(shapes) != 1:
        raise DataError(label, f"slices have different sizes {sorted(shapes)}",
                        "split the series by image size")
    row, col = ori0[:3], ori0[3:]
    normal = np.cross(row, col)
    frames.sort(key=lambda f: float(np.dot(f[1], normal)))
    z = np.array([float(np.dot(f[1], normal)) for f in frames])
    ps = _pixel_spacing(first)
    irregular = False
    if len(frames) > 1:
        gaps = np.diff(z)
        if np.any(gaps < 1e-3):
            i = int(np.argmin(gaps))
            raise DataError(str(frames[i + 1][4]), f"two slices at the same position "
                            f"({z[i]:.2f} mm along the normal)",
                            "remove the duplicate instance or split the series")
        typical = float(np.median(gaps))
        nums = [f[3] for f in frames]
        for i, g in enumerate(gaps):
            jumped = nums[i] and nums[i + 1] and abs(nums[i + 1] - nums[i]) > 1
            if g > MISSING_GAP_FACTOR * typical or (jumped and g > MISSING_GAP_FACTOR_NUMBERED
                                                    * typical):
                raise DataError(label, f"missing slice(s) between instance {nums[i]} and "
                                f"{nums[i + 1]}: gap {g:.2f} mm, expected {typical:.2f} mm",
                                "retrieve the series again; the PACS may hold it incomplete",
                                kind=MISSING_SLICES)
        irregular = bool(np.ptp(gaps) > 0.01 * typical + 1e-3)
        dz = typical
    else:
        dz = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    arr = np.stack([f[0] for f in frames]).astype(np.float32)
    if irregular and resample_irregular:
        arr = _resample_along_z(arr, z, dz)
    direction = np.stack([row, col, normal])
    return Volume(
        array=arr, spacing=(dz, ps[0], ps[1]),
        origin=(float(frames[0][1][0]), float(frames[0][1][1]), float(frames[0][1][2])),
        direction=direction, modality=str(first.get("Modality", "")),
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", series_uid)),
        series_description=str(first.get("SeriesDescription", "")), irregular_spacing=irregular,
        source_files=[str(p) for p, _ in datasets],
    )


def _resample_along_z(arr: np.ndarray, z: np.ndarray, dz: float) -> np.ndarray:
    """Linear interpolation of slices at positions ``z`` onto a uniform grid of step ``dz``."""
    grid = np.arange(z[0], z[-1] + 1e-6, dz)
    idx = np.clip(np.searchsorted(z, grid, side="right") - 1, 0, len(z) - 2)
    t = ((grid - z[idx]) / (z[idx + 1] - z[idx])).astype(np.float32)[:, None, None]
    return (1 - t) * arr[idx] + t * arr[idx + 1]
