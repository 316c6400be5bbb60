"""Labels from the PACS: DICOM SEG and RTSTRUCT instances referencing an image series become
label maps on its converted grid (fedpacs.client.seglabels), found and retrieved by the
ingest like any series. Round trips on real hippocampus cases (mask -> SEG written with
highdicom / RTSTRUCT traced from the mask -> ingest -> label map) are exact; label series
that cannot be used are skipped with their reason code, the rest of the cohort is kept and
nothing is half-written under labels/; a federation trains on PACS-ingested SEG labels."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from skimage.measure import find_contours

from fedpacs.client import seglabels
from fedpacs.client.dicom import RTSTRUCT_STORAGE
from fedpacs.client.ingest import import_folder, ingest
from fedpacs.client.pacs import CohortQuery, PacsConfig, label_kinds
from fedpacs.client.volumes import LABELS_DIR, load_label
from fedpacs.common.datasets import read_nifti
from fedpacs.common.errors import DataError
from fedpacs.deploy.orthanc import OrthancServer, orthanc_available, store_files
from tests.fakepacs import FakePacs
from tests.hippo_pacs import write_case_dicom

HIPPO = "msd_hippocampus_udacity"
CLASSES = ("background", "anterior", "posterior")
PACS = PacsConfig(port=1)  # never dialled where a test injects the fake transport
needs_orthanc = pytest.mark.skipif(not orthanc_available() and not os.environ.get("CI"),
                                   reason="Orthanc not installed")


# --------------------------------------------------------------------------- helpers
def case_series(data_dir: Path, cid: str, out: Path, *, study_uid: str | None = None
                ) -> tuple[str, list[Dataset], np.ndarray]:
    """A hippocampus case as an MR series under ``out`` (in its own study unless
    ``study_uid``): (series UID, its datasets, the case's label NIfTI on the converted grid
    (slice, row, column))."""
    root = data_dir / HIPPO
    uid, files = write_case_dicom(root / "images" / f"{cid}.nii.gz", out, patient_id=cid,
                                  study_uid=study_uid)
    mask = np.transpose(read_nifti(root / "labels" / f"{cid}.nii.gz")).astype(np.int64)
    images: list[Dataset] = [pydicom.dcmread(f) for f in files]
    for ds in images:  # a family name (highdicom warns about a name of one component)
        ds.PatientName = f"{cid}^"
    return uid, images, mask


def write_seg(images: list[Dataset], mask: np.ndarray, path: Path, *,
              names: tuple[str, ...] = ("anterior", "posterior"),
              fractional: bool = False) -> Dataset:
    """A DICOM SEG (highdicom) of ``mask`` (values 1..n = segments ``names``, or a
    (slice, row, column, segment) stack of overlapping segments) on ``images`` (sorted by
    InstanceNumber = slice order)."""
    images = sorted(images, key=lambda d: int(d.InstanceNumber))
    labels = (mask if mask.ndim == 4 else np.stack([mask == i + 1 for i in range(len(names))],
                                                   axis=-1)).astype(np.uint8)
    algo = hd.AlgorithmIdentificationSequence(
        name="manual", version="1", family=hd.sr.CodedConcept("123109", "DCM",
                                                              "Manual Processing"))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=name,
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT",
                                                       "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("5001000", "SCT", "Hippocampus"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo) for i, name in enumerate(names)]
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=labels,
        segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedpacs-test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return seg


def write_rtstruct(images: list[Dataset], mask: np.ndarray, path: Path,
                   names: tuple[str, ...] = ("anterior", "posterior")) -> int:
    """An RTSTRUCT (pydicom: highdicom writes none) whose ROI i+1 has the contours of
    ``mask == i + 1`` traced on each slice (skimage.measure.find_contours at 0.5, in patient
    mm through each image's position, orientation and spacing); returns the contour count."""
    images = sorted(images, key=lambda d: int(d.InstanceNumber))
    first = images[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = first.PatientID, first.PatientName, "RTSTRUCT"
    ds.StudyDate = ds.StudyTime = ds.StructureSetDate = ds.StructureSetTime = ""
    ds.StructureSetLabel, ds.SeriesNumber, ds.InstanceNumber = "hippocampus", 3, 1
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = Sequence([_image_ref(im) for im in images])
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, contours_out = [], []
    n = 0
    for i, name in enumerate(names):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = 10 + i, name  # numbers are not the order
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        item = Dataset()
        item.ReferencedROINumber = 10 + i
        item.ROIDisplayColor = [255, 0, 0]
        contours = []
        for k, im in enumerate(images):
            plane = np.pad(mask[k] == i + 1, 1).astype(float)
            for line in find_contours(plane, 0.5):
                rc = line - 1.0  # (row, column) of the unpadded slice
                pos = np.array(im.ImagePositionPatient, float)
                ori = np.array(im.ImageOrientationPatient, float)
                dr, dc = (float(v) for v in im.PixelSpacing)
                pts = pos + rc[:, 1:2] * dc * ori[:3] + rc[:, 0:1] * dr * ori[3:]
                c = Dataset()
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(pts)
                c.ContourData = [f"{v:.6f}" for v in pts.ravel()]
                c.ContourImageSequence = Sequence([_image_ref(im)])
                contours.append(c)
                n += 1
        item.ContourSequence = Sequence(contours)
        contours_out.append(item)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return n


def _image_ref(im: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = im.SOPClassUID
    ref.ReferencedSOPInstanceUID = im.SOPInstanceUID
    return ref


def labels_dir_names(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / LABELS_DIR).glob("*")) \
        if (cache / LABELS_DIR).is_dir() else []


def dice(a: np.ndarray, b: np.ndarray, cls: int) -> float:
    x, y = a == cls, b == cls
    return 2.0 * float((x & y).sum()) / float(x.sum() + y.sum())


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fractional", [False, True], ids=["binary", "fractional"])
def test_a_seg_written_from_a_mask_ingests_back_to_the_mask(tmp_path: Path, data_dir: Path,
                                                            fractional: bool) -> None:
    uid, images, mask = case_series(data_dir, "hippocampus_001", tmp_path / "in" / "mr")
    write_seg(images, mask, tmp_path / "in" / "seg.dcm", fractional=fractional)
    cache = tmp_path / "cache"
    summary = import_folder(tmp_path / "in", cache, label_classes=CLASSES)
    assert summary.skipped == [] and (summary.converted, summary.labels_converted) == (1, 1)
    found = load_label(cache, uid)
    assert found is not None
    got, meta = found
    assert got.shape == mask.shape and np.array_equal(got, mask)  # exact: Dice 1.0
    assert [dice(got, mask, c) for c in (1, 2)] == [1.0, 1.0]
    assert meta["classes"] == {"anterior": 1, "posterior": 2}
    # idempotent: a second ingest finds the label map current and does not write it again
    before = (cache / LABELS_DIR / f"{uid}.npz").stat().st_mtime_ns
    again = import_folder(tmp_path / "in", cache, label_classes=CLASSES)
    assert again.skipped == [] and again.labels_converted == 1
    assert (cache / LABELS_DIR / f"{uid}.npz").stat().st_mtime_ns == before
    # without class names the segment numbers are the classes (here the same)
    bare = import_folder(tmp_path / "in", tmp_path / "cache2")
    bare_map = load_label(tmp_path / "cache2", uid)
    assert bare.labels_converted == 1 and bare_map is not None
    assert np.array_equal(bare_map[0], mask)


def test_segments_map_to_classes_by_name_and_the_later_segment_wins(tmp_path: Path,
                                                                   data_dir: Path) -> None:
    uid, images, mask = case_series(data_dir, "hippocampus_001", tmp_path / "in" / "mr")
    # segment 1 "Posterior" covers the whole hippocampus, segment 2 " ANTERIOR" its
    # anterior part (overlapping segments): by name (case-insensitive) classes 2 and 1, and
    # where they overlap segment 2 wins, which gives back the mask
    stack = np.stack([mask > 0, mask == 1], axis=-1)
    write_seg(images, stack, tmp_path / "in" / "seg.dcm", names=("Posterior", " ANTERIOR"))
    summary = import_folder(tmp_path / "in", tmp_path / "cache", label_classes=CLASSES)
    assert summary.skipped == [] and summary.labels_converted == 1
    found = load_label(tmp_path / "cache", uid)
    assert found is not None and np.array_equal(found[0], mask)
    # by segment number (no class names), class 1 is the whole, and 2 wins on the overlap
    import_folder(tmp_path / "in", tmp_path / "bare")
    bare = load_label(tmp_path / "bare", uid)
    assert bare is not None and np.array_equal(bare[0], np.where(mask == 1, 2, mask > 0))
    assert seglabels.class_map({1: "Posterior", 2: " anterior "}, CLASSES, what="segment",
                               label="x") == {1: 2, 2: 1}
    with pytest.raises(DataError) as err:
        seglabels.class_map({1: "tumour"}, CLASSES, what="segment", label="seg.dcm")
    assert err.value.kind == seglabels.LABEL_CLASSES and "tumour" in err.value.problem


def test_an_rtstruct_traced_from_a_mask_fills_back_to_the_mask(tmp_path: Path,
                                                               data_dir: Path) -> None:
    """Contours traced at the 0.5 level pass between pixel centres (through edge midpoints
    and diagonally across corners), so no centre lies on a contour and filling the centres
    inside (holes even-odd) gives back exactly the traced pixels: Dice 1.0."""
    uid, images, mask = case_series(data_dir, "hippocampus_003", tmp_path / "in" / "mr")
    n = write_rtstruct(images, mask, tmp_path / "in" / "rt.dcm")
    assert n > 10
    summary = import_folder(tmp_path / "in", tmp_path / "cache", label_classes=CLASSES)
    assert summary.skipped == [] and summary.labels_converted == 1
    found = load_label(tmp_path / "cache", uid)
    assert found is not None
    assert np.array_equal(found[0], mask)
    assert found[1]["classes"] == {"anterior": 1, "posterior": 2}


def test_an_rtstruct_polygon_on_voxel_centres_fills_its_edges(tmp_path: Path,
                                                              data_dir: Path) -> None:
    uid, images, mask = case_series(data_dir, "hippocampus_001", tmp_path / "in" / "mr")
    box = np.zeros_like(mask)
    box[5, 10:21, 4:13] = 1  # rows 10..20, columns 4..12 inclusive
    write_rtstruct(images, box, tmp_path / "in" / "rt.dcm", names=("anterior",))
    rt = pydicom.dcmread(tmp_path / "in" / "rt.dcm")
    im = sorted(images, key=lambda d: int(d.InstanceNumber))[5]
    pos, ori = np.array(im.ImagePositionPatient, float), np.array(im.ImageOrientationPatient,
                                                                  float)
    corners = [(10, 4), (10, 12), (20, 12), (20, 4)]  # (row, column): on voxel centres
    pts = [pos + c * ori[:3] + r * ori[3:] for r, c in corners]  # 1 mm pixels
    contour = rt.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = [f"{v:.6f}" for p in pts for v in p]
    contour.NumberOfContourPoints = 4
    rt.ROIContourSequence[0].ContourSequence = Sequence([contour])
    rt.save_as(tmp_path / "in" / "rt.dcm")
    summary = import_folder(tmp_path / "in", tmp_path / "cache", label_classes=CLASSES)
    found = load_label(tmp_path / "cache", uid)
    assert summary.skipped == [] and found is not None
    assert np.array_equal(found[0], box)  # the edges on voxel centres are inside


# --------------------------------------------------------------------------- bad input
def test_unusable_label_series_are_skipped_with_a_reason_and_the_rest_kept(
        tmp_path: Path, data_dir: Path) -> None:
    src = tmp_path / "in"
    good, good_images, good_mask = case_series(data_dir, "hippocampus_001", src / "good")
    write_seg(good_images, good_mask, src / "good-seg.dcm")
    # a SEG of a series that is not imported (its MR series is kept elsewhere)
    _, other_images, other_mask = case_series(data_dir, "hippocampus_003",
                                              tmp_path / "elsewhere")
    write_seg(other_images, other_mask, src / "other-seg.dcm")
    # a SEG made on case 4's grid but referencing case 6's series (other rows/columns)
    grid_uid, grid_images, _ = case_series(data_dir, "hippocampus_006", src / "grid")
    _, wrong_images, wrong_mask = case_series(data_dir, "hippocampus_004",
                                              tmp_path / "wrong")
    assert (wrong_images[0].Rows, wrong_images[0].Columns) != (grid_images[0].Rows,
                                                               grid_images[0].Columns)
    seg = write_seg(wrong_images, wrong_mask, tmp_path / "wrong-seg.dcm")
    by_sop = {str(a.SOPInstanceUID): str(b.SOPInstanceUID) for a, b in zip(
        sorted(wrong_images, key=lambda d: int(d.InstanceNumber)),
        sorted(grid_images, key=lambda d: int(d.InstanceNumber)), strict=False)}
    seg = pydicom.dcmread(tmp_path / "wrong-seg.dcm")
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = grid_uid
    for group in seg.PerFrameFunctionalGroupsSequence:
        src_item = group.DerivationImageSequence[0].SourceImageSequence[0]
        src_item.ReferencedSOPInstanceUID = by_sop.get(str(src_item.ReferencedSOPInstanceUID),
                                                       generate_uid())
    seg.save_as(src / "off-grid-seg.dcm")
    # a SEG whose segment is named like no class of the task
    named_uid, named_images, named_mask = case_series(data_dir, "hippocampus_007",
                                                      src / "named")
    write_seg(named_images, named_mask, src / "named-seg.dcm", names=("anterior", "tumour"))
    # a SEG without its SegmentSequence (unreadable as a label), and a file cut short
    bad_uid, bad_images, bad_mask = case_series(data_dir, "hippocampus_008", src / "bad")
    broken = write_seg(bad_images, bad_mask, tmp_path / "broken.dcm")
    del broken.SegmentSequence
    broken.save_as(src / "broken-seg.dcm")
    whole = (tmp_path / "broken.dcm").read_bytes()
    (src / "cut-seg.dcm").write_bytes(whole[:len(whole) // 2])
    # two SEGs of one series: neither is used
    two_uid, two_images, two_mask = case_series(data_dir, "hippocampus_011", src / "two")
    write_seg(two_images, two_mask, src / "two-a.dcm")
    write_seg(two_images, two_mask, src / "two-b.dcm")

    cache = tmp_path / "cache"
    summary = import_folder(src, cache, label_classes=CLASSES)
    kinds = Counter(s.kind for s in summary.skipped)
    assert kinds == {seglabels.LABEL_UNMATCHED: 1, seglabels.LABEL_OFF_GRID: 1,
                     seglabels.LABEL_CLASSES: 1, seglabels.LABEL_UNREADABLE: 1,
                     seglabels.LABEL_AMBIGUOUS: 2, "truncated": 1}, summary.lines()
    by_kind = {s.kind: s for s in summary.skipped}
    assert "Fix:" in by_kind[seglabels.LABEL_UNMATCHED].reason
    assert "tumour" in by_kind[seglabels.LABEL_CLASSES].reason
    assert "51x35" in by_kind[seglabels.LABEL_OFF_GRID].reason or \
        "pixels on an image series" in by_kind[seglabels.LABEL_OFF_GRID].reason
    # the cohort is kept: every image series converted, the good label map exact, and no
    # other label map (nor a temporary) under labels/
    assert summary.converted == 5 and summary.labels_converted == 1
    assert labels_dir_names(cache) == [f"{good}.npz"]
    found = load_label(cache, good)
    assert found is not None and np.array_equal(found[0], good_mask)
    for uid in (grid_uid, named_uid, bad_uid, two_uid):
        assert load_label(cache, uid) is None
    counts = summary.counts()
    assert counts["labels_converted"] == 1 and counts["skipped-label-ambiguous"] == 2


def test_a_label_map_of_a_seg_that_became_unusable_is_removed(tmp_path: Path,
                                                             data_dir: Path) -> None:
    uid, images, mask = case_series(data_dir, "hippocampus_001", tmp_path / "in" / "mr")
    write_seg(images, mask, tmp_path / "in" / "seg.dcm")
    assert import_folder(tmp_path / "in", tmp_path / "cache").labels_converted == 1
    seg = pydicom.dcmread(tmp_path / "in" / "seg.dcm")
    seg.SegmentSequence[1].SegmentLabel = "tumour"
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    (tmp_path / "in" / "seg.dcm").unlink()
    seg.save_as(tmp_path / "in2.dcm")
    (tmp_path / "in" / "seg2.dcm").write_bytes((tmp_path / "in2.dcm").read_bytes())
    # the old instance is still cached: two instances of one SEG series -> ambiguous
    summary = import_folder(tmp_path / "in", tmp_path / "cache", label_classes=CLASSES)
    assert {s.kind for s in summary.skipped} <= {seglabels.LABEL_AMBIGUOUS,
                                                 seglabels.LABEL_CLASSES}
    assert summary.skipped and load_label(tmp_path / "cache", uid) is None


def test_cohort_labels_option_is_checked() -> None:
    assert label_kinds("seg") == (("seg",), None)
    assert label_kinds("SEG, rtstruct") == (("seg", "rtstruct"), None)
    assert label_kinds(["rtstruct"]) == (("rtstruct",), None)
    assert label_kinds("") == ((), None) and label_kinds("none") == ((), None)
    kinds, err = label_kinds("segs")
    assert kinds == () and err is not None and err.field == "cohort.labels"
    assert "did you mean 'seg'" in str(err) and "Fix:" in str(err)


# --------------------------------------------------------------------------- the PACS
def test_label_series_survive_the_image_patterns_of_a_fake_pacs(tmp_path: Path,
                                                                data_dir: Path) -> None:
    uid, images, mask = case_series(data_dir, "hippocampus_001", tmp_path / "mr")
    seg = write_seg(images, mask, tmp_path / "seg.dcm")
    pacs = FakePacs(images + [pydicom.dcmread(tmp_path / "seg.dcm")])
    query = CohortQuery(modality="MR", series_description="hippocampus*",
                        labels=("seg",), label_classes=CLASSES)
    summary = ingest(PACS, query, tmp_path / "cache", transport=pacs)
    assert summary.skipped == [] and summary.cohort_series == 2
    assert (summary.converted, summary.labels_converted) == (1, 1)
    found = load_label(tmp_path / "cache", uid)
    assert found is not None and np.array_equal(found[0], mask)
    # without labels the [cohort] is as before: the modality pattern leaves the SEG out
    plain = ingest(PACS, CohortQuery(modality="MR"), tmp_path / "plain", transport=pacs)
    assert plain.cohort_series == 1 and plain.labels_converted == 0
    assert str(seg.SeriesInstanceUID) not in {p.name for p in
                                              (tmp_path / "plain" / "instances").rglob("*")}


@needs_orthanc
def test_seg_and_rtstruct_round_trip_through_orthanc_with_c_get(tmp_path: Path,
                                                                data_dir: Path) -> None:
    a_uid, a_images, a_mask = case_series(data_dir, "hippocampus_001", tmp_path / "a")
    b_uid, b_images, b_mask = case_series(data_dir, "hippocampus_003", tmp_path / "b")
    write_seg(a_images, a_mask, tmp_path / "labels" / "a-seg.dcm")
    write_rtstruct(b_images, b_mask, tmp_path / "labels" / "b-rt.dcm")
    # a SEG in a's study of a series the PACS does not hold (nor the cohort, then)
    _, c_images, c_mask = case_series(data_dir, "hippocampus_004", tmp_path / "c",
                                      study_uid=str(a_images[0].StudyInstanceUID))
    write_seg(c_images, c_mask, tmp_path / "labels" / "c-seg.dcm")
    files = [*sorted((tmp_path / "a").glob("*.dcm")), *sorted((tmp_path / "b").glob("*.dcm")),
             *sorted((tmp_path / "labels").glob("*.dcm"))]
    with OrthancServer(tmp_path / "orthanc") as server:
        stored, failed = store_files(server.pacs_config(), files)
        assert failed == [] and stored == len(files)
        query = CohortQuery(modality="MR", labels=("seg", "rtstruct"),
                            label_classes=CLASSES)
        t0 = time.monotonic()
        summary = ingest(server.pacs_config("c-get"), query, tmp_path / "cache")
        seconds = time.monotonic() - t0
    kinds = Counter(s.kind for s in summary.skipped)
    assert kinds == {seglabels.LABEL_UNMATCHED: 1}, summary.lines()  # c's SEG: not its MR
    assert (summary.converted, summary.labels_converted) == (2, 2)
    for uid, mask in ((a_uid, a_mask), (b_uid, b_mask)):
        found = load_label(tmp_path / "cache", uid)
        assert found is not None and np.array_equal(found[0], mask)
    print(f"ingested {len(files)} instances with labels in {seconds:.2f}s")


# --------------------------------------------------------------------------- federation
@needs_orthanc
@pytest.mark.usefixtures("task_identity")
def test_a_federation_trains_on_seg_labels_from_the_pacs(tmp_path: Path,
                                                         data_dir: Path) -> None:
    """Two hospitals, each with three hippocampus cases as MR series plus a SEG in one
    Orthanc (a study each), ingest with ``[cohort] labels = "seg"`` and no label manifest,
    then train two rounds over the in-memory grid: the sites' data are the SEG's masks, and
    the global model's loss on them falls and its Dice rises."""
    from flwr.app import Context, RecordDict

    from fedpacs.client.app import app as client_app
    from fedpacs.client.config import load_site_config
    from fedpacs.client.data import load_site_data
    from fedpacs.common.config import RunConfig
    from fedpacs.common.tasks import get_task
    from fedpacs.server.app import run_federation
    from fedpacs.server.rundir import read_rounds
    from tests.loopback import LoopbackGrid

    task = get_task("hippocampus")
    hospitals = {"hospital-a": ("hippocampus_001", "hippocampus_003", "hippocampus_004"),
                 "hospital-b": ("hippocampus_006", "hippocampus_007", "hippocampus_011")}
    files: list[Path] = []
    studies: dict[str, list[str]] = {}
    masks: dict[str, np.ndarray] = {}
    for name, cases in hospitals.items():
        for cid in cases:
            uid, images, mask = case_series(data_dir, cid, tmp_path / "dicom" / cid)
            write_seg(images, mask, tmp_path / "dicom" / f"{cid}-seg.dcm")
            files += [*sorted((tmp_path / "dicom" / cid).glob("*.dcm")),
                      tmp_path / "dicom" / f"{cid}-seg.dcm"]
            studies.setdefault(name, []).append(str(images[0].StudyInstanceUID))
            masks[uid] = mask
    sites: dict[int, Path] = {}
    t0 = time.monotonic()
    with OrthancServer(tmp_path / "orthanc") as server:
        stored, failed = store_files(server.pacs_config(), files)
        assert failed == []
        for i, (name, uids) in enumerate(studies.items()):
            home = tmp_path / name
            home.mkdir()
            pacs = server.pacs_config("c-get")
            site = home / "site.toml"
            site.write_text(
                f'[site]\nname = "{name}"\ntask = "hippocampus"\n'
                '[data]\nformat = "pacs"\nroot = "cache"\n'
                'val_fraction = 0.34\n'
                '[compute]\nthreads = 1\n'
                f'[pacs]\nmethod = "c-get"\nhost = "{pacs.host}"\nport = {pacs.port}\n'
                f'called_ae = "{pacs.called_ae}"\ncalling_ae = "{pacs.calling_ae}"\n'
                'cache_dir = "cache"\n'
                f'[cohort]\nmodality = "MR"\nlabels = "seg"\nstudy_uids = {json.dumps(uids)}\n'
                '[security]\nrequire_secagg = false\n')
            cfg = load_site_config(site)
            assert cfg.ingest is not None and cfg.data.labels is None  # no manifest at all
            assert cfg.ingest.cohort.labels == ("seg",)
            assert cfg.ingest.cohort.label_classes == CLASSES
            summary = ingest(cfg.ingest.pacs, cfg.ingest.cohort, cfg.ingest.cache_dir)
            assert summary.skipped == [] and summary.labels_converted == 3, summary.lines()
            sites[i + 1] = site
    ingest_s = time.monotonic() - t0
    # the sites' training data: the SEG's masks (foreground from the SEG, no manifest)
    for site in sites.values():
        cfg = load_site_config(site)
        data = load_site_data(cfg.data, task, preprocess=cfg.preprocess)
        assert data.skipped == [] and len(data.train) + len(data.val) == 3
        ys = [data.train[i][1].numpy() for i in range(len(data.train))]
        assert all(set(np.unique(y)) == {0, 1, 2} for y in ys)
    run = RunConfig(task="hippocampus", rounds=2, local_epochs=2, batch_size=2, min_sites=2,
                    secagg=False, cross_site=False, round_timeout_s=300.0,
                    run_dir=str(tmp_path / "run"), run_name="run")
    t1 = time.monotonic()
    run_federation(LoopbackGrid(client_app, sites), run, Context(1, 0, {}, RecordDict(), {}))
    rounds = read_rounds(tmp_path / "run")
    print(f"ingest {ingest_s:.1f}s, federation {time.monotonic() - t1:.1f}s; "
          + "; ".join(f"round {r['round']}: {r['evaluate']}" for r in rounds))
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert sorted(r["train_sites"]) == ["hospital-a", "hospital-b"]
        assert r["train"]["train-loss"] > 0
    # it learns from the SEG masks (seeded: val-loss 2.03, 1.78, 1.58; Dice 0.020, 0.032,
    # 0.050 on the sites' validation cases)
    first, last = rounds[0]["evaluate"], rounds[-1]["evaluate"]
    assert last["val-loss"] < first["val-loss"] - 0.2, (first, last)
    assert last["val-dice-mean"] > first["val-dice-mean"] > 0.0, (first, last)
