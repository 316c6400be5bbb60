"""Supported DICOM (#14): the SOP classes a radiology/pathology PACS serves and the compressed
transfer syntaxes decoded by the pixel-data plugins fedpacs installs, each on real files
through fedpacs' own conversion (build_volume, which the ingest runs); damaged compressed
frames skipped with a reason code, the rest kept, nothing half-written in the cache.

Real files: pydicom's bundled test files and those of the ``pydicom-data`` package (the NEMA
compression samples: CT 693, MR2, CR RG1/RG3, US US1, OBXXXX1A; Enhanced MR emri_small; SEG
liver), read from disk only (``download=False``), and the real brain MR series of
shared/data. No real DX, MG, PET or whole-slide file is on disk: those tests re-label real
CR / MR / US pixels and say so.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder, get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    MPEG4HP41,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from fedpacs.client import volumes
from fedpacs.client.dicom import (
    IMAGE_SOP_CLASSES,
    NO_DECODER,
    NO_PIXELS,
    TOO_LARGE,
    TRUNCATED,
    UNDECODABLE,
    UNREADABLE,
    UNSUPPORTED_SOP,
    VL_WHOLE_SLIDE,
    Volume,
    build_volume,
    encapsulation_problem,
)
from fedpacs.client.ingest import import_folder, ingest
from fedpacs.client.pacs import CohortQuery, PacsConfig
from fedpacs.client.volumes import list_volumes, load_volume
from fedpacs.common.errors import DataError
from tests.fakepacs import FakePacs, ct_series, part10

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as the reader uses


def real(name: str) -> Path:
    """A real DICOM file of pydicom's test data on disk (pydicom itself and the pydicom-data
    package, a dev dependency); never downloaded."""
    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(f"{name} is not on disk: `pip install -e '.[dev]'` installs "
                                "pydicom-data, which holds it")
    return Path(str(found))


def convert(name: str, **kw: int) -> Volume:
    return build_volume([real(name)], **kw)


def refused(paths: list[Path], **kw: int) -> DataError:
    with pytest.raises(DataError) as info:
        build_volume(paths, **kw)
    return info.value


def syntax(name: str) -> UID:
    return UID(str(pydicom.dcmread(real(name), stop_before_pixels=True)
                   .file_meta.TransferSyntaxUID))


def psnr(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(np.sqrt(np.mean((ref.astype(np.float64) - got) ** 2)))
    return float("inf") if err == 0 else 20 * np.log10(float(np.ptp(ref)) / err)


# --------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("ts", [JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                                JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
                                JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL,
                                HTJ2K, RLELossless], ids=lambda u: u.name)
def test_the_installed_plugins_decode_every_compressed_syntax(ts: UID) -> None:
    """pyproject's decoder dependencies (pylibjpeg + libjpeg/openjpeg/rle, pyjpegls) are
    what pydicom's pixel-data handler list finds, not only pillow's partial support."""
    decoder = get_decoder(ts)
    assert decoder.is_available
    assert {"pylibjpeg", "pyjpegls"} & set(decoder.available_plugins)


def test_a_syntax_without_a_decoder_is_coded(tmp_path: Path) -> None:
    ds = pydicom.dcmread(real("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG4HP41  # video: no pydicom plugin decodes it
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" * 4])
    ds.save_as(tmp_path / "video.dcm")
    err = refused([tmp_path / "video.dcm"])
    assert err.kind == NO_DECODER and "MPEG-4" in err.problem


# --------------------------------------------------------------------------- lossless
# (uncompressed reference, compressed file): the same real image, decoded pixels identical
LOSSLESS = [
    ("MR_small.dcm", "MR_small_RLE.dcm"),                       # MR, RLE
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),          # MR, JPEG-LS lossless
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),              # MR, JPEG 2000 lossless
    ("emri_small.dcm", "emri_small_RLE.dcm"),                   # Enhanced MR, 10 frames
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
    ("693_UNCR.dcm", "693_J2KR.dcm"),                           # CT 512x512
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),                           # CR 1955x1841 MONOCHROME1
    ("US1_UNCR.dcm", "US1_J2KR.dcm"),                           # US, RGB
    ("OBXXXX1A_2frame.dcm", "OBXXXX1A_rle_2frame.dcm"),         # US, palette colour, 2 frames
    ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm"),                     # JPEG lossless SV1, RGB
    ("SC_rgb_16bit_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm"),  # RLE, 16-bit RGB, 2 frames
    ("JPEG2000_UNC.dcm", "JPEG2000.dcm"),  # NM; its J2K is lossy, the reference its decoding
]


@pytest.mark.parametrize("reference,compressed", LOSSLESS, ids=[c for _, c in LOSSLESS])
def test_lossless_syntaxes_give_the_uncompressed_volume(reference: str, compressed: str
                                                        ) -> None:
    assert syntax(compressed).is_compressed and not syntax(reference).is_compressed
    want, got = convert(reference), convert(compressed)
    assert got.array.dtype == np.float32 and got.array.shape == want.array.shape
    assert np.array_equal(got.array, want.array)
    assert (got.spacing, got.origin, got.patient_geometry) == \
        (want.spacing, want.origin, want.patient_geometry)


def test_lossless_volumes_hold_the_stored_values_through_the_modality_lut() -> None:
    ds = pydicom.dcmread(real("MR_small_jpeg_ls_lossless.dcm"))
    vol = convert("MR_small_jpeg_ls_lossless.dcm")
    assert vol.array[0].tolist() == (ds.pixel_array.astype(np.float32)
                                     * float(ds.get("RescaleSlope", 1))
                                     + float(ds.get("RescaleIntercept", 0))).tolist()
    # an enhanced multi-frame without plane positions: a stack of its 10 frames
    emri = pydicom.dcmread(real("emri_small_RLE.dcm"))
    stack = convert("emri_small_RLE.dcm")
    assert stack.array.shape == (10, 64, 64) and not stack.patient_geometry
    assert np.array_equal(stack.array, emri.pixel_array.astype(np.float32))


# --------------------------------------------------------------------------- lossy
# (original, NEMA's decoding of the lossy file, lossy file, least PSNR vs the original)
LOSSY_J2K = [("693_UNCR.dcm", "693_UNCI.dcm", "693_J2KI.dcm", 30.0),    # CT
             ("MR2_UNCR.dcm", "MR2_UNCI.dcm", "MR2_J2KI.dcm", 38.0),    # MR 1024x1024
             ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KI.dcm", 50.0),    # CR
             ("US1_UNCR.dcm", "US1_UNCI.dcm", "US1_J2KI.dcm", 37.0)]    # US RGB


@pytest.mark.parametrize("original,decoded,lossy,least", LOSSY_J2K,
                         ids=[x[2] for x in LOSSY_J2K])
def test_lossy_jpeg2000_matches_its_reference_decoding(original: str, decoded: str,
                                                       lossy: str, least: float) -> None:
    assert syntax(lossy) == JPEG2000
    got = convert(lossy)
    assert np.array_equal(got.array, convert(decoded).array)  # NEMA's reference decoding
    assert psnr(convert(original).array, got.array) >= least


@pytest.mark.parametrize("lossy,ts,max_error", [
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit, 6.0),      # JPEG baseline, YBR_FULL_422
    ("SC_rgb_jpeg_lossy_gdcm.dcm", JPEGBaseline8Bit, 8.0),
    ("SC_rgb_jls_lossy_line.dcm", JPEGLSNearLossless, 2.0),  # NEAR = 2 in its scan header
    ("SC_rgb_jls_lossy_sample.dcm", JPEGLSNearLossless, 2.0),
])
def test_lossy_jpeg_and_jpeg_ls_within_their_error_bound(lossy: str, ts: UID,
                                                         max_error: float) -> None:
    assert syntax(lossy) == ts
    ref, got = convert("SC_rgb.dcm"), convert(lossy)
    assert got.array.shape == ref.array.shape == (1, 100, 100)
    assert float(np.abs(got.array - ref.array).max()) <= max_error
    assert psnr(ref.array, got.array) >= 45


def test_jpeg_extended_12_bit_is_the_lossless_image_within_tolerance() -> None:
    """JPGExtended.dcm (12-bit lossy) and JPEG-LL.dcm (lossless) hold the same NM image."""
    assert (syntax("JPGExtended.dcm"), syntax("JPEG-LL.dcm")) == (JPEGExtended12Bit,
                                                                  JPEGLosslessSV1)
    lossy, ref = convert("JPGExtended.dcm"), convert("JPEG-LL.dcm")
    assert lossy.array.shape == ref.array.shape == (1, 1024, 256)
    assert psnr(ref.array, lossy.array) >= 35
    assert lossy.spacing[1:] == pytest.approx((2.26, 2.26))


@pytest.mark.parametrize("name,ts,shape", [
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", JPEGLosslessSV1, (1, 768, 1024)),  # US, 8-bit
    ("JPEGLSNearLossless_16.dcm", JPEGLSNearLossless, (1, 50, 10)),        # 16-bit grey
    ("examples_ybr_color.dcm", JPEGBaseline8Bit, (30, 240, 320)),          # US cine, YBR
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian, (1, 512, 512)),
])
def test_compressed_files_without_a_reference_decode(name: str, ts: UID,
                                                     shape: tuple[int, ...]) -> None:
    assert syntax(name) == ts
    ds = pydicom.dcmread(real(name))
    vol = convert(name)
    assert vol.array.shape == shape and np.isfinite(vol.array).all()
    if ds.SamplesPerPixel == 1:
        assert np.array_equal(vol.array.reshape(ds.pixel_array.shape),
                              ds.pixel_array.astype(np.float32))
    else:  # colour: BT.601 luminance of pydicom's RGB
        assert np.allclose(vol.array, (ds.pixel_array.astype(np.float32) @ LUMA)
                           .reshape(shape), atol=1e-3)


# --------------------------------------------------------------------------- modalities
def test_ct_and_mr_keep_their_patient_geometry() -> None:
    ct = convert("693_J2KR.dcm")
    ds = pydicom.dcmread(real("693_J2KR.dcm"), stop_before_pixels=True)
    assert ct.patient_geometry and ct.modality == "CT" and ct.array.shape == (1, 512, 512)
    assert ct.origin == pytest.approx(tuple(float(v) for v in ds.ImagePositionPatient))
    assert ct.spacing[1:] == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    assert ct.array.min() == -3024  # HU after the rescale
    # Enhanced CT: plane positions in the functional groups
    enhanced = convert("eCT_Supplemental.dcm")
    assert enhanced.patient_geometry and enhanced.array.shape == (2, 512, 512)
    mr = convert("MR2_J2KR.dcm")
    assert mr.patient_geometry and mr.modality == "MR" and mr.array.shape == (1, 1024, 1024)


def test_cr_monochrome1_is_a_depth_1_image_inverted_in_its_stored_range() -> None:
    ds = pydicom.dcmread(real("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    assert "ImagePositionPatient" not in ds and [float(v) for v in ds.PixelSpacing] == [0, 0]
    vol = convert("RG1_UNCR.dcm")
    assert vol.modality == "CR" and vol.array.shape == (1, 1955, 1841)
    assert not vol.patient_geometry and vol.origin == (0.0, 0.0, 0.0)
    assert np.array_equal(vol.direction, np.eye(3))
    assert vol.spacing == (1.0, 1.0, 1.0)  # PixelSpacing 0\0: unknown, not zero
    assert np.array_equal(vol.array[0], (2**15 - 1) - ds.pixel_array.astype(np.float32))


def test_us_colour_and_palette_become_luminance_with_region_spacing() -> None:
    rgb = pydicom.dcmread(real("US1_UNCR.dcm"))
    vol = convert("US1_UNCR.dcm")
    assert vol.modality == "US" and vol.array.shape == (1, 480, 640)
    assert np.allclose(vol.array[0], rgb.pixel_array.astype(np.float32) @ LUMA, atol=1e-3)
    pal = pydicom.dcmread(real("OBXXXX1A_rle.dcm"))
    [region] = [r for r in pal.SequenceOfUltrasoundRegions if r.PhysicalUnitsXDirection == 3]
    vol = convert("OBXXXX1A_rle.dcm")
    assert vol.spacing[1:] == pytest.approx((10 * region.PhysicalDeltaY,
                                             10 * region.PhysicalDeltaX))  # cm -> mm
    assert vol.array.shape == (1, 600, 800) and vol.array.max() > 0


@pytest.mark.parametrize("name,kind,text", [
    ("liver.dcm", UNSUPPORTED_SOP, "Segmentation is a label map"),       # SEG, 3 frames
    ("liver_1frame.dcm", UNSUPPORTED_SOP, "Segmentation is a label map"),
    ("rtdose.dcm", UNSUPPORTED_SOP, "RT Dose is a dose grid"),
    ("test-SR.dcm", NO_PIXELS, "no pixel data"),
])
def test_objects_that_are_not_image_series_are_refused_with_a_code(name: str, kind: str,
                                                                   text: str) -> None:
    err = refused([real(name)])
    assert err.kind == kind and text in err.problem and err.fix


def relabel(ds: Dataset, sop_class: str, modality: str) -> Dataset:
    out = copy.deepcopy(ds)
    out.SOPClassUID = out.file_meta.MediaStorageSOPClassUID = sop_class
    out.Modality = modality
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return out


@pytest.mark.parametrize("sop_class,modality", [
    ("1.2.840.10008.5.1.4.1.1.1.1", "DX"),
    ("1.2.840.10008.5.1.4.1.1.1.2", "MG"),
])
def test_dx_and_mg_use_the_imager_pixel_spacing(tmp_path: Path, sop_class: str,
                                                modality: str) -> None:
    """No real DX or MG file is on disk: the real CR RG3 (MONOCHROME1, 1760x1760, no
    PixelSpacing) re-labelled, with the ImagerPixelSpacing such detectors send."""
    ds = relabel(pydicom.dcmread(real("RG3_J2KR.dcm")), sop_class, modality)
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.save_as(tmp_path / "x.dcm")
    assert sop_class in IMAGE_SOP_CLASSES
    vol = build_volume([tmp_path / "x.dcm"])
    assert vol.modality == modality and vol.spacing == (1.0, 0.1, 0.1)
    assert np.array_equal(vol.array, convert("RG3_UNCR.dcm").array)


def test_pet_slices_keep_their_own_rescale_slope(tmp_path: Path, data_dir: Path) -> None:
    """No real PET file is on disk: a real MR series re-labelled as PET, each slice with
    its own RescaleSlope as PET scanners write them."""
    files = sorted((data_dir / "dicom_brainmr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    mr = build_volume(files)
    series, paths = generate_uid(), []
    for i, f in enumerate(files):
        ds = relabel(pydicom.dcmread(f), "1.2.840.10008.5.1.4.1.1.128", "PT")
        ds.SeriesInstanceUID = series
        ds.RescaleSlope, ds.RescaleIntercept = 0.5 + i / 8, 0
        ds.save_as(tmp_path / f"{i}.dcm")
        paths.append(tmp_path / f"{i}.dcm")
    pet = build_volume(paths)
    assert pet.modality == "PT" and pet.array.shape == mr.array.shape
    slopes = {float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]):
              float(pydicom.dcmread(p, stop_before_pixels=True).RescaleSlope) for p in paths}
    ordered = [slopes[z] for z in sorted(slopes)]  # slices sorted along the normal (+z)
    assert np.allclose(pet.array, mr.array * np.array(ordered, np.float32)[:, None, None])


# --------------------------------------------------------------------------- whole slides
def slide_level(rgb: np.ndarray, tile: int, image_type: str, series: str, study: str, *,
                sparse: bool = False) -> Dataset:
    """One VL Whole Slide Microscopy instance of ``rgb`` in JPEG 2000 tiles: TILED_FULL, or
    with ``sparse`` in reverse order, each tile placed by its Plane Position (Slide)."""
    rows, cols = rgb.shape[:2]
    down, across = -(-rows // tile), -(-cols // tile)
    padded = np.zeros((down * tile, across * tile, 3), np.uint8)
    padded[:rows, :cols] = rgb
    encoder = get_encoder(JPEG2000Lossless)
    frames = [encoder.encode(np.ascontiguousarray(padded[r:r + tile, c:c + tile]),
                             rows=tile, columns=tile, samples_per_pixel=3, bits_allocated=8,
                             bits_stored=8, pixel_representation=0, number_of_frames=1,
                             photometric_interpretation="RGB", planar_configuration=0)
              for r in range(0, down * tile, tile) for c in range(0, across * tile, tile)]
    origins = [(r, c) for r in range(0, down * tile, tile) for c in range(0, across * tile, tile)]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = VL_WHOLE_SLIDE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "SM"
    ds.ImageType = ["DERIVED", "PRIMARY", image_type, "NONE"]
    ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
    if sparse:
        frames, origins = frames[::-1], origins[::-1]
        groups = []
        for r, c in origins:
            position, group = Dataset(), Dataset()
            position.RowPositionInTotalImagePixelMatrix = r + 1
            position.ColumnPositionInTotalImagePixelMatrix = c + 1
            group.PlanePositionSlideSequence = Sequence([position])
            groups.append(group)
        ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rows, cols
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    measures = Dataset()
    measures.PixelSpacing = [0.00025 * 640 / cols] * 2  # mm: a 40x scan at the base level
    measures.SliceThickness = 0.004
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A whole-slide series (no real one is on disk): the real US1 RGB image as the base
    level (480x640 in 20 tiles of 128), a 2x smaller level and a label image."""
    rgb = pydicom.dcmread(real("US1_UNCR.dcm")).pixel_array
    folder = tmp_path_factory.mktemp("slide")
    study, series = generate_uid(), generate_uid()
    levels = {"base": slide_level(rgb, 128, "VOLUME", series, study),
              "half": slide_level(rgb[::2, ::2], 128, "VOLUME", series, study),
              "label": slide_level(rgb[:200, :600], 256, "LABEL", series, study)}
    for name, ds in levels.items():
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
    return folder, rgb


