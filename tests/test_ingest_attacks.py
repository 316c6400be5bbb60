"""Hostile DICOM against the ingest, through the real code paths (ingest with the fake PACS
of tests/fakepacs.py, import_folder, build_volume): UIDs that would escape the cache
(``..``, ``../../x``), UIDs that are not UIDs (``1..2``, 65 characters), instances pushed
along with a series that nobody asked for, instances over the size cap and headers that
promise more pixels than a site can decode; and the [pacs] keys that guard against them.
"""

from __future__ import annotations

import copy
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLossless, generate_uid

from fedpacs.client.config import parse_ingest
from fedpacs.client.dicom import (
    BAD_UID,
    MIB,
    TOO_LARGE,
    build_volume,
    promised_pixel_bytes,
    valid_uid,
)
from fedpacs.client.ingest import REJECTED_SERIES, InstanceCache, import_folder, ingest
from fedpacs.client.pacs import CohortQuery, PacsConfig, SeriesRef
from fedpacs.client.volumes import list_volumes
from fedpacs.common.errors import DataError, FieldError
from tests.fakepacs import FakePacs, ct_series, part10, sop_uids

PACS = PacsConfig(port=1)  # never dialled: the fake transport is injected
BAD_UIDS = ["..", "../../x", "1..2", "1" * 65, "1.2/../../../../tmp/evil", "", "1.2.", ".1"]
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def with_uid(ds: Dataset, keyword: str, value: str) -> Dataset:
    """A copy of ``ds`` with one UID replaced by a hostile value (pydicom warns; a PACS
    sending it does not)."""
    out = copy.deepcopy(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(out, keyword, value)
        if keyword == "SOPInstanceUID":
            out.file_meta.MediaStorageSOPInstanceUID = value
    return out


def hostile_part10(ds: Dataset) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return part10(ds)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_valid_uid_is_digits_and_dots_only() -> None:
    assert valid_uid("1.2.840.10008.5.1.4.1.1.2") and valid_uid("1" * 64) and valid_uid("0")
    for bad in [*BAD_UIDS, "1.2.3\x00", "1.2.a", "１.2", "1.2\\1.3", "1 .2", None, 12]:
        assert not valid_uid(bad), bad


# --------------------------------------------------------------------------- bad UIDs
@pytest.mark.parametrize("bad", BAD_UIDS[:4])
@pytest.mark.parametrize("keyword", UID_KEYWORDS)
def test_bad_uid_listed_by_the_pacs_is_never_a_path(tmp_path: Path, keyword: str,
                                                    bad: str) -> None:
    """The PACS lists a study/series/instance under a hostile UID: it is skipped as bad-uid
    before anything is requested or written; the rest of the cohort is ingested."""
    good = ct_series(3)
    victim = ct_series(3)
    victim = ([with_uid(d, keyword, bad) for d in victim] if keyword != "SOPInstanceUID"
              else victim[:2] + [with_uid(victim[2], keyword, bad)])
    pacs = FakePacs(good + victim)
    cache = tmp_path / "site" / "cache"
    s = ingest(PACS, CohortQuery(), cache, transport=pacs)
    assert {sk.kind for sk in s.skipped} == {BAD_UID}
    assert s.counts()["skipped-bad-uid"] == 1
    assert bad not in pacs.sent and all(bad not in (sops or []) for _, sops in pacs.retrieves)
    expected = set(sop_uids(good)) | ({str(d.SOPInstanceUID) for d in victim[:2]}
                                      if keyword == "SOPInstanceUID" else set())
    written = files_under(tmp_path)
    assert {p.stem for p in written if p.suffix == ".dcm"} == expected
    assert all(p.is_relative_to(cache) for p in written)  # nothing outside the cache
    assert not any(".." in p.relative_to(cache).parts for p in written)


@pytest.mark.parametrize("bad", BAD_UIDS[:4])
@pytest.mark.parametrize("keyword", UID_KEYWORDS)
def test_bad_uid_inside_a_sent_instance_is_not_written(tmp_path: Path, keyword: str,
                                                       bad: str) -> None:
    """The PACS lists good UIDs but sends an instance whose header holds a hostile one."""
    series = ct_series(4)
    victim = str(series[-1].SOPInstanceUID)
    pacs = FakePacs(series, corrupt={victim: hostile_part10(with_uid(series[-1], keyword,
                                                                      bad))})
    cache = tmp_path / "site" / "cache"
    s = ingest(PACS, CohortQuery(), cache, transport=pacs)
    [skip] = s.skipped
    assert skip.kind == BAD_UID and keyword in skip.reason
    assert s.retrieved == 3 and s.converted == 1
    written = files_under(tmp_path)
    assert {p.stem for p in written if p.suffix == ".dcm"} == set(sop_uids(series)) - {victim}
    assert all(p.is_relative_to(cache) for p in written)


@pytest.mark.parametrize("bad", BAD_UIDS[:4])
@pytest.mark.parametrize("keyword", UID_KEYWORDS)
def test_import_folder_refuses_bad_uids(tmp_path: Path, keyword: str, bad: str) -> None:
    folder = tmp_path / "cd"
    folder.mkdir()
    series = ct_series(3)
    for i, ds in enumerate(series[:2]):
        (folder / f"{i}.dcm").write_bytes(part10(ds))
    evil = folder / "evil.dcm"
    evil.write_bytes(hostile_part10(with_uid(series[2], keyword, bad)))
    cache = tmp_path / "site" / "cache"
    s = import_folder(folder, cache)
    [skip] = s.skipped
    assert (skip.kind, skip.item) == (BAD_UID, str(evil))
    assert s.retrieved == 2 and s.counts()["skipped-bad-uid"] == 1
    written = files_under(tmp_path) - files_under(folder)
    assert {p.stem for p in written if p.suffix == ".dcm"} == set(sop_uids(series[:2]))
    assert all(p.is_relative_to(cache) for p in written)


def test_cache_paths_refuse_bad_uids(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache")
    for bad in BAD_UIDS:
        for ref, sop in ((SeriesRef(bad, "1.2"), "1.2.3"), (SeriesRef("1.2", bad), "1.2.3"),
                         (SeriesRef("1.2", "1.2.3"), bad)):
            with pytest.raises(DataError) as exc:
                cache.path(ref, sop)
            assert exc.value.kind == BAD_UID
        with pytest.raises(DataError):
            cache.volume_path(bad)


# --------------------------------------------------------------------------- pushes, size
def test_instances_nobody_asked_for_are_not_written(tmp_path: Path) -> None:
    """Along with a series, the PACS pushes an instance of another series and an extra
    instance of the same series (poisoning): both refused, the series is intact."""
    series, other = ct_series(3), ct_series(1)
    poison = copy.deepcopy(series[0])
    poison.SOPInstanceUID = poison.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sid = str(series[0].SeriesInstanceUID)
    pacs = FakePacs(series, extra={sid: [(part10(other[0]), str(other[0].SOPInstanceUID)),
                                         (part10(poison), str(poison.SOPInstanceUID))]})
    s = ingest(PACS, CohortQuery(), tmp_path, transport=pacs)
    assert [sk.kind for sk in s.skipped] == [REJECTED_SERIES, REJECTED_SERIES]
    assert s.retrieved == 3 and s.converted == 1
    assert {p.stem for p in files_under(tmp_path) if p.suffix == ".dcm"} == set(
        sop_uids(series))


def test_instance_of_another_series_under_a_requested_sop_is_refused(tmp_path: Path) -> None:
    """The PACS answers a requested SOP UID with an instance of another series."""
    series = ct_series(3)
    victim = str(series[-1].SOPInstanceUID)
    moved = copy.deepcopy(series[-1])
    moved.SeriesInstanceUID = generate_uid()
    s = ingest(PACS, CohortQuery(), tmp_path,
               transport=FakePacs(series, corrupt={victim: part10(moved)}))
    [skip] = s.skipped
    assert skip.kind == REJECTED_SERIES and s.retrieved == 2
    assert victim not in {p.stem for p in files_under(tmp_path)}


def test_oversized_instance_is_not_written(tmp_path: Path) -> None:
    series = ct_series(3)
    victim = series[-1]
    big = copy.deepcopy(victim)
    big.add_new(0x00990010, "LO", "FEDPACS TEST")
    big.add_new(0x00991000, "OB", b"\0" * (MIB + 1))
    pacs = FakePacs(series, corrupt={str(victim.SOPInstanceUID): part10(big)})
    s = ingest(PacsConfig(port=1, max_instance_mb=1), CohortQuery(), tmp_path, transport=pacs)
    [skip] = s.skipped
    assert skip.kind == TOO_LARGE and s.retrieved == 2
    assert str(victim.SOPInstanceUID) not in {p.stem for p in files_under(tmp_path)}


def crafted_header(template: Dataset) -> Dataset:
    """A compressed instance of a few bytes whose header promises 65535 x 65535 pixels x
    100000 frames x 16 bits (about 858 TB once decoded)."""
    ds = copy.deepcopy(template)
    ds.file_meta.TransferSyntaxUID = JPEGLossless
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 100000
    ds.BitsAllocated = 16
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])  # an empty JPEG
    ds["PixelData"].VR = "OB"
    return ds


