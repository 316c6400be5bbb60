"""DICOM instances -> volumes with pydicom: geometry, modality LUT, windowing, resampling.

Array core: :func:`apply_window` and :func:`resample` work on one array; :func:`build_volume`
turns one series' files into a :class:`Volume` whose geometry comes from the headers
(ImagePositionPatient / ImageOrientationPatient / PixelSpacing), never from file order.
:func:`read_dicom` is the one place a DICOM byte stream or file becomes a Dataset (or a
:class:`DataError` of kind ``not-dicom`` / ``unreadable``). :class:`PacsPreprocess` (the site
config's ``[data] window`` and ``spacing``) says how a converted volume is prepared for
training by :func:`prepare_image` and :func:`prepare_mask`.

What is converted (:data:`IMAGE_SOP_CLASSES`): CT, MR, PET (and their enhanced/legacy
converted multi-frame classes), CR, DX, MG (and breast tomosynthesis), US (single and
multi-frame), NM, Secondary Capture and VL Whole Slide Microscopy. Any other SOP class with
pixels (SEG, RT Dose, ...) is refused as ``unsupported-sop``; SEG and RTSTRUCT
(:data:`LABEL_SOP_CLASSES`) are label series, which fedpacs.client.seglabels turns into label
maps when the ingest asks for them. Pixel data in any transfer
syntax a pydicom pixel-data plugin installed with fedpacs decodes (native, deflated, RLE,
JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K) is decoded by
:func:`decode_frames`; a syntax with no installed decoder is ``no-decoder``, compressed data
that is cut short is ``truncated`` (checked when an instance is stored, before caching) and
data the decoder rejects is ``undecodable``.

How images become volumes:

* Images with patient geometry (ImagePositionPatient/ImageOrientationPatient, or plane
  position/orientation functional groups) are stacked along the slice normal.
* Images without it (CR/DX/MG projections, US, secondary captures, multi-frame images with no
  plane positions such as US cine loops) form a stack of 2D images in InstanceNumber order,
  frames in frame order: a single image is a depth-1 volume. Such a volume has origin (0, 0,
  0), an identity direction and ``patient_geometry`` False; its in-plane spacing is
  PixelSpacing, else the functional groups' pixel measures, else ImagerPixelSpacing (at the
  detector, not corrected for magnification), else the first ultrasound region calibrated in
  cm, else 1 mm (unknown); its slice spacing SpacingBetweenSlices or SliceThickness, else 1.
* A whole-slide series becomes one depth-1 image: the largest VOLUME level of the series,
  its tiles assembled into the total pixel matrix (first focal plane and optical path). A
  level whose matrix would exceed the site's memory bound is refused as ``too-large``.
* Colour images (RGB, YBR, PALETTE COLOR) are reduced to luminance (ITU-R BT.601); the
  volume format has one channel. MONOCHROME1 images are inverted within their stored range so
  that a higher value is brighter in every volume.
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space, get_decoder
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from fedpacs.client.config import PacsPreprocess
from fedpacs.common.datasets import resample
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
UNSUPPORTED_SOP = "unsupported-sop"  # pixels of a SOP class that is not an image series
NO_DECODER = "no-decoder"            # a transfer syntax no installed pixel plugin decodes
UNDECODABLE = "undecodable"          # pixel data the installed decoders reject (damaged)
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

VL_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"
# The SOP classes whose instances become volumes (PS3.4 B.5), by the group README names.
IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",         # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",         # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",         # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4": "MR",         # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128": "PET",
    "1.2.840.10008.5.1.4.1.1.130": "PET",        # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.128.1": "PET",      # Legacy Converted Enhanced PET
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",         # for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",       # for processing
    "1.2.840.10008.5.1.4.1.1.1.2": "MG",         # for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1": "MG",       # for processing
    "1.2.840.10008.5.1.4.1.1.13.1.3": "MG",      # Breast Tomosynthesis
    "1.2.840.10008.5.1.4.1.1.6.1": "US",
    "1.2.840.10008.5.1.4.1.1.6": "US",           # retired, still in old archives
    "1.2.840.10008.5.1.4.1.1.3.1": "US",         # multi-frame
    "1.2.840.10008.5.1.4.1.1.3": "US",           # multi-frame, retired
    "1.2.840.10008.5.1.4.1.1.20": "NM",
    "1.2.840.10008.5.1.4.1.1.5": "NM",           # retired
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.7.1": "SC",         # multi-frame single bit
    "1.2.840.10008.5.1.4.1.1.7.2": "SC",         # multi-frame grayscale byte
    "1.2.840.10008.5.1.4.1.1.7.3": "SC",         # multi-frame grayscale word
    "1.2.840.10008.5.1.4.1.1.7.4": "SC",         # multi-frame true colour
    VL_WHOLE_SLIDE: "SM",
}
# The label SOP classes (fedpacs.client.seglabels turns them into label maps of the image
# series they reference, when the [cohort] asks for their kind; build_volume refuses them).
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
LABEL_SOP_CLASSES: dict[str, str] = {SEG_STORAGE: "seg", RTSTRUCT_STORAGE: "rtstruct"}
LABEL_MODALITIES: dict[str, str] = {"SEG": "seg", "RTSTRUCT": "rtstruct"}  # Modality -> kind
LABEL_KINDS: tuple[str, ...] = ("seg", "rtstruct")
# Why a SOP class with pixel data is not an image series, where it is worth saying.
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a Segmentation is a label map of other images, not an "
    "image series",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT Dose is a dose grid, not an image series",
}
# Transfer syntaxes whose frames each end with an EOI/EOC marker (FF D9).
_MARKER_SYNTAXES = frozenset(JPEGTransferSyntaxes + JPEGLSTransferSyntaxes
                             + JPEG2000TransferSyntaxes)
_EOI = b"\xff\xd9"
# Decoder failures: pydicom raises RuntimeError when every plugin failed, the plugins
# ValueError/struct.error on malformed streams.
_DECODE_ERRORS = (ValueError, RuntimeError, NotImplementedError, AttributeError, IndexError,
                  KeyError, TypeError, EOFError, OSError, OverflowError, struct.error)
# ITU-R BT.601 luma weights: RGB -> one channel.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class Volume:
    """A 3D (or 2D, depth 1) image in patient space, as float32 after the modality LUT.

    ``array`` is indexed (slice, row, column); ``spacing`` is (slice, row, column) in mm;
    ``direction`` rows are the unit vectors of (column, row, slice) axes in patient (LPS)
    coordinates: ImageOrientationPatient row, column and their cross product.
    ``patient_geometry`` is False for a stack of images without patient geometry (CR/DX/MG,
    US, a whole slide, ...): then origin is (0, 0, 0), direction the identity and the slice
    axis is image order, not space.
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
    patient_geometry: bool = True
    # PatientID of the first instance: only to derive the cache's patient key
    # (fedpacs.client.volumes.patient_key); never written, logged or shown
    patient_id: str = field(default="", repr=False)




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
    ``label`` with kind ``not-dicom`` (no DICOM preamble/meta) or ``unreadable`` (also
    when no element follows the file meta: pydicom keeps none when the file ends inside
    pixel data or a sequence of undefined length)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    except InvalidDicomError as exc:
        raise DataError(label, "not a DICOM file (no DICM preamble/meta)",
                        "remove it from the series or re-export it", kind=NOT_DICOM) from exc
    except (OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        raise DataError(label, f"unreadable DICOM ({type(exc).__name__})",
                        "retrieve the instance again", kind=UNREADABLE) from exc
    if len(ds) == 0:  # cut in the file meta, or inside an element of undefined length
        raise DataError(label, "no data element could be read after the file meta (the file "
                        "is cut short or damaged)", "retrieve the instance again",
                        kind=UNREADABLE)
    return ds


def read_instance(path: Path, *,
                  max_pixel_bytes: int = DEFAULT_MAX_INSTANCE_MB * MIB) -> Dataset:
    """Read one DICOM image file to convert, or raise a DataError naming it and the fix:
    no pixels, a SOP class that is not an image series (:func:`check_sop_class`), a header
    promising more than ``max_pixel_bytes`` of decoded pixels, pixel data cut short."""
    ds = read_dicom(path, str(path))
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        check_pixel_length(ds, path)  # an image whose pixel data the file lost: truncated
        raise DataError(str(path), "no pixel data", "only image instances can be converted",
                        kind=NO_PIXELS)
    check_sop_class(ds, path)
    check_pixel_size(ds, path, max_pixel_bytes)
    check_pixel_length(ds, path)
    return ds


def check_sop_class(ds: Dataset, path: Path | str) -> None:
    """Refuse (kind ``unsupported-sop``) an instance whose SOP class is not one of
    :data:`IMAGE_SOP_CLASSES` (a SEG, an RT Dose, a parametric map...); ``unreadable``
    without a SOPClassUID."""
    value = ds.get("SOPClassUID")
    if not value:
        raise DataError(str(path), "no SOPClassUID", "re-export the instance", kind=UNREADABLE)
    sop = str(value)
    if sop in IMAGE_SOP_CLASSES:
        return
    name = UID(sop).name if valid_uid(sop) else shown(sop)
    why = _NOT_IMAGES.get(sop, f"{name} is not a SOP class this site converts")
    raise DataError(str(path), f"{why} (SOP class {shown(sop)})", "only CT, MR, PET, CR, DX, "
                    "MG, US, NM, SC and VL Whole Slide images become volumes; leave this "
                    "series out of the [cohort] (e.g. by modality)", kind=UNSUPPORTED_SOP)


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
    SamplesPerPixel x BitsAllocated / 8 (0 without pixel data), or for a whole slide its
    total pixel matrix (TotalPixelMatrixRows x TotalPixelMatrixColumns x samples x bits / 8)
    where that is larger. Python integers: a crafted header cannot overflow it. A header
    without those fields is ``unreadable``."""
    if not any(t in ds for t in _PIXEL_TAGS):
        return 0
    label = str(path)
    matrix = (_header_int(ds, "TotalPixelMatrixRows", 0, label)
              * _header_int(ds, "TotalPixelMatrixColumns", 0, label))
    samples = _header_int(ds, "SamplesPerPixel", 1, label)
    bits = _header_int(ds, "BitsAllocated", None, label)
    return max(_frame_bytes(ds, label, samples), (matrix * samples * bits + 7) // 8)


def _frame_bytes(ds: Dataset, label: str, samples: int) -> int:
    """Rows x Columns x NumberOfFrames x ``samples`` x BitsAllocated / 8."""
    rows = _header_int(ds, "Rows", None, label)
    cols = _header_int(ds, "Columns", None, label)
    bits = _header_int(ds, "BitsAllocated", None, label)
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


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def check_pixel_length(ds: Dataset, path: Path | str) -> None:
    """Pixel data cut short is ``truncated``: missing after an image header (the file ends
    before it); uncompressed, fewer bytes than the header promises (YBR_FULL_422: 2 samples
    a pixel); encapsulated (compressed), an item cut short, fewer fragments than frames, or
    a JPEG / JPEG-LS / JPEG 2000 frame without its end marker (decoders would return part
    of an image without an error). Encapsulated data that is not a sequence of items is
    ``undecodable``."""
    if not any(t in ds for t in _PIXEL_TAGS):
        if "Rows" in ds and "Columns" in ds and str(ds.get("SOPClassUID", "")) \
                in (*IMAGE_SOP_CLASSES, SEG_STORAGE):
            raise DataError(str(path), "truncated: an image header, but the file ends before "
                            "its pixel data", "retrieve the instance again", kind=TRUNCATED)
        return
    ts = _transfer_syntax(ds)
    if "PixelData" not in ds or ts is None:
        return
    if ts.is_encapsulated:
        problem = encapsulation_problem(ds.PixelData, _header_int(
            ds, "NumberOfFrames", 1, str(path)) or 1, markers=ts in _MARKER_SYNTAXES)
        if problem:
            kind = UNDECODABLE if problem.startswith("not encapsulated") else TRUNCATED
            raise DataError(str(path), f"compressed pixel data {problem}",
                            "retrieve the instance again; if it stays so, the PACS holds it "
                            "damaged", kind=kind)
        return
    samples = _header_int(ds, "SamplesPerPixel", 1, str(path))
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # stored as 2 samples a pixel (PS3.3 C.7.6.3.1.2)
    expected = _frame_bytes(ds, str(path), samples)
    got = len(ds.PixelData)
    if got < expected:
        raise DataError(str(path), f"truncated: {got} pixel bytes, header promises {expected}",
                        "retrieve the instance again", kind=TRUNCATED)


def encapsulation_problem(data: bytes, frames: int, *, markers: bool) -> str:
    """What is wrong with encapsulated pixel data ('' when nothing is): each item (Basic
    Offset Table, then fragments) complete, at least ``frames`` fragments and, with
    ``markers`` (JPEG family), at least ``frames`` fragments ending with an EOI/EOC marker
    (within their last 10 bytes: padding), the last one among them."""
    items: list[tuple[int, int]] = []  # (start, end) of each item's value
    pos, n = 0, len(data)
    while pos < n:
        if pos + 8 > n:
            return f"cut inside an item header at byte {pos}"
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):
            break
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            return (f"not encapsulated: ({group:04X},{elem:04X}) at byte {pos} where an item "
                    "of defined length belongs")
        if pos + 8 + length > n:
            return f"cut short: an item at byte {pos} of {length} bytes, {n - pos - 8} left"
        items.append((pos + 8, pos + 8 + length))
        pos += 8 + length
    fragments = items[1:]  # items[0] is the Basic Offset Table
    if len(fragments) < frames:
        return f"cut short: {len(fragments)} fragment(s) for {frames} frame(s)"
    if markers:
        ends = [_EOI in data[max(start, end - 10):end] for start, end in fragments]
        ended = sum(ends)
        if ended < frames or not ends[-1]:
            return (f"cut short: {ended} of {frames} frame(s) end with a JPEG end marker "
                    "(FF D9)")
    return ""

def modality_lut(ds: Dataset, pixels: np.ndarray, index: int = 0) -> np.ndarray:
    """Stored values of frame ``index`` -> modality units (HU for CT) with its
    RescaleSlope/Intercept (:func:`_rescale`)."""
    slope, intercept = _rescale(ds, index)
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


# --------------------------------------------------------------------------- decoding
def stored_frames(ds: Dataset, label: str) -> Iterator[np.ndarray]:
    """Each frame's stored values (row, column), one at a time, without the modality LUT
    (a SEG's bits, unpacked; its fractions): a DataError ``undecodable`` when the decoder
    rejects them."""
    decoder = _decoder(ds, label)
    frames = _header_int(ds, "NumberOfFrames", 1, label) or 1
    it: Iterator[tuple[np.ndarray, dict[str, Any]]] = decoder.iter_array(ds)
    for i in range(frames):
        try:
            arr, _ = next(it)
        except StopIteration as exc:
            raise DataError(label, f"{i} of {frames} frames decoded", "retrieve the instance "
                            "again", kind=TRUNCATED) from exc
        except _DECODE_ERRORS as exc:
            raise _undecodable(label, exc, f" of frame {i + 1}") from exc
        yield arr


def _decoder(ds: Dataset, label: str) -> Any:
    """The pydicom decoder for the instance's transfer syntax, or a coded DataError."""
    ts = _transfer_syntax(ds)
    if ts is None:
        raise DataError(label, "no TransferSyntaxUID in the file meta", "re-export the "
                        "instance as a DICOM Part-10 file", kind=UNREADABLE)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        name = ts.name if valid_uid(ts) else shown(ts)
        raise DataError(label, f"no pixel decoder for transfer syntax {name}", "ask the PACS "
                        "for this series in an uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000 "
                        "syntax", kind=NO_DECODER) from exc
    if not decoder.is_available:
        raise DataError(label, f"no installed pixel plugin decodes {ts.name}", "reinstall "
                        "fedpacs with its dependencies (pip install fedpacs installs pylibjpeg, "
                        "pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle and pyjpegls)",
                        kind=NO_DECODER)
    return decoder


def _undecodable(label: str, exc: BaseException, frame: str = "") -> DataError:
    first = str(exc).strip().splitlines()
    detail = shown(" ".join(line.strip() for line in first[:3]), 200) if first else ""
    return DataError(label, f"pixel data{frame} cannot be decoded ({type(exc).__name__}: "
                     f"{detail})", "retrieve the instance again; if it fails again the PACS "
                     "holds it damaged: ask for it in another transfer syntax", kind=UNDECODABLE)


def decode_frames(ds: Dataset, path: Path | str) -> np.ndarray:
    """Every frame of one instance as float32 (frame, row, column): decoded with the
    installed pydicom plugins, colour reduced to luminance, MONOCHROME1 inverted, then the
    modality LUT (RescaleSlope/Intercept, per frame for enhanced multi-frame images, or a
    Modality LUT Sequence). Raises DataError ``no-decoder`` or ``undecodable``."""
    label = str(path)
    decoder = _decoder(ds, label)
    try:
        arr, meta = decoder.as_array(ds, as_rgb=True)
    except _DECODE_ERRORS as exc:
        raise _undecodable(label, exc) from exc
    n = int(meta.get("number_of_frames", 1) or 1)
    if n == 1:
        arr = arr[None]
    return _monochrome(ds, arr, str(meta.get("photometric_interpretation", "")), 0, label)


def _monochrome(ds: Dataset, arr: np.ndarray, photometric: str, first: int,
                label: str) -> np.ndarray:
    """Decoded frames (frame, row, column[, sample]) -> float32 (frame, row, column) in
    modality units; ``first`` is the index of arr[0] among the instance's frames. A palette,
    LUT or rescale the header gets wrong is ``unreadable``."""
    try:
        return _to_modality(ds, arr, photometric, first)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise DataError(label, f"its palette, modality LUT or rescale cannot be applied "
                        f"({type(exc).__name__})", "re-export the instance",
                        kind=UNREADABLE) from exc


def _to_modality(ds: Dataset, arr: np.ndarray, photometric: str, first: int) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    if arr.ndim == 4:
        if photometric in ("YBR_FULL", "YBR_FULL_422"):  # as_rgb converted the others
            arr = convert_color_space(arr, photometric, "RGB")
        return np.asarray(arr.astype(np.float32) @ _LUMA, np.float32)
    lut = "ModalityLUTSequence" in ds
    out = np.empty(arr.shape, np.float32)
    for i in range(arr.shape[0]):
        if lut:
            out[i] = apply_modality_lut(arr[i], ds)
        else:
            out[i] = modality_lut(ds, arr[i], first + i)
    if photometric == "MONOCHROME1":
        lo, hi = _value_range(ds, lut)
        out = np.float32(lo + hi) - out
    return out


def _rescale(ds: Dataset, index: int) -> tuple[float, float]:
    """(slope, intercept) of frame ``index``: the top-level RescaleSlope/Intercept, else the
    frame's (or shared) Pixel Value Transformation functional group, else (1, 0)."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return (float(ds.get("RescaleSlope", 1.0) or 1.0),
                float(ds.get("RescaleIntercept", 0.0) or 0.0))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for group in (per_frame[index] if index < len(per_frame) else Dataset(), _shared(ds)):
        seq = group.get("PixelValueTransformationSequence")
        if seq:
            return (float(seq[0].get("RescaleSlope", 1.0) or 1.0),
                    float(seq[0].get("RescaleIntercept", 0.0) or 0.0))
    return 1.0, 0.0


def _value_range(ds: Dataset, lut: bool) -> tuple[float, float]:
    """The range of modality values a MONOCHROME1 image can hold (from the header, never
    from the pixels): the stored range (BitsStored, PixelRepresentation) through the rescale
    or the Modality LUT."""
    bits = min(int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16), 32)
    lo, hi = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if ds.get("PixelRepresentation", 0)
              else (0, (1 << bits) - 1))
    if lut:
        values = np.asarray(apply_modality_lut(np.arange(lo, min(hi, lo + 65535) + 1), ds))
        return float(values.min()), float(values.max())
    slope, intercept = _rescale(ds, 0)
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return ends[0], ends[1]


def _shared(ds: Dataset) -> Dataset:
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else Dataset()


# --------------------------------------------------------------------------- geometry
@dataclass
class _Frame:
    pixels: np.ndarray  # (row, column) float32 in modality units
    # (ImagePositionPatient, ImageOrientationPatient); None without patient geometry
    plane: tuple[np.ndarray, np.ndarray] | None
    number: int                      # InstanceNumber (single frame) or frame number
    path: Path
    order: tuple[int, int]           # (InstanceNumber, frame index): a stack's order


def _vector(value: Any, size: int, what: str, label: str) -> np.ndarray:
    try:
        vec = np.array([float(v) for v in value], float)
    except (TypeError, ValueError) as exc:
        raise DataError(label, f"{what} {shown(value)} is not {size} numbers",
                        "re-export the instance", kind=UNREADABLE) from exc
    if vec.shape != (size,) or not np.all(np.isfinite(vec)):
        raise DataError(label, f"{what} {shown(value)} is not {size} finite numbers",
                        "re-export the instance", kind=UNREADABLE)
    return vec


def _plane(ds: Dataset, index: int, frames: int, label: str
           ) -> tuple[np.ndarray, np.ndarray] | None:
    """(position, orientation) of frame ``index``: its plane position/orientation functional
    groups (per frame, else shared), else for a single frame the top-level
    ImagePositionPatient/ImageOrientationPatient; None when the frame has none."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    group = per_frame[index] if index < len(per_frame) else Dataset()
    shared = _shared(ds)
    pos_seq = group.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
    ori_seq = group.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence")
    if pos_seq and ori_seq and "ImagePositionPatient" in pos_seq[0] \
            and "ImageOrientationPatient" in ori_seq[0]:
        pos, ori = pos_seq[0].ImagePositionPatient, ori_seq[0].ImageOrientationPatient
    elif frames == 1 and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        pos, ori = ds.ImagePositionPatient, ds.ImageOrientationPatient
    else:
        return None
    return (_vector(pos, 3, "ImagePositionPatient", label),
            _vector(ori, 6, "ImageOrientationPatient", label))


def frame_planes(ds: Dataset, label: str) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """(ImagePositionPatient, ImageOrientationPatient) of each frame of one instance (None
    for a frame without them), read from the header alone (no pixel decoding)."""
    n = _header_int(ds, "NumberOfFrames", 1, label) or 1
    return [_plane(ds, i, n, label) for i in range(n)]


def _frames(ds: Dataset, path: Path) -> list[_Frame]:
    """Each frame of one instance with its patient geometry (None for all its frames when
    it has none; a DataError when only some frames have it)."""
    pixels = decode_frames(ds, path)
    n = pixels.shape[0]
    instance = _number(ds.get("InstanceNumber"))
    planes = [_plane(ds, i, n, str(path)) for i in range(n)]
    if any(p is None for p in planes) and any(p is not None for p in planes):
        i = next(i for i, p in enumerate(planes) if p is None)
        raise DataError(str(path), f"frame {i + 1} has no plane position/orientation",
                        "export the multi-frame instance with functional groups")
    return [_Frame(pixels[i], plane, instance if n == 1 else i + 1, path, (instance, i))
            for i, plane in enumerate(planes)]


def _number(value: Any) -> int:
    """InstanceNumber as an int for ordering (0 when absent or not a number)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _pair(value: Any) -> tuple[float, float] | None:
    """Two positive finite spacings (mm), or None for an absent or unusable value (a PACS
    sends ``0\\0`` for unknown)."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    ok = all(math.isfinite(v) and v > 0 for v in (a, b))
    return (a, b) if ok else None


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm: PixelSpacing, else the functional groups' pixel
    measures, else ImagerPixelSpacing (projection radiography, at the detector), else the
    first ultrasound region calibrated in cm in both directions, else 1 mm (unknown)."""
    measures = _shared(ds).get("PixelMeasuresSequence")
    for value in (ds.get("PixelSpacing"), measures[0].get("PixelSpacing") if measures else None,
                  ds.get("ImagerPixelSpacing")):
        pair = _pair(value) if value is not None else None
        if pair:
            return pair
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        if region.get("PhysicalUnitsXDirection") == 3 and \
                region.get("PhysicalUnitsYDirection") == 3:  # 3 = cm
            pair = _pair((region.get("PhysicalDeltaY"), region.get("PhysicalDeltaX")))
            if pair:
                return pair[0] * 10.0, pair[1] * 10.0
    return 1.0, 1.0


def _slice_spacing(ds: Dataset) -> float:
    """SpacingBetweenSlices, else SliceThickness, else 1 mm (a single slice or a stack)."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(keyword) or 0.0)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return 1.0


def build_volume(paths: list[Path], *, series_uid: str = "", resample_irregular: bool = True,
                 max_pixel_bytes: int = DEFAULT_MAX_INSTANCE_MB * MIB) -> Volume:
    """One series' instances as a volume (see the module docstring for images without
    patient geometry and whole slides); images with patient geometry are sorted along the
    slice normal.

    Raises DataError when a file is unreadable, not an image SOP class, too large (checked
    before decoding), undecodable, when orientations disagree, two slices share a position,
    slices are missing (a gap far above the typical spacing) or images with and without
    patient geometry are mixed. Irregular spacing without missing slices (e.g.
    variable-pitch CT) is resampled to the median.
    """
    if not paths:
        raise DataError(series_uid or "series", "no instances", "retrieve the series again")
    datasets = [(p, read_instance(p, max_pixel_bytes=max_pixel_bytes)) for p in paths]
    first = datasets[0][1]
    label = series_uid or str(first.get("SeriesInstanceUID", "series"))
    if any(str(ds.get("SOPClassUID", "")) == VL_WHOLE_SLIDE for _, ds in datasets):
        return _slide_volume(datasets, label)
    frames = [f for p, ds in datasets for f in _frames(ds, p)]
    shapes = {f.pixels.shape for f in frames}
    if len(shapes) != 1:
        raise DataError(label, f"slices have different sizes {sorted(shapes)}",
                        "split the series by image size")
    located = [(f, f.plane[0], f.plane[1]) for f in frames if f.plane is not None]
    if not located:
        return _image_stack(frames, datasets, label)
    if len(located) != len(frames):
        odd = next(f for f in frames if f.plane is None)
        raise DataError(str(odd.path), "no ImagePositionPatient/ImageOrientationPatient while "
                        "other images of the series have them", "split the series or "
                        "re-export the instance with its geometry")
    return _located_volume(located, datasets, label, resample_irregular)


def _located_volume(located: list[tuple[_Frame, np.ndarray, np.ndarray]],
                    datasets: list[tuple[Path, Dataset]], label: str,
                    resample_irregular: bool) -> Volume:
    """Frames with patient geometry, (frame, position, orientation), stacked along the
    slice normal."""
    first = datasets[0][1]
    ori0 = located[0][2]
    for f, _, ori in located:
        if not np.allclose(ori, ori0, atol=1e-3):
            raise DataError(str(f.path), f"orientation {ori.round(4).tolist()} differs from "
                            f"the series' {ori0.round(4).tolist()}",
                            "split the series by orientation")
    row, col = ori0[:3], ori0[3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-6:
        raise DataError(str(located[0][0].path), f"ImageOrientationPatient {ori0.tolist()} "
                        "has parallel or zero row and column directions",
                        "re-export the series", kind=UNREADABLE)
    located.sort(key=lambda t: float(np.dot(t[1], normal)))
    frames = [f for f, _, _ in located]
    z = np.array([float(np.dot(pos, normal)) for _, pos, _ in located])
    ps = _pixel_spacing(first)
    irregular = False
    if len(frames) > 1:
        gaps = np.diff(z)
        if np.any(gaps < 1e-3):
            i = int(np.argmin(gaps))
            raise DataError(str(frames[i + 1].path), f"two slices at the same position "
                            f"({z[i]:.2f} mm along the normal)",
                            "remove the duplicate instance or split the series")
        typical = float(np.median(gaps))
        nums = [f.number for f in frames]
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
        dz = _slice_spacing(first)
    arr = np.stack([f.pixels for f in frames]).astype(np.float32)
    if irregular and resample_irregular:
        arr = _resample_along_z(arr, z, dz)
    origin = located[0][1]
    return _volume(arr, (dz, ps[0], ps[1]), datasets, label, irregular=irregular,
                   origin=(float(origin[0]), float(origin[1]), float(origin[2])),
                   direction=np.stack([row, col, normal]))


def _image_stack(frames: list[_Frame], datasets: list[tuple[Path, Dataset]],
                 label: str) -> Volume:
    """Images without patient geometry, one slice each in (InstanceNumber, frame) order;
    the in-plane spacing of every instance must agree."""
    spacings = {p: _pixel_spacing(ds) for p, ds in datasets}
    ps = spacings[datasets[0][0]]
    for p, s in spacings.items():
        if not np.allclose(s, ps, rtol=1e-3):
            raise DataError(str(p), f"pixel spacing {list(s)} differs from the series' "
                            f"{list(ps)}", "split the series by pixel spacing")
    frames = sorted(frames, key=lambda f: (f.order, f.path.name))
    arr = np.stack([f.pixels for f in frames]).astype(np.float32)
    return _volume(arr, (_slice_spacing(datasets[0][1]), ps[0], ps[1]), datasets, label,
                   patient_geometry=False)


def _volume(arr: np.ndarray, spacing: tuple[float, float, float],
            datasets: list[tuple[Path, Dataset]], label: str, *, irregular: bool = False,
            origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
            direction: np.ndarray | None = None, patient_geometry: bool = True) -> Volume:
    first = datasets[0][1]
    return Volume(
        array=arr, spacing=spacing, origin=origin,
        direction=np.eye(3) if direction is None else direction,
        modality=str(first.get("Modality", "")),
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", label)),
        series_description=str(first.get("SeriesDescription", "")), irregular_spacing=irregular,
        source_files=[str(p) for p, _ in datasets], patient_geometry=patient_geometry,
        patient_id=str(first.get("PatientID", "") or "").strip())


# --------------------------------------------------------------------------- whole slides
def _slide_volume(datasets: list[tuple[Path, Dataset]], label: str) -> Volume:
    """The largest VOLUME level of a whole-slide series as one depth-1 image (its LABEL,
    OVERVIEW and THUMBNAIL images, and smaller levels, are not used)."""
    others = [p for p, ds in datasets if str(ds.get("SOPClassUID", "")) != VL_WHOLE_SLIDE]
    if others:
        raise DataError(str(others[0]), "an image of another SOP class in a whole-slide "
                        "series", "split the series")

    def kind(ds: Dataset) -> str:
        image_type = ds.get("ImageType") or []
        return str(image_type[2]).upper() if len(image_type) > 2 else ""

    def area(item: tuple[Path, Dataset]) -> int:
        return (_header_int(item[1], "TotalPixelMatrixRows", 0, str(item[0]))
                * _header_int(item[1], "TotalPixelMatrixColumns", 0, str(item[0])))

    levels = [d for d in datasets if kind(d[1]) == "VOLUME"] or datasets
    path, ds = max(levels, key=area)
    arr = _assemble_slide(ds, path)[None]
    measures = _shared(ds).get("PixelMeasuresSequence")
    dz = _slice_spacing(measures[0]) if measures else 1.0
    ps = _pixel_spacing(ds)
    return _volume(arr, (dz, ps[0], ps[1]), [(path, ds)], label, patient_geometry=False)


def _tile_origins(ds: Dataset, frames: int, rows: int, cols: int, total: tuple[int, int],
                  label: str) -> dict[int, tuple[int, int]]:
    """Frame index -> (row, column) of its top-left pixel in the total pixel matrix, for
    the tiles of the first focal plane and optical path: TILED_FULL in row-major order, else
    each frame's Plane Position (Slide) functional group (1-based positions)."""
    if str(ds.get("DimensionOrganizationType", "")).upper() == "TILED_FULL":
        across, down = -(-total[1] // cols), -(-total[0] // rows)
        if frames < across * down:
            raise DataError(label, f"{frames} tiles for a {total[0]}x{total[1]} matrix of "
                            f"{rows}x{cols} tiles ({across * down} needed)",
                            "retrieve the instance again", kind=TRUNCATED)
        return {i: ((i // across) * rows, (i % across) * cols) for i in range(across * down)}
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    out: dict[int, tuple[int, int]] = {}
    seen: set[tuple[int, int]] = set()
    for i in range(frames):
        seq = per_frame[i].get("PlanePositionSlideSequence") if i < len(per_frame) else None
        if not seq:
            raise DataError(label, f"tile {i + 1} has no Plane Position (Slide)", "export the "
                            "slide with DimensionOrganizationType TILED_FULL or per-frame "
                            "positions", kind=UNREADABLE)
        r = _header_int(seq[0], "RowPositionInTotalImagePixelMatrix", None, label) - 1
        c = _header_int(seq[0], "ColumnPositionInTotalImagePixelMatrix", None, label) - 1
        if not (0 <= r < total[0] and 0 <= c < total[1]):
            raise DataError(label, f"tile {i + 1} at ({r + 1}, {c + 1}) lies outside the "
                            f"{total[0]}x{total[1]} matrix", "re-export the slide",
                            kind=UNREADABLE)
        if (r, c) not in seen:  # another focal plane / optical path of a tile already placed
            seen.add((r, c))
            out[i] = (r, c)
    return out


def _assemble_slide(ds: Dataset, path: Path) -> np.ndarray:
    """The total pixel matrix of one whole-slide instance, tile by tile (float32 luminance);
    its size was bounded by :func:`check_pixel_size` before anything was decoded."""
    label = str(path)
    rows = _header_int(ds, "Rows", None, label)
    cols = _header_int(ds, "Columns", None, label)
    total = (_header_int(ds, "TotalPixelMatrixRows", None, label),
             _header_int(ds, "TotalPixelMatrixColumns", None, label))
    if min(rows, cols, *total) == 0:
        raise DataError(label, "a whole slide with an empty tile or pixel matrix",
                        "re-export the slide", kind=UNREADABLE)
    frames = _header_int(ds, "NumberOfFrames", 1, label) or 1
    origins = _tile_origins(ds, frames, rows, cols, total, label)
    out = np.zeros(total, np.float32)
    decoder = _decoder(ds, label)
    indices = sorted(origins)
    tiles: Iterator[tuple[np.ndarray, dict[str, Any]]] = decoder.iter_array(
        ds, indices=indices, as_rgb=True)
    for i in indices:
        try:
            tile, meta = next(tiles)
        except _DECODE_ERRORS as exc:
            raise _undecodable(label, exc, f" of tile {i + 1}") from exc
        gray = _monochrome(ds, tile[None], str(meta.get("photometric_interpretation", "")), i,
                           label)
        r, c = origins[i]
        h, w = min(rows, total[0] - r), min(cols, total[1] - c)
        out[r:r + h, c:c + w] = gray[0, :h, :w]
    return out

def _resample_along_z(arr: np.ndarray, z: np.ndarray, dz: float) -> np.ndarray:
    """Linear interpolation of slices at positions ``z`` onto a uniform grid of step ``dz``."""
    grid = np.arange(z[0], z[-1] + 1e-6, dz)
    idx = np.clip(np.searchsorted(z, grid, side="right") - 1, 0, len(z) - 2)
    t = ((grid - z[idx]) / (z[idx + 1] - z[idx])).astype(np.float32)[:, None, None]
    return (1 - t) * arr[idx] + t * arr[idx + 1]
