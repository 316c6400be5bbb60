"""Attacks on the site's PACS transports, carried out against the real code paths.

* C-MOVE: while a real Orthanc moves a series to the site, rogue pynetdicom storage SCUs
  push into the site's storage SCP (another AE title, another address, the PACS' AE title
  spoofed with an instance of another series / one nobody asked for / too large).
* DICOMweb: a local HTTP server of the test's own answers with an endless body, a body
  announced as huge, and UIDs with ``/../`` in its QIDO answers.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from fedpacs.client.dicom import BAD_UID, MIB, TOO_LARGE
from fedpacs.client.ingest import REJECTED_PEER, REJECTED_SERIES, ingest
from fedpacs.client.pacs import (
    CohortQuery,
    DicomWebTransport,
    PacsConfig,
    Refusal,
    Refuse,
    ResponseTooLarge,
    SeriesRef,
    Sink,
    StoreOffer,
    StorePolicy,
    listen_address,
    log_refusal,
    read_capped,
    resolve_hosts,
    store_refusal,
)
from fedpacs.common.procs import free_port
from fedpacs.deploy.orthanc import OrthancServer, orthanc_available, store_files

MOVE_AE = "FEDPACS"
PACS_AE = "ORTHANC"  # OrthancServer's AE title: the calling AE of its C-MOVE sub-operations


# --------------------------------------------------------------------------- acceptance
POLICY = StorePolicy("1.2.3", "1.2.3.4", None, max_bytes=1000,
                     peer_hosts=frozenset({"10.0.0.5"}), peer_aes=frozenset({"PACS"}))


def offer(**kw: Any) -> StoreOffer:
    base: dict[str, Any] = dict(peer_host="10.0.0.5", peer_ae="PACS", size=500,
                                study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    return StoreOffer(**{**base, **kw})


@pytest.mark.parametrize("kw,policy_kw,expected", [
    ({}, {}, None),                                             # the PACS, the series
    ({"peer_ae": "PACS  "}, {}, None),                          # AE titles are space-padded
    ({"peer_host": "::ffff:10.0.0.5"}, {}, None),                # IPv4-mapped IPv6 spelling
    ({"peer_host": "10.0.0.6"}, {}, REJECTED_PEER),             # another machine
    ({"peer_ae": "ROGUE"}, {}, REJECTED_PEER),                  # another AE title
    ({"peer_ae": "ROGUE", "series_uid": "9.9"}, {}, REJECTED_PEER),  # peer checked first
    ({"size": 1001}, {}, TOO_LARGE),
    ({"series_uid": "1.2.3.5"}, {}, REJECTED_SERIES),           # poisoning another series
    ({"study_uid": "1.2.9"}, {}, REJECTED_SERIES),
    ({"sop_uid": "1.2.3.4.6"}, {"sop_uids": frozenset({"1.2.3.4.5"})}, REJECTED_SERIES),
    ({"sop_uid": "1.2.3.4.5"}, {"sop_uids": frozenset({"1.2.3.4.5"})}, None),
    ({"sop_uid": ".."}, {}, BAD_UID),
    ({"series_uid": "../../x"}, {}, BAD_UID),
    ({"study_uid": ""}, {}, BAD_UID),                           # unreadable header
    ({"peer_host": "10.9.9.9", "peer_ae": "X"}, {"peer_hosts": frozenset(),
                                                 "peer_aes": frozenset()}, None),  # C-GET
])
def test_store_refusal_accepts_only_the_pacs_and_the_series(
        kw: dict[str, Any], policy_kw: dict[str, Any], expected: str | None) -> None:
    from dataclasses import replace

    refusal = store_refusal(replace(POLICY, **policy_kw), offer(**kw))
    assert (refusal[0] if refusal else None) == expected


def test_storage_scp_binds_the_interface_towards_the_pacs() -> None:
    assert resolve_hosts("localhost", 104) >= {"127.0.0.1"}
    assert listen_address(frozenset({"127.0.0.1"}), 104) == "127.0.0.1"
    assert listen_address(resolve_hosts("127.0.0.1", 104), 104) == "127.0.0.1"


# --------------------------------------------------------------------------- C-MOVE
needs_orthanc = pytest.mark.skipif(not orthanc_available() and not os.environ.get("CI"),
                                   reason="Orthanc not installed (`make system-deps`)")


@pytest.fixture(scope="module")
def hippo_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "dicom_brainmr" / "Study1" / "13_HCropVolume").glob("*.dcm"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory,
            hippo_files: list[Path]) -> Iterator[tuple[OrthancServer, int]]:
    move_port = free_port()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), aet=PACS_AE,
                           move_destinations={MOVE_AE: move_port})
    with server:
        stored, failed = store_files(server.pacs_config(), hippo_files)
        assert failed == [] and stored == len(hippo_files)
        yield server, move_port


@dataclass
class Push:
    """One rogue association: what the site answered."""

    outcome: str  # established / rejected / closed
    statuses: list[int | None] = field(default_factory=list)


def push(port: int, calling_ae: str, datasets: list[Dataset], *,
         source: str = "127.0.0.1") -> Push:
    """A rogue storage SCU: C-STORE ``datasets`` to the site's SCP from ``source``."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=MOVE_AE, bind_address=(source, 0))
    if not assoc.is_established:
        # pynetdicom leaves the socket open when the peer closed it first: close it here
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None:
            raw.close()
        return Push("rejected" if assoc.is_rejected else "closed")
    out = Push("established")
    for ds in datasets:
        status = assoc.send_c_store(ds)
        out.statuses.append(int(status.Status) if "Status" in status else None)
        if not assoc.is_established:
            break
    if assoc.is_established:
        assoc.release()
    return out


