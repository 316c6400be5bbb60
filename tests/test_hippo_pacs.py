"""Hippocampus cases served from a hospital's PACS (tests/hippo_pacs.py): the DICOM written
from a NIfTI case comes back from the ingest voxel for voxel, hospitals hold disjoint parts
without the server's held-out cases, and a ``format = "pacs"`` site that ingested its part
from a real Orthanc trains on exactly the (image, mask) pairs a NIfTI site gets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpacs.client.config import load_site_config
from fedpacs.client.data import load_site_data, read_label_manifest
from fedpacs.client.ingest import import_folder
from fedpacs.client.pacs import Method, PacsConfig
from fedpacs.client.volumes import list_volumes, load_volume, volume_path
from fedpacs.common.datasets import (
    DataSpec,
    list_nifti_cases,
    load_partition,
    read_nifti,
    split_ids,
)
from fedpacs.common.tasks import get_task
from fedpacs.deploy.cli import main
from fedpacs.deploy.orthanc import OrthancServer, orthanc_available, store_files
from tests.hippo_pacs import (
    MR_IMAGE_STORAGE,
    SERIES_DESCRIPTION,
    Holdings,
    encode_pixels,
    hospital_holdings,
    partition_cases,
    series_geometry,
    write_case_dicom,
    write_pacs_site_config,
)

HIPPO = "msd_hippocampus_udacity"
UINT8_CASE = "hippocampus_001"  # stored as uint8 in the NIfTI
FLOAT_CASE = "hippocampus_003"  # float32 on a lattice: stored with a RescaleSlope
RETRIEVE_METHODS: tuple[Method, ...] = ("c-get", "c-move")
needs_orthanc = pytest.mark.skipif(not orthanc_available() and not os.environ.get("CI"),
                                   reason="Orthanc not installed")


def test_dicom_of_a_case_ingests_back_to_the_nifti_voxels(tmp_path: Path,
                                                           data_dir: Path) -> None:
    root = data_dir / HIPPO
    for cid, dtype, rescaled in ((UINT8_CASE, np.uint8, False), (FLOAT_CASE, np.float32, True)):
        image = root / "images" / f"{cid}.nii.gz"
        nii = read_nifti(image)
        assert nii.dtype == dtype
        uid, files = write_case_dicom(image, tmp_path / "dicom" / cid, patient_id=cid)
        assert len(files) == nii.shape[2]  # one instance per slice k
        first = pydicom.dcmread(files[0])
        assert (first.SOPClassUID, first.Modality, first.PatientID, first.SeriesDescription) \
            == (MR_IMAGE_STORAGE, "MR", cid, SERIES_DESCRIPTION)
        assert (first.Rows, first.Columns) == (nii.shape[1], nii.shape[0])
        assert [float(v) for v in first.PixelSpacing] == [1.0, 1.0]
        assert float(first.SliceThickness) == 1.0
        assert ("RescaleSlope" in first) == rescaled
        # the ingest's own conversion (store checks, build_volume, the volume file)
        summary = import_folder(tmp_path / "dicom" / cid, tmp_path / "cache")
        assert summary.skipped == [] and summary.converted == 1
        arr, meta = load_volume(volume_path(tmp_path / "cache", uid))
        # (slice, row, column) = (k, j, i): the documented transpose of the NIfTI array
        assert np.array_equal(arr, np.transpose(nii))
        assert meta["spacing"] == (1.0, 1.0, 1.0) and not meta["irregular_spacing"]
        assert meta["modality"] == "MR" and meta["series_uid"] == uid
        # the affine's voxel (0, 0, 0) in LPS, and its axes (i, j, k) as the direction rows
        affine = nib.load(str(image)).affine  # type: ignore[attr-defined]
        assert np.allclose(meta["origin"], affine[:3, 3] * [-1, -1, 1])
        assert np.allclose(meta["direction"], np.diag([-1.0, -1.0, 1.0]))


def test_pixel_encoding_is_exact_where_16_bits_hold_the_values() -> None:
    ints = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    enc = encode_pixels(ints)
    assert enc.exact and not enc.rescaled and enc.stored.dtype == np.uint16
    assert encode_pixels(ints - 5).stored.dtype == np.int16
    step = np.float32(5.9588623)  # an MSD image: integer levels times a float32 step
    lattice = np.arange(500, dtype=np.float32).reshape(5, 10, 10) * step
    enc = encode_pixels(lattice)
    assert enc.exact and float(enc.slope) == pytest.approx(float(step))
    assert np.array_equal(enc.decoded(), lattice)
    noise = np.random.default_rng(0).uniform(-3.0, 2000.0, (4, 5, 6)).astype(np.float32)
    enc = encode_pixels(noise)  # no lattice: a 16-bit quantisation, within half a step
    assert not enc.exact
    assert np.abs(enc.decoded() - noise).max() <= float(enc.slope) / 2 + 1e-3
    with pytest.raises(ValueError, match="NaN"):
        encode_pixels(np.array([[[np.nan]]]))


def test_left_handed_grids_are_refused() -> None:
    assert series_geometry(np.eye(4), 3).positions[2] == (0.0, 0.0, 2.0)
    with pytest.raises(ValueError, match="left-handed"):
        series_geometry(np.diag([1.0, 1.0, -1.0, 1.0]), 3)


def test_hospitals_hold_disjoint_parts_without_the_held_out_cases(data_dir: Path) -> None:
    root = data_dir / HIPPO
    everything = {c.case_id for c in list_nifti_cases(root)[0]}
    _, held_out = split_ids(sorted(everything), holdout_fraction=0.2, seed=0)  # load_holdout's
    parts = [set(partition_cases(root, partition=i, num_partitions=3)) for i in range(3)]
    assert [len(p) for p in parts] == [70, 69, 69]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) | set(held_out) == everything
    assert not set().union(*parts) & set(held_out)


@pytest.mark.parametrize("method", RETRIEVE_METHODS)
def test_site_config_reads_the_hospitals_pacs_and_keys(tmp_path: Path, data_dir: Path,
                                                       method: Method) -> None:
    case = list_nifti_cases(data_dir / HIPPO)[0][0]
    uid = "1.2.826.0.1.3680043.8.498.1"
    held = Holdings(0, 3, (case.case_id,), {case.case_id: uid}, {uid: case.label or Path()}, ())
    key = public_key(tmp_path / "app.pub")
    pacs = PacsConfig(method=method, host="10.0.0.1", port=4242, called_ae="PACS-A",
                      calling_ae="HOSP-A", storage_port=11113)
    cfg = write_pacs_site_config(tmp_path / "site", name="hospital-a", pacs=pacs,
                                 holdings=held, trusted_app_keys=[key], require_secagg=True)
    site = load_site_config(cfg)
    assert (site.name, site.task, site.data.format) == ("hospital-a", "hippocampus", "pacs")
    assert (site.data.partition, site.data.num_partitions) == (0, 1)  # its PACS: its part
    assert site.ingest is not None and site.ingest.pacs == pacs
    assert site.ingest.cache_dir == site.data.root == (tmp_path / "site" / "cache").resolve()
    assert site.require_secagg and site.security.trusted_app_keys == (key.resolve(),)
    assert read_label_manifest(site.data.labels or Path()) == {uid: case.label}


def public_key(path: Path) -> Path:
    path.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path


def samples(ds: torch.utils.data.TensorDataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(ds[i][0].numpy(), ds[i][1].numpy()) for i in range(len(ds))]


@needs_orthanc
def test_pacs_site_trains_on_the_nifti_sites_pairs(tmp_path: Path, data_dir: Path) -> None:
    root = data_dir / HIPPO
    held = hospital_holdings(root, partition=0, num_partitions=3, out=tmp_path / "dicom",
                             max_cases=3)
    assert len(held.case_ids) == 3 and len(held.masks) == 3
    key = public_key(tmp_path / "app.pub")
    task = get_task("hippocampus")
    with OrthancServer(tmp_path / "orthanc") as server:
        stored, failed = store_files(server.pacs_config(), held.files)
        assert failed == [] and stored == len(held.files)
        cfg = write_pacs_site_config(tmp_path / "hospital-a", name="hospital-a",
                                     pacs=server.pacs_config("c-get"), holdings=held,
                                     trusted_app_keys=[key])
        t0 = time.monotonic()
        assert main(["site", "ingest", "--config", str(cfg)]) == 0
        print(f"ingested {len(held.files)} instances in {time.monotonic() - t0:.2f}s")
    # the NIfTI site of the same partition: the pairs to find, keyed by their mask
    nifti = load_partition(DataSpec("nifti", root, partition=0, num_partitions=3), task)
    expected = {y.tobytes(): x for x, y in samples(nifti.train) + samples(nifti.val)}
    assert len(expected) == len(partition_cases(root, partition=0, num_partitions=3))
    site = load_site_config(cfg)
    assert read_label_manifest(site.data.labels or Path()) == held.masks
    assert len(list_volumes(site.data.root)) == 3
    data = load_site_data(site.data, task, preprocess=site.preprocess)
    assert data.skipped == [] and len(data.train) + len(data.val) == 3
    for x, y in samples(data.train) + samples(data.val):
        assert x.shape == y.shape == (1, *task.input_shape)
        assert set(np.unique(y)) == {0, 1, 2}  # both hippocampus parts are there
        # the same mask, voxel for voxel (Dice 1.0), on the same image (bit for bit
        # here; the tolerance is for hippocampus_311, the one image 16 bits quantise)
        assert y.tobytes() in expected, "a mask no NIfTI case of the partition has"
        np.testing.assert_allclose(x, expected[y.tobytes()], rtol=0, atol=1e-3)
