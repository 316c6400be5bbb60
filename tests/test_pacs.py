"""PACS ingest against a real Orthanc on 127.0.0.1: C-FIND + C-GET, C-FIND + C-MOVE,
DICOMweb; volume geometry checked against the headers; bad input reported by name."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from fedpacs.client.dicom import build_volume, check_pixel_length
from fedpacs.client.ingest import PACS_UNREACHABLE, import_folder, ingest
from fedpacs.client.pacs import CohortQuery, PacsConfig
from fedpacs.client.volumes import list_volumes, load_volume
from fedpacs.common.errors import ExitCode
from fedpacs.common.procs import free_port
from fedpacs.deploy.cli import main
from fedpacs.deploy.orthanc import OrthancServer, orthanc_available, store_files

# `make test` installs Orthanc; in CI a missing Orthanc fails the tests instead of skipping them
pytestmark = pytest.mark.skipif(not orthanc_available() and not os.environ.get("CI"),
                                reason="Orthanc not installed (`make system-deps` installs it)")

MOVE_AE = "FEDPACS"


def dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".md",)
                  and p.name != "LICENSE" and "README" not in p.name)


@pytest.fixture(scope="module")
def incomplete_series(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A copy of a HippoCrop series under new UIDs with its middle slice missing."""
    src = data_dir / "dicom_brainmr" / "Study1" / "13_HCropVolume"
    out = tmp_path_factory.mktemp("incomplete")
    files = sorted(src.glob("*.dcm"), key=lambda p: int(pydicom.dcmread(
        p, stop_before_pixels=True).InstanceNumber))
    series_uid = generate_uid()
    for i, f in enumerate(files):
        if i == len(files) // 2:
            continue
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = "HippoCrop-incomplete"
        ds.save_as(out / f.name)
    return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, data_dir: Path,
            incomplete_series: Path) -> Iterator[tuple[OrthancServer, int]]:
    move_port = free_port()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"),
                           move_destinations={MOVE_AE: move_port})
    with server:
        files = dicom_files(data_dir / "dicom_ct_dcmqa") + dicom_files(
            data_dir / "dicom_brainmr" / "Study1") + dicom_files(incomplete_series)
        stored, failed = store_files(server.pacs_config(), files)
        assert failed == [] and stored == len(files)
        yield server, move_port