class AttackDuringMove:
    """The real DimseTransport, with ``attack`` run when the first legitimate instance
    reaches the site: Orthanc's association waits for its C-STORE answer meanwhile, so the
    rogue pushes land while the site's storage SCP is listening for the move."""

    def __init__(self, cfg: PacsConfig, attack: Callable[[SeriesRef], dict[str, Any]]) -> None:
        from fedpacs.client.pacs import DimseTransport

        self.real = DimseTransport(cfg)
        self.attack = attack
        self.results: dict[str, Any] = {}
        self.started = False

    def find_series(self, query: CohortQuery, *,
                    refuse: Refuse = log_refusal) -> list[SeriesRef]:
        return self.real.find_series(query, refuse=refuse)

    def find_instances(self, series: SeriesRef) -> list[str]:
        return self.real.find_instances(series)

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                 refuse: Refuse = log_refusal) -> int:
        def first_attack_then_sink(data: bytes, sop: str) -> None:
            if not self.started:  # once: rogue instances reach this sink too
                self.started = True
                self.results = self.attack(series)
            sink(data, sop)

        return self.real.retrieve(series, sop_uids, first_attack_then_sink, refuse=refuse)


def rogue_instance(template: Path, *, series_uid: str = "", pad: int = 0) -> Dataset:
    """A copy of a legitimate instance under a new SOP UID (poison for its series, or for
    ``series_uid``), optionally ``pad`` bytes larger."""
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    if pad:  # a private OB element of ``pad`` bytes
        ds.add_new(0x00990010, "LO", "FEDPACS TEST")
        ds.add_new(0x00991000, "OB", b"\0" * pad)
    return ds


def cached_sops(cache: Path) -> set[str]:
    return {p.stem for p in (cache / "instances").rglob("*") if p.is_file()}