def test_a_whole_slide_is_its_largest_level_assembled_from_tiles(
        slide: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    folder, rgb = slide
    vol = build_volume(sorted(folder.glob("*.dcm")))
    assert vol.modality == "SM" and not vol.patient_geometry
    assert vol.array.shape == (1, 480, 640) and vol.source_files == [str(folder / "base.dcm")]
    assert np.allclose(vol.array[0], rgb.astype(np.float32) @ LUMA, atol=1e-3)
    assert vol.spacing == pytest.approx((0.004, 0.00025, 0.00025))
    # the ingest's path: store (size and structure checks), convert, one volume
    s = import_folder(folder, tmp_path / "cache")
    assert s.skipped == [] and s.converted == 1
    [path] = list_volumes(tmp_path / "cache")
    assert np.array_equal(load_volume(path)[0], vol.array)


def test_a_sparsely_tiled_slide_places_each_tile_by_its_position(tmp_path: Path) -> None:
    rgb = pydicom.dcmread(real("US1_UNCR.dcm")).pixel_array
    slide_level(rgb, 128, "VOLUME", generate_uid(), generate_uid(), sparse=True).save_as(
        tmp_path / "sparse.dcm", enforce_file_format=True)
    vol = build_volume([tmp_path / "sparse.dcm"])
    assert np.allclose(vol.array[0], rgb.astype(np.float32) @ LUMA, atol=1e-3)


def test_a_whole_slide_over_the_memory_bound_is_too_large(slide: tuple[Path, np.ndarray]
                                                          ) -> None:
    folder, _ = slide
    err = refused(sorted(folder.glob("*.dcm")), max_pixel_bytes=480 * 640 * 3 - 1)
    assert err.kind == TOO_LARGE and err.path.endswith("base.dcm")
    # its 20 tiles of 128x128 (the matrix padded to whole tiles), checked before decoding
    assert f"header promises {20 * 128 * 128 * 3} bytes" in err.problem


# --------------------------------------------------------------------------- damage
def frames_of(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames",
                                                                             1) or 1)))


