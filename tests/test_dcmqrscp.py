"""A second real PACS: DCMTK's ``dcmqrscp``, side by side with Orthanc.

``dcmqrscp`` differs from Orthanc where a site notices: it leaves SeriesDescription out of
its series-level C-FIND answers (and ignores it as a matching key), matches StudyDescription
case-sensitively, and with ``--require-find`` refuses a C-GET/C-MOVE context proposed without
a FIND context. The same cohort must give the same series on both, what was found and what
each [cohort] pattern removed must be reported, an empty cohort must not exit 0, and a
refusal (a context, an unknown move destination) must be named with the fix and exit code
``PACS``.

The PACS here are real processes on 127.0.0.1 with their own storage folders and free
ports, filled over C-STORE with real DICOM from ../shared/data (a brain MR study: HippoCrop
and T2_reg series; a CT head phantom study). Without dcmqrscp (or Orthanc) their tests skip,
except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove,
)

from fedpacs.client.ingest import PACS_REFUSED, PACS_UNREACHABLE, RETRIEVE_FAILED, ingest
from fedpacs.client.pacs import (
    DIMSE_STATUSES,
    UNRESOLVED,
    CohortQuery,
    DimseTransport,
    PacsConfig,
    PacsRefused,
    dimse_status,
    pattern_matches,
)
from fedpacs.client.volumes import list_volumes, load_volume
from fedpacs.common.errors import ExitCode, ProcessError
from fedpacs.common.procs import ProcessSet, child_env, free_port, port_open, wait_until
from fedpacs.deploy.cli import main
from fedpacs.deploy.orthanc import OrthancServer, orthanc_available, store_files

CI = bool(os.environ.get("CI"))
needs_dcmqrscp = pytest.mark.skipif(
    shutil.which("dcmqrscp") is None and not CI,
    reason="DCMTK's dcmqrscp not installed (`make system-deps` installs dcmtk)")
MOVE_AE = "FEDPACS"
HIPPO, T2, CT = "HippoCrop", "T2_reg", "STD BRAIN 5MM"  # the series descriptions held
MR_STUDY, CT_STUDY = "MR RCBV SEQUENCE", "1A TRAUMA/PLAIN HEAD DM"


@dataclass
class Dcmqrscp:
    """One ``dcmqrscp`` process (DCMTK's query/retrieve SCP) with its own config file,
    storage folder and port; ``flags`` are extra command-line options (e.g.
    ``--require-find``); ``move_destinations``: AE title -> port on 127.0.0.1 (HostTable)."""

    workdir: Path
    storage: Path
    aet: str = "DCMQRSCP"
    move_destinations: dict[str, int] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    port: int = 0
    procs: ProcessSet = field(init=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.procs = ProcessSet(self.workdir / "logs")

    def config_text(self) -> str:
        hosts = "\n".join(f"{aet.lower()} = ({aet}, 127.0.0.1, {port})"
                          for aet, port in self.move_destinations.items())
        return (f"NetworkTCPPort = {self.port}\nMaxPDUSize = 131072\nMaxAssociations = 16\n\n"
                f"HostTable BEGIN\n{hosts}\nHostTable END\n\nVendorTable BEGIN\n"
                f"VendorTable END\n\nAETable BEGIN\n{self.aet} {self.storage} RW "
                "(100, 1024mb) ANY\nAETable END\n")

    def start(self, *, timeout_s: float = 20.0) -> Dcmqrscp:
        binary = shutil.which("dcmqrscp")
        if binary is None:
            raise ProcessError("dcmqrscp is not installed. Fix: `make system-deps` (apt-get "
                               "install dcmtk)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "dcmqrscp.cfg"
        cfg.write_text(self.config_text())
        # fork mode (the default): one child per association; the single-process mode of
        # dcmqrscp 3.6.7 crashed after an association here
        self.procs.start("dcmqrscp", [binary, "-c", str(cfg), *self.flags, str(self.port)],
                         env=child_env(), cwd=self.workdir)
        wait_until(f"dcmqrscp on port {self.port}", lambda: port_open("127.0.0.1", self.port),
                   timeout_s=timeout_s, alive=self.procs.check_alive)
        return self

    def stop(self) -> None:
        self.procs.stop_all(grace_s=5)

    def __enter__(self) -> Dcmqrscp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pacs_config(self, method: str = "c-get", **kw: object) -> PacsConfig:
        return PacsConfig(**{"method": method, "host": "127.0.0.1", "port": self.port,
                             "called_ae": self.aet, **kw})


@dataclass(frozen=True)
class Pacs:
    """One PACS under test: its kind, how to reach it, the port its C-MOVEs go to."""

    kind: str
    server: Dcmqrscp | OrthancServer
    move_port: int

    def config(self, method: str = "c-get", **kw: object) -> PacsConfig:
        kw.setdefault("move_destination", MOVE_AE)
        kw.setdefault("storage_port", self.move_port)
        return self.server.pacs_config(method, timeout_s=20, **kw)


def holdings(data_dir: Path) -> list[Path]:
    """What both PACS hold: two series of a brain MR study, one CT head phantom series."""
    mr = data_dir / "dicom_brainmr" / "Study1"
    ct = data_dir / "dicom_ct_dcmqa" / "Philips_Ingenuity_phantom"
    return sorted(p for d in (mr / "13_HCropVolume", mr / "37916-T2reg-88910", ct)
                  for p in d.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def series_uids(data_dir: Path) -> dict[str, str]:
    """SeriesDescription -> SeriesInstanceUID of what the PACS hold."""
    return {str(ds.SeriesDescription): str(ds.SeriesInstanceUID) for ds in (
        pydicom.dcmread(f, stop_before_pixels=True) for f in holdings(data_dir))}


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Pacs]:
    """A strict dcmqrscp (``--require-find``) holding :func:`holdings`."""
    move_port = free_port()
    work = tmp_path_factory.mktemp("dcmqrscp")
    with Dcmqrscp(work, work / "storage", move_destinations={MOVE_AE: move_port},
                  flags=("--require-find",)) as server:
        files = holdings(data_dir)
        stored, failed = store_files(server.pacs_config(), files)
        assert failed == [] and stored == len(files)
        yield Pacs("dcmqrscp", server, move_port)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Pacs]:
    if not orthanc_available() and not CI:
        pytest.skip("Orthanc not installed (`make system-deps` installs it)")
    move_port = free_port()
    with OrthancServer(tmp_path_factory.mktemp("orthanc"),
                       move_destinations={MOVE_AE: move_port}) as server:
        files = holdings(data_dir)
        stored, failed = store_files(server.pacs_config(), files)
        assert failed == [] and stored == len(files)
        yield Pacs("orthanc", server, move_port)


@pytest.fixture(params=["dcmqrscp", "orthanc"])
def pacs(request: pytest.FixtureRequest) -> Pacs:
    if request.param == "dcmqrscp" and shutil.which("dcmqrscp") is None and not CI:
        pytest.skip("DCMTK's dcmqrscp not installed (`make system-deps` installs dcmtk)")
    found: Pacs = request.getfixturevalue(request.param)
    return found


def site_toml(tmp_path: Path, cfg: PacsConfig, cohort: str) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    site = tmp_path / "site.toml"
    site.write_text(f'[site]\nname = "h"\ntask = "hippocampus"\n[data]\nformat = "nifti"\n'
                    f'root = "{tmp_path}"\n[pacs]\nmethod = "{cfg.method}"\nport = {cfg.port}\n'
                    f'called_ae = "{cfg.called_ae}"\nmove_destination = '
                    f'"{cfg.move_destination}"\nstorage_port = {cfg.storage_port}\n'
                    f'cache_dir = "cache"\ntimeout_s = 20\n[cohort]\n{cohort}\n')
    return site


# --------------------------------------------------------------------------- (a) + (e)
@pytest.mark.parametrize("pacs,method", [
    ("dcmqrscp", "c-get"), ("dcmqrscp", "c-move"),  # dcmqrscp speaks DIMSE only
    ("orthanc", "c-get"), ("orthanc", "c-move"), ("orthanc", "dicomweb"),
], indirect=["pacs"])
def test_series_description_selects_the_same_series_on_both(pacs: Pacs, method: str,
                                                            tmp_path: Path) -> None:
    """dcmqrscp does not answer SeriesDescription: it is read from each series' first
    header instead of every series being dropped; matching is the site's, case-insensitive.
    On dcmqrscp (``--require-find``) this C-MOVE and C-GET also show (c) fixed."""
    s = ingest(pacs.config(method), CohortQuery(series_description="*hippo*"),
               tmp_path / "cache")
    assert s.skipped == [] and s.exit_code == ExitCode.OK
    assert (s.studies_found, s.series_found) == (2, 3)
    assert (s.cohort_studies, s.cohort_series) == (1, 1)
    assert s.instances_found == s.retrieved == 32 and s.converted == 1
    [by_series] = [r for r in s.removed if r.key == "series_description"]
    assert (by_series.studies, by_series.series) == (0, 2)
    assert sorted(by_series.seen) == sorted([T2, CT])
    # what the PACS did not answer came from one header per series (dcmqrscp only)
    assert s.header_reads == (3 if pacs.kind == "dcmqrscp" else 0)
    [vol] = list_volumes(tmp_path / "cache")
    assert load_volume(vol)[1]["series_description"] == HIPPO
    text = "\n".join(s.lines())
    assert "[cohort] series_description = '*hippo*' removed 0 study(ies) and 2 series" in text


@pytest.mark.parametrize("query,expected,found", [
    # lower case everywhere: dcmqrscp matched StudyDescription case-sensitively before.
    # A plain modality narrows at the PACS (ModalitiesInStudy): Orthanc applies it,
    # dcmqrscp ignores it; the study description removes the CT study here on both.
    (CohortQuery(modality="mr", study_description="*rcbv*", series_description="hippo?rop"),
     [HIPPO], {"orthanc": (1, 2), "dcmqrscp": (2, 2)}),
    (CohortQuery(study_description="1a trauma/plain head*"), [CT], (2, 1)),
    # a modality pattern is matched here only; Orthanc's ModalitiesInStudy answer rules
    # the MR study out before its series are asked for, dcmqrscp gives none
    (CohortQuery(modality="C?"), [CT], {"orthanc": (2, 1), "dcmqrscp": (2, 3)}),
    (CohortQuery(series_description="t2_REG"), [T2], (2, 3)),
    (CohortQuery(series_description="[t2]*"), [], (2, 3)),  # [ is a literal, not a class
], ids=["mr-rcbv-hippo", "ct-study", "modality-pattern", "t2", "bracket-literal"])
def test_patterns_match_the_same_on_both(pacs: Pacs, query: CohortQuery, expected: list[str],
                                         found: tuple[int, int] | dict[str, tuple[int, int]],
                                         series_uids: dict[str, str]) -> None:
    cohort = DimseTransport(pacs.config()).find_series(query)
    assert sorted(r.series_uid for r in cohort.series) == sorted(series_uids[d]
                                                                 for d in expected)
    assert (cohort.studies_found, cohort.series_found) == (
        found[pacs.kind] if isinstance(found, dict) else found)


# --------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("cohort,found,removed_by", [
    ('series_description = "*T1*"', "the PACS found 2 study(ies) (3 series asked for)",
     "[cohort] series_description = '*T1*' removed 0 study(ies) and 3 series"),
    ('study_description = "*knee*"', "the PACS found 2 study(ies) (0 series asked for)",
     "[cohort] study_description = '*knee*' removed 2 study(ies) and 0 series"),
    ('date_from = "19900101"\ndate_to = "19901231"',
     "the PACS found no study for StudyDate 19900101-19901231", ""),
], ids=["series-pattern", "study-pattern", "no-study"])
def test_empty_cohort_names_what_was_found_and_exits_config(
        pacs: Pacs, tmp_path: Path, capsys: pytest.CaptureFixture[str], cohort: str,
        found: str, removed_by: str) -> None:
    site = site_toml(tmp_path, pacs.config("c-get"), cohort)
    assert main(["site", "ingest", "--config", str(site)]) == ExitCode.CONFIG
    out = capsys.readouterr().out
    assert f"nothing to ingest: {found}" in out and "Fix:" in out
    assert removed_by in out
    if removed_by:
        assert "studies found 2" in out and "in the cohort studies 0, series 0" in out
    assert list_volumes(tmp_path / "cache") == []


# --------------------------------------------------------------------------- (c)
@needs_dcmqrscp
def test_require_find_pacs_refuses_a_move_only_association_by_name(
        dcmqrscp: Pacs) -> None:
    """The fixture's dcmqrscp really enforces --require-find (so the C-MOVE ingests above
    prove the fix), and a refused context is named as such, not as a connection failure."""
    tr = DimseTransport(dcmqrscp.config("c-move"))
    ae = tr.new_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)  # no FIND context
    with pytest.raises(PacsRefused) as info, tr.associate(ae, service="C-MOVE"):
        pass
    msg = str(info.value)
    assert "accepted none of the presentation contexts" in msg and "MOVE" in msg
    assert "connection refused" not in msg and info.value.code == ExitCode.PACS == 9


@needs_dcmqrscp
def test_c_get_context_refused_is_named_and_exits_pacs(
        dcmqrscp: Pacs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A dcmqrscp without C-GET (``--disable-get``, on the same storage): the ingest stops
    at the first series with the context named, the fix, and exit code 9."""
    held = dcmqrscp.server
    assert isinstance(held, Dcmqrscp)
    with Dcmqrscp(tmp_path / "noget", held.storage, flags=("--disable-get",)) as server:
        cfg = server.pacs_config("c-get", timeout_s=20)
        s = ingest(cfg, CohortQuery(modality="MR"), tmp_path / "cache")
        [skip] = s.skipped
        assert skip.kind == PACS_REFUSED and s.exit_code == ExitCode.PACS
        assert "refused the C-GET presentation context" in skip.reason
        assert 'Fix: set [pacs] method = "c-move"' in skip.reason
        assert "(1 more series not asked for)" in skip.reason  # stopped: 2 MR series
        site = site_toml(tmp_path, cfg, 'modality = "MR"')
        assert main(["site", "ingest", "--config", str(site)]) == ExitCode.PACS
        assert "C-GET presentation context" in capsys.readouterr().out