@needs_orthanc
def test_rogue_pushes_during_a_real_c_move_are_refused(
        orthanc: tuple[OrthancServer, int], hippo_files: list[Path], tmp_path: Path) -> None:
    server, move_port = orthanc
    cfg = server.pacs_config("c-move", move_destination=MOVE_AE, storage_port=move_port,
                             max_instance_mb=1, timeout_s=20)
    legit = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
             for f in hippo_files}
    template = hippo_files[0]
    poison = rogue_instance(template)                          # same series, new SOP
    other = rogue_instance(template, series_uid=generate_uid())  # another series
    big = rogue_instance(template, pad=MIB + MIB // 2)          # 1.5 MB > max_instance_mb
    huge = rogue_instance(template, pad=3 * MIB)                # past the in-flight cap
    rogue_sops = {str(d.SOPInstanceUID) for d in (poison, other, big, huge)}

    def attack(series: SeriesRef) -> dict[str, Any]:
        assert series.series_uid == str(poison.SeriesInstanceUID)
        # bound to the interface towards the PACS (loopback), not to 0.0.0.0
        with socket.socket() as probe:
            probe.settimeout(2)
            reachable_elsewhere = probe.connect_ex(("127.0.0.2", move_port)) == 0
        return {
            "reachable_elsewhere": reachable_elsewhere,
            "other_ae": push(move_port, "ROGUE", [poison]),
            "other_host": push(move_port, PACS_AE, [poison], source="127.0.0.2"),
            "spoofed_other_series": push(move_port, PACS_AE, [other]),
            "spoofed_poison": push(move_port, PACS_AE, [poison]),
            "spoofed_big": push(move_port, PACS_AE, [big]),
            "spoofed_huge": push(move_port, PACS_AE, [huge]),
        }

    tr = AttackDuringMove(cfg, attack)
    s = ingest(cfg, CohortQuery(series_description="HippoCrop"), tmp_path / "cache",
               transport=tr)
    r = tr.results
    assert r, "the attack did not run during the move"
    assert not r["reachable_elsewhere"]
    assert r["other_ae"].outcome == "rejected"        # A-ASSOCIATE-RJ: AE not recognised
    assert r["other_host"].outcome in ("closed", "rejected")  # closed before a byte was read
    assert r["spoofed_other_series"].statuses == [0x0124]
    assert r["spoofed_big"].statuses == [0xA700]
    assert r["spoofed_huge"].statuses in ([None], [])   # association aborted mid-instance
    counts = s.counts()
    assert counts.get("skipped-rejected-peer") == 2
    # another series (refused by the SCP) and a SOP nobody asked for (refused by the ingest)
    assert counts.get("skipped-rejected-series") == 2
    assert counts.get("skipped-too-large") == 2
    assert {k for k in counts if k.startswith("skipped-")} == {
        "skipped-rejected-peer", "skipped-rejected-series", "skipped-too-large"}
    # the legitimate move is complete, and only it is in the cache
    assert s.instances_found == s.retrieved == len(legit) == 32 and s.converted == 1
    assert cached_sops(tmp_path / "cache") == legit
    assert not rogue_sops & {p.stem for p in tmp_path.rglob("*")}
    # what may leave the site names no peer, path or UID
    assert all(isinstance(v, int) for v in counts.values())


@needs_orthanc
def test_c_move_from_an_unexpected_pacs_ae_is_refused(
        orthanc: tuple[OrthancServer, int], tmp_path: Path) -> None:
    """With move_source_ae set to another title, Orthanc's own C-STOREs are refused: the
    accepted AE comes from the site config, not from whoever connects."""
    server, move_port = orthanc
    cfg = server.pacs_config("c-move", move_destination=MOVE_AE, storage_port=move_port,
                             move_source_ae="OTHERPACS", timeout_s=20)
    s = ingest(cfg, CohortQuery(series_description="HippoCrop"), tmp_path / "cache")
    assert s.retrieved == 0 and cached_sops(tmp_path / "cache") == set()
    assert s.counts().get("skipped-rejected-peer", 0) >= 1


# --------------------------------------------------------------------------- DICOMweb
@dataclass
class WebPacs:
    """A hostile DICOMweb server: QIDO answers with ``/../`` UIDs, WADO answers that are
    endless or announce a huge length. Records every path asked for."""

    study: str = "1.2.3"
    series: str = "1.2.3.4"
    instance: str = "1.2.3.4.5"
    mode: str = "endless"  # endless | announced
    paths: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)

    def serve(self) -> tuple[http.server.ThreadingHTTPServer, str]:
        pacs = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, items: list[dict[str, Any]]) -> None:
                body = json.dumps(items).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                pacs.paths.append(self.path)
                uid = lambda v: {"Value": [v]}  # noqa: E731
                if path == "/dicom-web/studies":
                    self._json([{"0020000D": uid(pacs.study)},
                                {"0020000D": uid("1.2/../../../etc")}])
                elif path == f"/dicom-web/studies/{pacs.study}/series":
                    self._json([{"0020000E": uid(pacs.series), "00080060": uid("CT")},
                                {"0020000E": uid("1.2.3/../5"), "00080060": uid("CT")}])
                elif path.endswith("/instances") and pacs.series in path:
                    self._json([{"00080018": uid(pacs.instance)},
                                {"00080018": uid("1.2.3.4/../../6")}])
                elif path.endswith(f"/instances/{pacs.instance}"):
                    self._instance()
                else:
                    self.send_error(404)

            def _instance(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", 'multipart/related; type="application/dicom"'
                                 "; boundary=b")
                if pacs.mode == "announced":
                    self.send_header("Content-Length", str(50 * 1024 ** 3))
                self.end_headers()
                chunk = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 65536
                sent = 0
                try:  # endless: until the client hangs up (bounded, should it never)
                    while sent < 256 * MIB:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                pacs.sent.append(sent)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/dicom-web"