def test_header_promising_huge_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    series = ct_series(3)
    victim = series[-1]
    bomb = crafted_header(victim)
    assert promised_pixel_bytes(bomb, "x") == 65535 * 65535 * 100000 * 2
    # via the PACS
    pacs = FakePacs(series, corrupt={str(victim.SOPInstanceUID): part10(bomb)})
    s = ingest(PACS, CohortQuery(), tmp_path / "cache", transport=pacs)
    [skip] = s.skipped
    assert skip.kind == TOO_LARGE and "header promises" in skip.reason
    assert s.retrieved == 2 and s.converted == 1
    # via a CD
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / "bomb.dcm").write_bytes(part10(bomb))
    s = import_folder(tmp_path / "cd", tmp_path / "cache2")
    assert [sk.kind for sk in s.skipped] == [TOO_LARGE]
    assert list_volumes(tmp_path / "cache2") == []
    # a file already on disk (an older cache): refused before pixel_array allocates
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as exc:
            build_volume([tmp_path / "cd" / "bomb.dcm"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.value.kind == TOO_LARGE and peak < 20 * MIB


def test_import_folder_does_not_read_files_over_the_cap(tmp_path: Path) -> None:
    (tmp_path / "cd").mkdir()
    big = tmp_path / "cd" / "big.dcm"
    with big.open("wb") as f:  # sparse: 2 MB on paper
        f.truncate(2 * MIB)
    s = import_folder(tmp_path / "cd", tmp_path / "cache", max_instance_mb=1)
    assert [sk.kind for sk in s.skipped] == [TOO_LARGE]  # not "not-dicom": never parsed


# --------------------------------------------------------------------------- config
def _parse(pacs: dict[str, Any], cohort: dict[str, Any] | None = None
           ) -> tuple[PacsConfig, list[FieldError]]:
    errs: list[FieldError] = []
    cfg = parse_ingest({"pacs": pacs, "cohort": cohort or {}}, Path("/tmp"), errs)
    return cfg.pacs, errs


def test_max_instance_mb_and_move_source_ae_parsed() -> None:
    cfg, errs = _parse({})
    assert errs == [] and cfg.max_instance_mb == 512 and cfg.move_source_ae == ""
    cfg, errs = _parse({"max_instance_mb": 2048, "move_source_ae": "PACSOUT"})
    assert errs == [] and cfg.max_instance_bytes == 2048 * MIB
    assert cfg.move_source_ae == "PACSOUT"


@pytest.mark.parametrize("value", [0, -1, 65537, 1.5, "512", True])
def test_bad_max_instance_mb_is_named(value: object) -> None:
    cfg, errs = _parse({"max_instance_mb": value})
    [err] = errs
    assert err.field == "pacs.max_instance_mb" and "max_instance_mb = 512" in err.fix
    assert cfg.max_instance_mb == 512  # the safe default, never the bad value


def test_bad_move_source_ae_and_study_uids_are_named() -> None:
    _, errs = _parse({"move_source_ae": "X" * 17}, {"study_uids": ["1.2.3", "../../x"]})
    fields = {e.field: e for e in errs}
    assert set(fields) == {"pacs.move_source_ae", "cohort.study_uids"}
    assert "../../x" in fields["cohort.study_uids"].got