@needs_dcmqrscp
def test_wrong_called_ae_is_named(dcmqrscp: Pacs, tmp_path: Path) -> None:
    s = ingest(dcmqrscp.config("c-get", called_ae="NOTPACS"), CohortQuery(), tmp_path / "c")
    [skip] = s.skipped
    assert skip.kind == PACS_UNREACHABLE and s.exit_code == ExitCode.PACS
    assert "association rejected" in skip.reason and "Called AE title not recognised" in \
        skip.reason and "Fix: set [pacs] called_ae to the PACS' own AE title" in skip.reason


# --------------------------------------------------------------------------- (d)
def test_move_to_an_unknown_destination_is_named_with_the_fix(
        pacs: Pacs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """dcmqrscp answers 0xA801 (move destination unknown): named, with the fix, the ingest
    stops, exit code 9. Orthanc answers 0xC000 for the same mistake and says no more: its
    name is "unable to process", and the fix points at the destination too."""
    cfg = pacs.config("c-move", move_destination="NOBODY")
    s = ingest(cfg, CohortQuery(modality="CT"), tmp_path / "cache")
    [skip] = s.skipped
    if pacs.kind == "dcmqrscp":
        assert skip.kind == PACS_REFUSED and s.exit_code == ExitCode.PACS
        assert "C-MOVE failed with status 0xA801 (move destination unknown)" in skip.reason
        assert "Fix: the PACS does not know AE title NOBODY: register NOBODY" in skip.reason
        assert "dcmqrscp: HostTable" in skip.reason
    else:
        assert skip.kind == RETRIEVE_FAILED and s.exit_code == ExitCode.DATA
        assert "C-MOVE failed with status 0xC000 (unable to process)" in skip.reason
        assert "check that AE title NOBODY is registered at the PACS" in skip.reason
    assert f"port {pacs.move_port}" in skip.reason and "0x" in skip.reason
    site = site_toml(tmp_path, cfg, 'modality = "CT"')
    assert main(["site", "ingest", "--config", str(site)]) == s.exit_code
    assert "NOBODY" in capsys.readouterr().out


# --------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("pattern,value,expected", [
    ("", "anything", True), ("*", "", True), ("*hippo*", "HippoCrop", True),
    ("HIPPOCROP", "hippocrop", True), ("hippo", "HippoCrop", False),  # the whole value
    ("T?_reg", "T2_reg", True), ("T?_reg", "T22_reg", False),
    ("[T2]*", "T2_reg", False), ("[T2]*", "[T2] axial", True),         # [ is literal
    ("CT", "MR\\CT", True), ("CT", "MR\\SR", False),                   # multi-valued
    ("t2_reg", "T2_reg  ", True),                                      # padding ignored
])
def test_pattern_rule(pattern: str, value: str, expected: bool) -> None:
    assert pattern_matches(pattern, value) is expected