def with_frames(ds: Dataset, frames: list[bytes]) -> Dataset:
    out = copy.deepcopy(ds)
    out.PixelData = encapsulate([f + b"\0" * (len(f) % 2) for f in frames])
    return out


def cut(frame: bytes) -> bytes:
    return frame[: len(frame) // 2]


def scrambled(frame: bytes) -> bytes:
    """Its header bytes replaced (the start and end markers kept): the decoder refuses."""
    noise = np.random.default_rng(7).integers(0, 256, 30, dtype=np.uint8).tobytes()
    return frame[:2] + noise + frame[32:]


@pytest.mark.parametrize("name,damage,kind", [
    ("MR_small_jp2klossless.dcm", cut, TRUNCATED),
    ("MR_small_jpeg_ls_lossless.dcm", cut, TRUNCATED),
    ("JPGExtended.dcm", cut, TRUNCATED),  # libjpeg decodes half a JPEG without an error
    ("SC_rgb_jpeg_dcmtk.dcm", cut, TRUNCATED),
    ("MR_small_jp2klossless.dcm", scrambled, UNDECODABLE),
    ("MR_small_jpeg_ls_lossless.dcm", scrambled, UNDECODABLE),
    ("MR_small_RLE.dcm", cut, UNDECODABLE),  # RLE has no end marker: the decoder notices
    ("MR_small_RLE.dcm", scrambled, UNDECODABLE),
])
def test_a_damaged_frame_of_a_real_file_is_coded(tmp_path: Path, name: str,
                                                 damage: Callable[[bytes], bytes],
                                                 kind: str) -> None:
    ds = pydicom.dcmread(real(name))
    [frame] = frames_of(ds)
    with_frames(ds, [damage(frame)]).save_as(tmp_path / "x.dcm")
    err = refused([tmp_path / "x.dcm"])
    assert err.kind == kind and str(tmp_path / "x.dcm") == err.path and err.fix


def test_a_damaged_frame_of_a_multi_frame_image_is_coded(tmp_path: Path) -> None:
    ds = pydicom.dcmread(real("emri_small_jpeg_2k_lossless.dcm"))
    frames = frames_of(ds)
    assert len(frames) == 10
    with_frames(ds, frames[:4] + [cut(frames[4])] + frames[5:]).save_as(tmp_path / "cut.dcm")
    err = refused([tmp_path / "cut.dcm"])
    assert err.kind == TRUNCATED and "9 of 10 frame(s) end with a JPEG end marker" in err.problem
    with_frames(ds, frames[:9]).save_as(tmp_path / "short.dcm")
    assert refused([tmp_path / "short.dcm"]).kind == TRUNCATED


def test_real_damaged_files_are_coded() -> None:
    # pydicom's JPEG-lossy.dcm: a scan header libjpeg and pillow refuse (only GDCM reads it)
    err = refused([real("JPEG-lossy.dcm")])
    assert err.kind == UNDECODABLE and "libjpeg" in err.problem


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
def test_a_real_file_cut_inside_its_pixel_data_is_coded() -> None:
    """pydicom-data's emri_small_jpeg_2k_lossless_too_short.dcm ends inside its
    encapsulated pixel data: pydicom warns and keeps no element of it."""
    err = refused([real("emri_small_jpeg_2k_lossless_too_short.dcm")])
    assert err.kind == UNREADABLE and "no data element" in err.problem


@pytest.mark.parametrize("data,frames,markers,problem", [
    (b"", 1, True, "0 fragment(s) for 1 frame(s)"),
    (encapsulate([b"\xff\xd8..\xff\xd9"]), 1, True, ""),
    (encapsulate([b"\xff\xd8..\xff\xd9"])[:-2], 1, True, "cut short: an item"),
    (encapsulate([b"\xff\xd8....."]), 1, True, "0 of 1 frame(s) end with"),
    (encapsulate([b"\xff\xd8....."]), 1, False, ""),  # RLE: no marker to check
    (encapsulate([b"ab", b"cd"]), 3, False, "2 fragment(s) for 3 frame(s)"),
    (b"\x00" * 16, 1, True, "not encapsulated"),
    (encapsulate([b"ab"])[:14], 1, False, "cut inside an item header"),
])
def test_encapsulation_problems(data: bytes, frames: int, markers: bool, problem: str
                                ) -> None:
    got = encapsulation_problem(data, frames, markers=markers)
    assert (problem in got) if problem else got == ""


def compressed_series(folder: Path, ts: UID) -> list[Dataset]:
    """A real MR series (shared/data) compressed losslessly with pydicom's encoders."""
    out = []
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.compress(ts, generate_instance_uid=False)
        out.append(ds)
    return out


def top_slice(series: list[Dataset]) -> Dataset:
    return max(series, key=lambda ds: float(ds.ImagePositionPatient[2]))


def test_damaged_frames_are_skipped_and_the_rest_of_the_cohort_kept(tmp_path: Path,
                                                                    data_dir: Path) -> None:
    """Over the ingest (fake PACS, real compressed series): a frame cut short is refused
    when stored (the rest of its series converts); a frame the decoder refuses loses its
    series (a volume with a hole would not match its labels), never the other series; no
    partial file anywhere in the cache."""
    mr = data_dir / "dicom_brainmr"
    cut_series = compressed_series(mr / "Study1" / "13_HCropVolume", JPEG2000Lossless)
    bad_series = compressed_series(mr / "Study2" / "14_HCropVolume", JPEGLSLossless)
    good_series = ct_series(3)
    for ds in good_series:
        ds.compress(RLELossless, generate_instance_uid=False)
    top = top_slice(cut_series)  # its loss leaves a whole, shorter volume
    middle = sorted(bad_series, key=lambda ds: float(ds.ImagePositionPatient[2]))[17]
    corrupt = {str(top.SOPInstanceUID): part10(with_frames(top, [cut(frames_of(top)[0])])),
               str(middle.SOPInstanceUID): part10(with_frames(middle, [
                   scrambled(frames_of(middle)[0])]))}
    pacs = FakePacs(cut_series + bad_series + good_series, corrupt=corrupt)
    s = ingest(PacsConfig(port=1), CohortQuery(), tmp_path, transport=pacs)

    kinds = {sk.kind: sk for sk in s.skipped}
    assert set(kinds) == {TRUNCATED, UNDECODABLE} and len(s.skipped) == 2
    assert kinds[TRUNCATED].item.endswith(str(top.SOPInstanceUID))
    assert kinds[UNDECODABLE].item.endswith(f"{middle.SOPInstanceUID}.dcm")
    assert s.counts()["skipped-undecodable"] == 1 and s.counts()["skipped-truncated"] == 1
    assert s.converted == 2 and s.retrieved == 31 + 35 + 3
    by_series = {p.stem: p for p in list_volumes(tmp_path)}
    assert set(by_series) == {str(cut_series[0].SeriesInstanceUID),
                              str(good_series[0].SeriesInstanceUID)}
    # the cut series: its 31 intact slices, identical to the uncompressed originals
    arr, _ = load_volume(by_series[str(cut_series[0].SeriesInstanceUID)])
    originals = [f for f in sorted((mr / "Study1" / "13_HCropVolume").glob("*.dcm"))
                 if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                 != top.SOPInstanceUID]
    assert np.array_equal(arr, build_volume(originals).array)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name] == []
    assert len(list((tmp_path / "volumes").iterdir())) == 2
    # the undecodable instance left the cache: the next ingest retrieves it again (now
    # intact) and converts its series; nothing else is fetched twice
    again = ingest(PacsConfig(port=1), CohortQuery(), tmp_path,
                   transport=FakePacs(cut_series + bad_series + good_series,
                                      corrupt={k: v for k, v in corrupt.items()
                                               if k == str(top.SOPInstanceUID)}))
    assert {sk.kind for sk in again.skipped} == {TRUNCATED}
    # the middle slice came again; the cut one is refused at storing again, as before
    assert again.retrieved == 1 and again.converted == 3


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
def test_an_imported_cohort_of_real_files_keeps_what_converts(tmp_path: Path) -> None:
    """import_folder (a CD): real files of several SOP classes and syntaxes, each its own
    series; the damaged and the non-image ones skipped with their codes, the rest kept."""
    cd = tmp_path / "cd"
    cd.mkdir()
    names = {"693_J2KR.dcm": "converted", "MR_small_RLE.dcm": "converted",
             "US1_J2KI.dcm": "converted", "RG3_J2KR.dcm": "converted",
             "emri_small_jpeg_ls_lossless.dcm": "converted", "JPEG-lossy.dcm": UNDECODABLE,
             "emri_small_jpeg_2k_lossless_too_short.dcm": UNREADABLE,
             "liver_1frame.dcm": "label-unmatched"}  # a SEG of a series not imported
    for name in names:
        (cd / name).write_bytes(real(name).read_bytes())
    s = import_folder(cd, tmp_path / "cache")
    # conversion names the cached file (<SOP Instance UID>.dcm), storing the file imported
    sop = {f"{pydicom.dcmread(real(n), stop_before_pixels=True).SOPInstanceUID}.dcm": n
           for n in names}
    skipped = {sop.get(Path(sk.item).name, Path(sk.item).name): sk.kind for sk in s.skipped}
    assert skipped == {n: k for n, k in names.items() if k != "converted"}
    assert s.converted == 5 and len(list_volumes(tmp_path / "cache")) == 5
    assert [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name] == []