def header_geometry(files: list[Path]) -> tuple[tuple[int, int, int], np.ndarray, list[float]]:
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(ds[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    z = sorted(float(np.dot(np.array(d.ImagePositionPatient, float), normal)) for d in ds)
    return (len(ds), int(ds[0].Rows), int(ds[0].Columns)), iop, [float(v) for v in
                                                                 ds[0].PixelSpacing] + z


def assert_cache_sound(cache_dir: Path) -> None:
    for f in (p for p in (cache_dir / "instances").rglob("*") if p.is_file()):
        assert f.suffix == ".dcm", f"left-over temp file {f}"
        check_pixel_length(pydicom.dcmread(f), f)


@pytest.fixture(scope="module")
def originals(data_dir: Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> the source files, read straight from ../shared/data."""
    out: dict[str, list[Path]] = {}
    for p in dicom_files(data_dir / "dicom_ct_dcmqa") + dicom_files(data_dir / "dicom_brainmr"):
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
        out.setdefault(uid, []).append(p)
    return out


@pytest.mark.parametrize("method,query,expected_series", [
    ("c-get", CohortQuery(modality="CT"), 2),
    ("c-move", CohortQuery(modality="MR", series_description="HippoCrop"), 1),
    ("dicomweb", CohortQuery(series_description="t1post", date_from="20200101",
                             date_to="20201231"), 1),
])
def test_ingest_methods_build_header_geometry(orthanc: tuple[OrthancServer, int], tmp_path: Path,
                                              originals: dict[str, list[Path]], method: str,
                                              query: CohortQuery,
                                              expected_series: int) -> None:
    server, move_port = orthanc
    cfg = server.pacs_config(method, move_destination=MOVE_AE, storage_port=move_port)
    summary = ingest(cfg, query, tmp_path / "cache")
    assert summary.skipped == [] and summary.cohort_series == expected_series
    assert summary.converted == expected_series and summary.retrieved == summary.instances_found
    for vol_path in list_volumes(tmp_path / "cache"):
        arr, meta = load_volume(vol_path)
        (n, rows, cols), iop, rest = header_geometry(originals[meta["series_uid"]])
        ps, z = rest[:2], rest[2:]
        assert arr.shape[1:] == (rows, cols)
        assert meta["spacing"][1:] == pytest.approx(ps)
        assert meta["direction"][0] == pytest.approx(iop[:3]) and \
            meta["direction"][1] == pytest.approx(iop[3:])
        if meta["irregular_spacing"]:  # resampled onto the median spacing
            assert arr.shape[0] == round((z[-1] - z[0]) / meta["spacing"][0]) + 1
            assert meta["spacing"][0] == pytest.approx(float(np.median(np.diff(z))))
        else:
            assert arr.shape[0] == n
            assert meta["spacing"][0] == pytest.approx((z[-1] - z[0]) / (n - 1), rel=1e-4)
    # a second ingest downloads nothing new
    again = ingest(cfg, query, tmp_path / "cache")
    assert again.retrieved == 0 and again.already_cached == summary.instances_found
    assert_cache_sound(tmp_path / "cache")


def test_ct_values_are_hounsfield(orthanc: tuple[OrthancServer, int], tmp_path: Path,
                                  originals: dict[str, list[Path]]) -> None:
    server, _ = orthanc
    ingest(server.pacs_config("c-get"), CohortQuery(series_description="STD BRAIN 5MM"),
           tmp_path / "c")
    arr, meta = load_volume(list_volumes(tmp_path / "c")[0])
    hu = []
    for f in originals[meta["series_uid"]]:
        ds = pydicom.dcmread(f)
        hu.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert meta["modality"] == "CT"
    assert arr.min() == pytest.approx(min(h.min() for h in hu))  # air, about -1000 HU
    assert arr.max() == pytest.approx(max(h.max() for h in hu))
    assert -1100 < arr.min() < -900


def test_missing_slices_named_and_rest_ingested(orthanc: tuple[OrthancServer, int],
                                                tmp_path: Path) -> None:
    server, _ = orthanc
    s = ingest(server.pacs_config("c-get"), CohortQuery(series_description="HippoCrop*"),
               tmp_path / "cache")
    assert s.cohort_series == 2 and s.converted == 1
    [skip] = s.skipped
    assert skip.kind == "missing-slices" and "gap 2.00 mm, expected 1.00 mm" in skip.reason
    assert s.counts()["skipped-missing-slices"] == 1


# pynetdicom leaks the refused socket (ResourceWarning in its own thread): not ours to fix
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pacs_down_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    s = ingest(PacsConfig(port=port, timeout_s=5), CohortQuery(), tmp_path / "c")
    [skip] = s.skipped
    assert skip.kind == PACS_UNREACHABLE and s.unreachable
    assert f"127.0.0.1:{port}" in skip.reason
    site = tmp_path / "site.toml"
    site.write_text(f'[site]\nname = "h"\ntask = "hippocampus"\n[data]\nformat = "nifti"\n'
                    f'root = "{tmp_path}"\n[pacs]\nmethod = "c-get"\nport = {port}\n'
                    f'cache_dir = "cache"\ntimeout_s = 5\n')
    (tmp_path / "images").mkdir()
    assert main(["site", "ingest", "--config", str(site)]) == ExitCode.PACS
    assert f"127.0.0.1:{port}" in capsys.readouterr().out


def test_broken_files_skipped_by_name_cache_stays_clean(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "cd"
    shutil.copytree(data_dir / "dicom_brainmr" / "Study1" / "13_HCropVolume", folder)
    victim = folder / "5.dcm"
    truncated = folder / "5-truncated.dcm"
    truncated.write_bytes(victim.read_bytes()[:-500])
    victim.unlink()  # the truncated copy is the only version of that slice
    (folder / "notes.txt").write_text("not an image")
    s = import_folder(folder, tmp_path / "cache")
    kinds = {sk.item: sk.kind for sk in s.skipped}
    assert kinds[str(truncated)] in ("truncated", "unreadable")
    assert kinds[str(folder / "notes.txt")] == "not-dicom"
    assert "missing-slices" in kinds.values()  # the hole left by the truncated slice
    assert s.retrieved == 31
    assert_cache_sound(tmp_path / "cache")


def test_cli_ingest_summary(orthanc: tuple[OrthancServer, int], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = orthanc
    (tmp_path / "images").mkdir()
    site = tmp_path / "site.toml"
    site.write_text(f'[site]\nname = "h"\ntask = "hippocampus"\n[data]\nformat = "nifti"\n'
                    f'root = "{tmp_path}"\n[pacs]\nmethod = "dicomweb"\n'
                    f'dicomweb_url = "{server.dicomweb_url}"\ncache_dir = "cache"\n'
                    f'[cohort]\nmodality = "CT"\n')
    assert main(["site", "ingest", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "series 2, instances 56; retrieved 56" in out and "series converted 2" in out


def test_build_volume_sorts_by_position_not_name(data_dir: Path) -> None:
    files = sorted((data_dir / "dicom_brainmr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    vol = build_volume(files)  # names sort 1, 10, 11, ... 2: geometry must not care
    z = [float(np.dot(np.array(pydicom.dcmread(f, stop_before_pixels=True)
                               .ImagePositionPatient, float), vol.direction[2])) for f in files]
    assert vol.array.shape[0] == 32
    assert float(np.dot(vol.origin, vol.direction[2])) == pytest.approx(min(z))
    first = min(files, key=lambda f: float(np.dot(np.array(pydicom.dcmread(
        f, stop_before_pixels=True).ImagePositionPatient, float), vol.direction[2])))
    assert np.array_equal(vol.array[0], pydicom.dcmread(first).pixel_array.astype(np.float32))


def test_nifti_masks_label_ingested_series(tmp_path: Path, data_dir: Path) -> None:
    """Segmentation labels for PACS series: a NIfTI mask per series on the series' grid."""
    import nibabel as nib

    from fedpacs.client.data import load_site_data
    from fedpacs.common.datasets import DataSpec
    from fedpacs.common.tasks import TaskConfig

    src = data_dir / "dicom_brainmr" / "Study1" / "13_HCropVolume"
    s = import_folder(src, tmp_path / "cache")
    assert s.converted == 1 and s.skipped == []
    [vol_path] = list_volumes(tmp_path / "cache")
    arr, meta = load_volume(vol_path)
    truth = (arr > np.median(arr)).astype(np.uint8)  # (slice, row, column)
    nib.save(nib.Nifti1Image(np.transpose(truth), np.eye(4)), tmp_path / "mask.nii.gz")
    (tmp_path / "labels.csv").write_text(f"SeriesInstanceUID,mask\n{meta['series_uid']},"
                                         "mask.nii.gz\n")
    task = TaskConfig(name="crop-seg", kind="segmentation", network="unet", spatial_dims=2,
                      in_channels=1, num_classes=2, input_shape=tuple(arr.shape[1:]), width=4)
    site = load_site_data(DataSpec("pacs", tmp_path / "cache", val_fraction=0.0,
                                   labels=tmp_path / "labels.csv"), task)
    assert len(site.train) == arr.shape[0]  # one sample per slice
    ys = np.stack([site.train[i][1][0].numpy() for i in range(len(site.train))])
    assert np.array_equal(ys, truth)
    # a mask on the wrong grid is named, not silently resized
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), tmp_path / "mask.nii.gz")
    bad = load_site_data(DataSpec("pacs", tmp_path / "cache", val_fraction=0.0,
                                  labels=tmp_path / "labels.csv"), task)
    assert len(bad.train) == 0 and "mask shape" in bad.skipped[0][1]


def test_window_and_resample_hand_computed() -> None:
    from fedpacs.client.dicom import apply_window, resample, window_preset

    hu = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0])
    # brain window: centre 40, width 80 -> [0, 80] maps to [0, 1]
    assert window_preset(hu, "brain").tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    assert apply_window(hu, 0, 2000).tolist() == pytest.approx([0, 0.5, 0.52, 0.54, 1])
    vol = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    out = resample(vol, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0), order=0)
    assert out.shape == (4, 2, 2) and out[0].tolist() == out[1].tolist() == vol[0].tolist()