def test_every_failure_status_is_named_with_a_fix() -> None:
    for code in (*DIMSE_STATUSES, 0xC001, 0xA7FF, 0xA9FF, 0xD000):
        st = dimse_status(code)
        assert st.name and st.fix and "{" not in st.fix.format(
            calling="X", dest="Y", port=1, method="c-get")
    assert dimse_status(0xA801).refused and not dimse_status(0xA702).refused
    assert dimse_status(0xC123).name == "unable to process"


def test_unresolved_series_is_a_skip_not_a_silent_drop(tmp_path: Path) -> None:
    """A PACS that answers no SeriesDescription and whose instances cannot be read: the
    series is reported (``unresolved``), not silently out of the cohort."""
    from fedpacs.client.pacs import Answer, Refusal, SeriesRef, Sink, find_cohort

    class Mute:
        def study_answers(self, query: CohortQuery) -> list[Answer]:
            return [{"StudyInstanceUID": "1.2.3"}]

        def series_answers(self, study_uids: list[str]) -> list[Answer]:
            return [{"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}]

        def instance_answers(self, series: SeriesRef) -> list[Answer]:
            return [{"SOPInstanceUID": "1.2.3.4.5"}]

        def find_instances(self, series: SeriesRef) -> list[str]:
            return ["1.2.3.4.5"]

        def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                     refuse: object = None) -> int:
            sink(b"not dicom", "1.2.3.4.5")
            return 1

    refused: list[Refusal] = []
    cohort = find_cohort(Mute(), CohortQuery(series_description="*T2*"),
                         refuse=refused.append)
    assert cohort.series == () and (cohort.studies_found, cohort.series_found) == (1, 1)
    [r] = refused
    assert r.kind == UNRESOLVED and "SeriesDescription" in r.reason and "unreadable" in r.reason
    assert cohort.nothing_left().startswith("the PACS found 1 study(ies)")


def test_a_refusal_stops_the_ingest_and_wins_the_exit_code(tmp_path: Path) -> None:
    """A PacsRefused (here: an unknown move destination) is met by every further series:
    the ingest stops at the first, says how many were not asked for, and exits PACS (over
    DATA and CONFIG)."""
    from fedpacs.client.ingest import IngestSummary, Skipped
    from fedpacs.client.pacs import SeriesRef, Sink
    from tests.fakepacs import FakePacs, ct_series

    class Refusing(FakePacs):
        def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                     refuse: object = None) -> int:
            self.retrieves.append((series.series_uid, sop_uids))
            raise PacsRefused("C-MOVE failed with status 0xA801 (move destination unknown)")

    pacs = Refusing(ct_series(2) + ct_series(2) + ct_series(2))
    s = ingest(PacsConfig(port=1), CohortQuery(), tmp_path, transport=pacs)
    [skip] = s.skipped
    assert skip.kind == PACS_REFUSED and "(2 more series not asked for)" in skip.reason
    assert len(pacs.retrieves) == 1 and s.exit_code == ExitCode.PACS
    assert IngestSummary(empty_cohort="x").exit_code == ExitCode.CONFIG
    assert IngestSummary(empty_cohort="x", skipped=[skip]).exit_code == ExitCode.PACS
    assert IngestSummary(skipped=[Skipped("x", RETRIEVE_FAILED, "")]).exit_code == \
        ExitCode.DATA
    assert IngestSummary().exit_code == ExitCode.OK