def test_a_failed_volume_write_leaves_no_temporary_and_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = volumes.volume_path(tmp_path, "1.2.3")
    volumes.save_volume(dest, array=np.zeros((1, 2, 2), np.float32), spacing=(1.0, 1.0, 1.0),
                        origin=(0.0, 0.0, 0.0), direction=np.eye(3), meta={"fingerprint": "a"})

    def disk_full(file: io.BufferedWriter, **_: object) -> None:
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volumes.np, "savez", disk_full)
    with pytest.raises(OSError):
        volumes.save_volume(dest, array=np.ones((1, 2, 2), np.float32), spacing=(1.0,) * 3,
                            origin=(0.0,) * 3, direction=np.eye(3), meta={"fingerprint": "b"})
    assert sorted(p.name for p in dest.parent.iterdir()) == ["1.2.3.npz"]
    monkeypatch.undo()
    assert volumes.volume_meta(dest)["fingerprint"] == "a"


def test_uncompressed_ybr_full_422_is_not_mistaken_for_truncated() -> None:
    """Two samples a pixel as stored (PS3.3 C.7.6.3.1.2), three once decoded."""
    ds = pydicom.dcmread(real("SC_ybr_full_422_uncompressed.dcm"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    vol = convert("SC_ybr_full_422_uncompressed.dcm")
    assert vol.array.shape == (1, 100, 100)
    rgb = convert("SC_rgb.dcm")
    assert float(np.abs(vol.array - rgb.array).max()) <= 3  # chroma subsampling only