@pytest.mark.parametrize("mode", ["endless", "announced"])
def test_dicomweb_oversized_answer_and_dotdot_uids_are_refused(tmp_path: Path,
                                                               mode: str) -> None:
    web = WebPacs(mode=mode)
    server, url = web.serve()
    try:
        cfg = PacsConfig(method="dicomweb", dicomweb_url=url, max_instance_mb=1, timeout_s=10)
        s = ingest(cfg, CohortQuery(), tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    kinds = sorted(sk.kind for sk in s.skipped)
    # the /../ study, series and instance never reached a URL; the answer was cut at the cap
    assert kinds == [BAD_UID, BAD_UID, BAD_UID, TOO_LARGE]  # each reported once
    assert not any(".." in p or "%2F" in p.upper() for p in web.paths)
    assert [p for p in web.paths if "etc" in p or "/5/" in p or p.endswith("6")] == []
    assert cached_sops(tmp_path / "cache") == set() and s.retrieved == 0
    assert "read stopped" in str(s.skipped) or "announces" in str(s.skipped)


class Endless:
    """A response body that never ends, counting what was read of it."""

    headers: dict[str, str] = {}

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, n: int) -> bytes:
        self.read_bytes += n
        return b"x" * n


def test_read_capped_never_reads_past_the_cap() -> None:
    body = Endless()
    with pytest.raises(ResponseTooLarge, match=f"larger than the {2 * MIB} bytes"):
        read_capped(body, 2 * MIB, "GET x")
    assert body.read_bytes == 2 * MIB + 1
    small = Endless()
    small.headers = {"Content-Length": str(10 * MIB)}
    with pytest.raises(ResponseTooLarge, match="announces 10485760 bytes"):
        read_capped(small, 2 * MIB, "GET x")  # without reading
    assert small.read_bytes == 0


def test_dicomweb_never_builds_a_url_from_a_bad_uid() -> None:
    tr = DicomWebTransport(PacsConfig(method="dicomweb", dicomweb_url="http://127.0.0.1:1/x"))
    refused: list[Refusal] = []
    n = tr.retrieve(SeriesRef("1.2.3", "1.2.3.4"), ["1.2/../../x", "1..2", "1" * 65],
                    lambda data, sop: None, refuse=refused.append)
    assert n == 0 and [r.kind for r in refused] == [BAD_UID] * 3  # no request was made
    from fedpacs.common.errors import PacsError

    with pytest.raises(PacsError, match="refusing to put"):
        tr.find_instances(SeriesRef("1.2.3", "1.2.3.4/../.."))