def test_multiframe_instance_matches_single_frame_series(tmp_path: Path, data_dir: Path) -> None:
    """A real series re-packed as one multi-frame instance (frames in reverse order, with
    per-frame plane positions) gives the same volume as the single-frame series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    files = sorted((data_dir / "dicom_brainmr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    single = build_volume(files)
    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda d: -float(np.dot(np.array(d.ImagePositionPatient, float),
                                            single.direction[2])))
    first = slices[0]
    mf = Dataset()
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
                "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "SamplesPerPixel", "PhotometricInterpretation"):
        setattr(mf, tag, getattr(first, tag))
    mf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    mf.SOPInstanceUID = generate_uid()
    mf.NumberOfFrames = len(slices)
    shared = Dataset()
    ori, meas = Dataset(), Dataset()
    ori.ImageOrientationPatient = first.ImageOrientationPatient
    meas.PixelSpacing = first.PixelSpacing
    shared.PlaneOrientationSequence = Sequence([ori])
    shared.PixelMeasuresSequence = Sequence([meas])
    mf.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for d in slices:
        pos, group = Dataset(), Dataset()
        pos.ImagePositionPatient = d.ImagePositionPatient
        group.PlanePositionSequence = Sequence([pos])
        frames.append(group)
    mf.PerFrameFunctionalGroupsSequence = Sequence(frames)
    mf.PixelData = b"".join(d.PixelData for d in slices)
    mf.file_meta = FileMetaDataset()
    mf.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    mf.file_meta.MediaStorageSOPClassUID = mf.SOPClassUID
    mf.file_meta.MediaStorageSOPInstanceUID = mf.SOPInstanceUID
    out = tmp_path / "multiframe.dcm"
    mf.save_as(out, enforce_file_format=True)
    multi = build_volume([out])
    assert multi.array.shape == single.array.shape
    assert np.array_equal(multi.array, single.array)
    assert multi.spacing == pytest.approx(single.spacing)
    assert multi.origin == pytest.approx(single.origin)


@pytest.mark.parametrize("drops", [1, 2, 5])
def test_a_connection_dropped_without_an_answer_is_tried_again(tmp_path: Path,
                                                               drops: int) -> None:
    """A PACS whose first connections close before any answer (busy, or a drop on the
    way) is asked again, up to QUICK_DROP_TRIES times in all, and its real answer reaches
    the user: here a rejection of the called AE title, named with the fix (not
    "connection refused"). A PACS that keeps dropping is "not established" after those
    tries, not asked forever."""
    import socket
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from fedpacs.client.pacs import QUICK_DROP_TRIES

    scp = AE(ae_title="PACS")
    scp.require_called_aet = True  # rejects any other called AE title
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    scp_port = free_port()
    server = scp.start_server(("127.0.0.1", scp_port), block=False)
    front = socket.create_server(("127.0.0.1", 0))
    connections: list[int] = []
    pipes: list[threading.Thread] = []

    def proxy() -> None:  # the first connection is closed at once, later ones forwarded
        while True:
            try:
                conn, _ = front.accept()
            except OSError:
                return
            connections.append(1)
            if len(connections) <= drops:
                conn.close()
                continue
            back = socket.create_connection(("127.0.0.1", scp_port))
            for a, b in ((conn, back), (back, conn)):
                pipes.append(threading.Thread(target=pipe, args=(a, b), daemon=True))
                pipes[-1].start()

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    threading.Thread(target=proxy, daemon=True).start()
    try:
        cfg = PacsConfig(port=front.getsockname()[1], called_ae="NOTPACS", timeout_s=10)
        s = ingest(cfg, CohortQuery(), tmp_path / "cache")
    finally:
        front.close()
        server.shutdown()
        for t in pipes:
            t.join(timeout=10)
    [skip] = s.skipped
    assert s.exit_code == ExitCode.PACS
    if drops < QUICK_DROP_TRIES:
        assert len(connections) == drops + 1
        assert "association rejected" in skip.reason and "Called AE title not recognised" \
            in skip.reason
    else:
        assert len(connections) == QUICK_DROP_TRIES
        assert "association not established (connection refused" in skip.reason
