"""PACS ingest against the in-memory fake PACS (tests/fakepacs.py): cache hits, instances
that do not arrive, broken instances, an unreachable PACS; and `fedpacs site ingest`'s
refusals of a bad --method. The real-Orthanc paths are in test_pacs.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from fedpacs.client.ingest import (
    NOT_RETRIEVED,
    PACS_UNREACHABLE,
    RETRIEVE_FAILED,
    IngestSummary,
    InstanceCache,
    Skipped,
    ingest,
)
from fedpacs.client.pacs import CohortQuery, PacsConfig, SeriesRef
from fedpacs.client.volumes import list_volumes, load_volume
from fedpacs.common.errors import ExitCode
from fedpacs.deploy.cli import main
from tests.fakepacs import FakePacs, ct_series, part10, sop_uids

PACS = PacsConfig(port=1)  # never dialled: every test injects the fake transport


def ref(series: list[Dataset]) -> SeriesRef:
    return SeriesRef(str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID))


def cached(cache_dir: Path, series: list[Dataset]) -> list[str]:
    cache = InstanceCache(cache_dir)
    return [u for u in sop_uids(series) if cache.has(ref(series), u)]


def assert_no_temporaries(cache_dir: Path) -> None:
    left = [p for p in cache_dir.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert left == []


def test_second_ingest_is_all_cache_hits(tmp_path: Path) -> None:
    a, b = ct_series(4), ct_series(3, slice_mm=2.5)
    pacs = FakePacs(a + b)
    first = ingest(PACS, CohortQuery(modality="CT"), tmp_path, transport=pacs)
    assert first.skipped == [] and not first.unreachable
    assert (first.studies_found, first.series_found, first.instances_found) == (2, 2, 7)
    assert (first.retrieved, first.already_cached, first.converted) == (7, 0, 2)
    assert len(list_volumes(tmp_path)) == 2
    sent, calls = list(pacs.sent), list(pacs.retrieves)

    again = ingest(PACS, CohortQuery(modality="CT"), tmp_path, transport=pacs)
    assert (again.retrieved, again.already_cached, again.converted) == (0, 7, 2)
    assert again.skipped == []
    assert pacs.sent == sent and pacs.retrieves == calls  # nothing asked of the PACS again


def test_volume_geometry_from_the_fake_headers(tmp_path: Path) -> None:
    series = ct_series(5, slice_mm=2.5)
    ingest(PACS, CohortQuery(), tmp_path, transport=FakePacs(series))
    [path] = list_volumes(tmp_path)
    arr, meta = load_volume(path)
    assert arr.shape == (5, 128, 128)
    assert meta["spacing"] == pytest.approx((2.5, 0.661468, 0.661468))
    assert meta["modality"] == "CT" and meta["series_uid"] == str(series[0].SeriesInstanceUID)
    first = series[0]
    hu = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert arr[0].tolist() == hu.tolist()  # modality LUT applied: HU, lowest slice first


def test_missing_instances_are_named_and_the_rest_kept(tmp_path: Path) -> None:
    short, whole = ct_series(5), ct_series(3)
    last = str(short[-1].SOPInstanceUID)  # the top slice: the rest still forms a volume
    pacs = FakePacs(short + whole, withhold={last})
    s = ingest(PACS, CohortQuery(), tmp_path, transport=pacs)
    [skip] = s.skipped
    assert skip.kind == NOT_RETRIEVED and skip.item == str(short[0].SeriesInstanceUID)
    assert "1 of 5 instances did not arrive" in skip.reason
    assert s.instances_found == 8 and s.retrieved == 7 and s.converted == 2
    assert cached(tmp_path, short) == sorted(set(sop_uids(short)) - {last})
    assert cached(tmp_path, whole) == sop_uids(whole)
    assert s.counts()["skipped-not-retrieved"] == 1

    # the PACS delivers it later: only that instance is asked for
    pacs.withhold.clear()
    again = ingest(PACS, CohortQuery(), tmp_path, transport=pacs)
    assert again.skipped == [] and again.retrieved == 1 and again.already_cached == 7
    assert pacs.retrieves[-1] == (str(short[0].SeriesInstanceUID), [last])
    [vol] = [p for p in list_volumes(tmp_path) if p.stem == str(short[0].SeriesInstanceUID)]
    assert load_volume(vol)[0].shape[0] == 5  # reconverted with the late slice


@pytest.mark.parametrize("damage,kinds", [
    (lambda b: b[:-500], {"truncated"}),           # pixel data cut short
    (lambda b: b"not a dicom file" * 8, {"not-dicom"}),
    (lambda b: b[:200], {"unreadable"}),           # file meta only, no dataset
])
def test_broken_instance_skipped_with_its_kind_cache_clean(
        tmp_path: Path, damage: Callable[[bytes], bytes], kinds: set[str]) -> None:
    series = ct_series(4)
    victim = str(series[-1].SOPInstanceUID)
    pacs = FakePacs(series, corrupt={victim: damage(part10(series[-1]))})
    s = ingest(PACS, CohortQuery(), tmp_path, transport=pacs)
    assert {sk.kind for sk in s.skipped} == kinds  # reported once, not also "not-retrieved"
    [skip] = s.skipped
    assert skip.item.endswith(victim) and s.retrieved == 3 and s.converted == 1
    assert cached(tmp_path, series) == sorted(set(sop_uids(series)) - {victim})
    assert_no_temporaries(tmp_path)


def test_unreachable_pacs_is_a_typed_skip(tmp_path: Path) -> None:
    s = ingest(PACS, CohortQuery(), tmp_path, transport=FakePacs(ct_series(2),
                                                                  unreachable=True))
    assert s.unreachable
    [skip] = s.skipped
    assert skip.kind == PACS_UNREACHABLE and "connection refused" in skip.reason
    assert skip.item == PACS.describe()
    assert (s.series_found, s.retrieved, s.converted) == (0, 0, 0)
    assert list_volumes(tmp_path) == []
    assert s.counts()["skipped-pacs-unreachable"] == 1


def test_failed_series_transfer_skips_only_that_series(tmp_path: Path) -> None:
    bad, good = ct_series(3), ct_series(3)
    pacs = FakePacs(bad + good, fail_series={str(bad[0].SeriesInstanceUID)})
    s = ingest(PACS, CohortQuery(), tmp_path, transport=pacs)
    [skip] = s.skipped
    assert skip.kind == RETRIEVE_FAILED and not s.unreachable
    assert cached(tmp_path, good) == sop_uids(good) and cached(tmp_path, bad) == []
    assert s.converted == 1


def test_cohort_filters_reach_the_transport(tmp_path: Path) -> None:
    head = ct_series(2, description="HEAD 5MM", study_date="20190101")
    body = ct_series(2, description="BODY 5MM", study_date="20210101")
    s = ingest(PACS, CohortQuery(series_description="head*", date_from="20180101",
                                 date_to="20191231"), tmp_path,
               transport=FakePacs(head + body))
    assert s.series_found == 1 and cached(tmp_path, head) == sop_uids(head)
    assert cached(tmp_path, body) == []


def test_summary_unreachable_only_for_its_kind() -> None:
    assert not IngestSummary(skipped=[Skipped("x", NOT_RETRIEVED, "")]).unreachable
    assert IngestSummary(skipped=[Skipped("x", PACS_UNREACHABLE, "")]).unreachable


# --------------------------------------------------------------------------- CLI
def site_toml(tmp_path: Path, pacs: str) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    p = tmp_path / "site.toml"
    p.write_text(f'[site]\nname = "h"\ntask = "hippocampus"\n[data]\nformat = "nifti"\n'
                 f'root = "{tmp_path}"\n[pacs]\n{pacs}\ncache_dir = "cache"\n')
    return p


def test_cli_refuses_unknown_method(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    site = site_toml(tmp_path, 'method = "c-get"\nport = 1')
    assert main(["site", "ingest", "--config", str(site), "--method", "c-gte"]) == \
        ExitCode.CONFIG == 3
    err = capsys.readouterr().err
    assert "--method" in err and "c-get, c-move, dicomweb" in err and "'c-gte'" in err
    assert "did you mean 'c-get'" in err and "Fix: pass --method" in err
    assert not (tmp_path / "cache").exists()  # refused before anything ran


def test_cli_dicomweb_without_url_names_the_field(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    site = site_toml(tmp_path, 'method = "c-get"\nport = 1')
    assert main(["site", "ingest", "--config", str(site), "--method", "dicomweb"]) == \
        ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "pacs.dicomweb_url" in err and str(site) in err and "http(s) URL" in err
    assert "Traceback" not in err and "set dicomweb_url" in err


def test_config_dicomweb_without_url_names_the_field(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    site = site_toml(tmp_path, 'method = "dicomweb"')
    assert main(["site", "ingest", "--config", str(site)]) == ExitCode.CONFIG
    assert "pacs.dicomweb_url" in capsys.readouterr().err
