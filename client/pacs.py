"""Query/retrieve from a hospital PACS: DIMSE (C-FIND + C-GET or C-MOVE, pynetdicom) or
DICOMweb (QIDO-RS + WADO-RS). Transports share one small interface so the ingest logic is
the same whatever the PACS speaks, and tests can inject a fake.

What arrives is not trusted: UIDs from a query answer are refused unless they are DICOM
UIDs before they go into a query or URL, DICOMweb responses are read up to a cap, and the
C-MOVE storage SCP listens only while its series is moved, on the interface that routes to
the PACS, and accepts only the PACS (address and AE title) sending instances of that series
of at most ``max_instance_mb`` (:func:`store_refusal`). Whatever is refused goes to the
``refuse`` callback with a reason code (:data:`REJECTED_PEER`, :data:`REJECTED_SERIES`,
``too-large``, ``bad-uid``), never to the sink.
"""

from __future__ import annotations

import fnmatch
import io
import ipaddress
import json
import logging
import socket
import socketserver
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeGuard

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.transport import ThreadedAssociationServer

from fedpacs.client.dicom import (
    BAD_UID,
    DEFAULT_MAX_INSTANCE_MB,
    MAX_UID_LENGTH,
    MIB,
    TOO_LARGE,
    UID_TAGS,
    UNREADABLE,
    header_uid,
    shown,
    uid_problem,
    valid_uid,
)
from fedpacs.common.errors import ConfigError, FieldError, PacsError, did_you_mean

log = logging.getLogger("fedpacs.pacs")

Method = Literal["c-get", "c-move", "dicomweb"]
METHODS: tuple[str, ...] = ("c-get", "c-move", "dicomweb")
DICOMWEB_SCHEMES = ("http://", "https://")
# Storage SOP classes a site asks for with C-GET (a C-GET association holds <= 128 contexts).
GET_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",      # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",      # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",    # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.66.4",   # Segmentation
    "1.2.840.10008.5.1.4.1.1.128",    # PET
    "1.2.840.10008.5.1.4.1.1.1",      # CR
    "1.2.840.10008.5.1.4.1.1.1.1",    # DX
    "1.2.840.10008.5.1.4.1.1.20",     # NM
)
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5",     # RLE
]
PENDING = (0xFF00, 0xFF01)
# Reason codes of instances and peers a retrieve refuses (with dicom's bad-uid, too-large).
REJECTED_PEER = "rejected-peer"      # a C-STORE peer that is not the PACS (address, AE title)
REJECTED_SERIES = "rejected-series"  # an instance not of the series (or SOPs) being retrieved
# C-STORE statuses the storage SCP answers refused instances with
STATUS_REFUSED = 0x0124              # refused: not authorised
STATUS_OUT_OF_RESOURCES = 0xA700     # too large, or the cache could not write it
STATUS_CANNOT_UNDERSTAND = 0xC000    # unreadable header, bad UID
# Bytes a response or association may carry on top of one instance (headers, commands).
WIRE_SLACK = MIB
MAX_INSTANCE_MB_LIMIT = 65536  # [pacs] max_instance_mb: at most 64 GB
UID_KEYWORDS = tuple(UID_TAGS)  # StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID


@dataclass(frozen=True)
class PacsConfig:
    """How a site reaches its PACS (from the site config's [pacs] table)."""

    method: Method = "c-get"
    host: str = "127.0.0.1"
    port: int = 104
    called_ae: str = "ORTHANC"
    calling_ae: str = "FEDPACS"
    move_destination: str = ""  # AE the PACS sends C-MOVE results to (default: calling_ae)
    storage_port: int = 11112   # where this site's storage SCP listens for C-MOVE
    dicomweb_url: str = ""      # e.g. http://127.0.0.1:8042/dicom-web
    timeout_s: float = 30.0
    # AE title the PACS uses as calling AE for C-MOVE's C-STORE sub-operations
    # ("": called_ae, which is what Orthanc and most PACS use)
    move_source_ae: str = ""
    # the largest instance accepted, as received and as decoded pixels; also the largest
    # DICOMweb response read
    max_instance_mb: int = DEFAULT_MAX_INSTANCE_MB

    @property
    def max_instance_bytes(self) -> int:
        return self.max_instance_mb * MIB

    def describe(self) -> str:
        if self.method == "dicomweb":
            return f"DICOMweb {self.dicomweb_url}"
        return f"{self.called_ae}@{self.host}:{self.port} ({self.method})"


def is_method(value: object) -> TypeGuard[Method]:
    return isinstance(value, str) and value in METHODS


def method_error(value: object, *, field: str = "pacs.method",
                 fix: str = 'set method = "c-get" (or "c-move", "dicomweb")') -> FieldError | None:
    """The FieldError for a retrieval method that is not one of :data:`METHODS`."""
    if is_method(value):
        return None
    hint = did_you_mean(value, METHODS) if isinstance(value, str) else ""
    return FieldError(field, f"one of {', '.join(METHODS)}", f"{value!r}{hint}", fix)


def dicomweb_url_error(method: str, url: object, *,
                       field: str = "pacs.dicomweb_url") -> FieldError | None:
    """With method dicomweb, the FieldError for a missing or non-http(s) DICOMweb URL."""
    if method != "dicomweb" or (isinstance(url, str) and url.startswith(DICOMWEB_SCHEMES)):
        return None
    return FieldError(field, "an http(s) URL of the PACS' DICOMweb root (method dicomweb)",
                      repr(url) if url else "nothing",
                      'set dicomweb_url = "https://pacs/dicom-web" in [pacs], or use '
                      "method c-get or c-move")


def max_instance_mb_error(value: object, *,
                          field: str = "pacs.max_instance_mb") -> FieldError | None:
    """The FieldError for a size cap that is not a whole number of MB in 1..64 GB."""
    if isinstance(value, int) and not isinstance(value, bool) and \
            1 <= value <= MAX_INSTANCE_MB_LIMIT:
        return None
    return FieldError(field, f"a whole number of MB in 1..{MAX_INSTANCE_MB_LIMIT}: the largest "
                      "instance (as received and as decoded pixels) and DICOMweb response "
                      "the site accepts", repr(value),
                      f"set max_instance_mb = {DEFAULT_MAX_INSTANCE_MB}")


def study_uids_error(uids: list[str], *,
                     field: str = "cohort.study_uids") -> FieldError | None:
    """The FieldError for study UIDs that are not DICOM UIDs (they go into queries/URLs)."""
    bad = [u for u in uids if not valid_uid(u)]
    if not bad:
        return None
    return FieldError(field, f"DICOM UIDs (1..{MAX_UID_LENGTH} digits and dots, no empty "
                      "component)", ", ".join(shown(u) for u in bad[:3]),
                      "copy each StudyInstanceUID exactly as the PACS shows it")


@dataclass(frozen=True)
class CohortQuery:
    """Which studies/series to ingest. Empty fields do not filter. Patterns use * and ?."""

    modality: str = ""
    study_description: str = ""
    series_description: str = ""
    date_from: str = ""  # YYYYMMDD
    date_to: str = ""
    study_uids: tuple[str, ...] = ()

    def date_range(self) -> str:
        return f"{self.date_from}-{self.date_to}" if self.date_from or self.date_to else ""


@dataclass(frozen=True)
class SeriesRef:
    study_uid: str
    series_uid: str
    modality: str = ""
    series_description: str = ""


def _match(pattern: str, value: str) -> bool:
    return not pattern or fnmatch.fnmatch(value.lower(), pattern.lower())


def series_matches(query: CohortQuery, s: SeriesRef) -> bool:
    return (not query.modality or s.modality.upper() == query.modality.upper()) and _match(
        query.series_description, s.series_description)


Sink = Callable[[bytes, str], None]  # (Part-10 bytes, SOP Instance UID)


@dataclass(frozen=True)
class Refusal:
    """Something a transport refused: ``kind`` is a reason code that may be counted and
    reported; ``item`` and ``reason`` are for the site log only (an address, a UID).
    ``sop_uid``: the requested instance it concerns, if it is one ("" otherwise)."""

    kind: str
    item: str
    reason: str
    sop_uid: str = ""


Refuse = Callable[[Refusal], None]


def log_refusal(refusal: Refusal) -> None:
    """The default :data:`Refuse`: a warning in the site log."""
    log.warning("refused [%s] %s: %s", refusal.kind, refusal.item, refusal.reason)


class Transport(Protocol):
    def find_series(self, query: CohortQuery, *,
                    refuse: Refuse = log_refusal) -> list[SeriesRef]: ...

    def find_instances(self, series: SeriesRef) -> list[str]: ...

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                 refuse: Refuse = log_refusal) -> int: ...


# --------------------------------------------------------------------------- acceptance
@dataclass(frozen=True)
class StorePolicy:
    """What this site's storage SCP accepts while one series is retrieved (site config and
    the request itself: nothing the sender says widens it).

    ``peer_hosts`` / ``peer_aes``: the PACS' addresses and calling AE title (empty: any;
    only for C-GET, where the association is the one this site opened to the PACS).
    ``sop_uids``: the instances requested (None: any instance of the series)."""

    study_uid: str
    series_uid: str
    sop_uids: frozenset[str] | None
    max_bytes: int
    peer_hosts: frozenset[str] = frozenset()
    peer_aes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StoreOffer:
    """One instance a peer pushes: who sends it, its size and the UIDs in its header."""

    peer_host: str
    peer_ae: str
    size: int
    study_uid: str
    series_uid: str
    sop_uid: str


def normalise_ip(host: str) -> str:
    """An IP address in one spelling (IPv4-mapped IPv6 as IPv4, no zone); else as given."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def peer_refusal(policy: StorePolicy, host: str, ae: str) -> str | None:
    """Why a peer (address, calling AE title) may not store here, or None."""
    if policy.peer_hosts and normalise_ip(host) not in policy.peer_hosts:
        return (f"address {shown(host)} is not the PACS' ({', '.join(sorted(policy.peer_hosts))}"
                ")")
    if policy.peer_aes and ae.strip() not in policy.peer_aes:
        return (f"calling AE title {shown(ae.strip())} is not the PACS' "
                f"({', '.join(sorted(policy.peer_aes))})")
    return None


def store_refusal(policy: StorePolicy, offer: StoreOffer) -> tuple[str, str] | None:
    """(reason code, why) when the storage SCP must refuse ``offer``, else None: a peer
    that is not the PACS, an instance over the size cap, a UID that is not a DICOM UID, an
    instance of another study/series, or (with a SOP list) one that was not requested."""
    why = peer_refusal(policy, offer.peer_host, offer.peer_ae)
    if why:
        return REJECTED_PEER, why
    if offer.size > policy.max_bytes:
        return TOO_LARGE, (f"{offer.size} bytes, more than the {policy.max_bytes // MIB} MB "
                           "allowed (raise [pacs] max_instance_mb if it is expected)")
    for field, uid in (("StudyInstanceUID", offer.study_uid),
                       ("SeriesInstanceUID", offer.series_uid),
                       ("SOPInstanceUID", offer.sop_uid)):
        if not valid_uid(uid):
            return BAD_UID, uid_problem(uid, field)
    if offer.series_uid != policy.series_uid or offer.study_uid != policy.study_uid:
        return REJECTED_SERIES, (f"instance of series {offer.series_uid} while series "
                                 f"{policy.series_uid} is retrieved")
    if policy.sop_uids is not None and offer.sop_uid not in policy.sop_uids:
        return REJECTED_SERIES, "instance not among those requested"
    return None


def resolve_hosts(host: str, port: int) -> frozenset[str]:
    """The addresses ``host`` resolves to (normalised), or a PacsError naming the fix."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise PacsError(f"PACS host {host!r} does not resolve ({exc}). Fix: set [pacs] host "
                        "to the PACS' name or address") from exc
    return frozenset(normalise_ip(str(info[4][0])) for info in infos)


def listen_address(hosts: frozenset[str], port: int) -> str:
    """The local address of the interface that routes to the PACS (127.0.0.1 for a
    loopback PACS), so that the C-MOVE storage SCP is reachable from there only; all
    interfaces ("0.0.0.0" / "::") only when the route cannot be found."""
    ordered = sorted(hosts, key=lambda h: (":" in h, h))  # IPv4 first
    for host in ordered:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((host, port))  # UDP: picks the route, sends nothing
                return normalise_ip(str(probe.getsockname()[0]))
        except OSError:
            continue
    fallback = "::" if ordered and ":" in ordered[0] else "0.0.0.0"
    log.warning("no route to the PACS %s: the C-MOVE storage SCP listens on all interfaces "
                "(it still accepts only the PACS)", ", ".join(ordered))
    return fallback


# --------------------------------------------------------------------------- DIMSE
def _study_query(query: CohortQuery, uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    ds.StudyDate = query.date_range()
    ds.StudyDescription = query.study_description
    ds.ModalitiesInStudy = ""
    return ds


def _series_query(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.SeriesDescription = ""
    return ds


def _image_query(s: SeriesRef, sop_uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = s.study_uid
    ds.SeriesInstanceUID = s.series_uid
    ds.SOPInstanceUID = sop_uid
    return ds


def _series_level(s: SeriesRef) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = s.study_uid
    ds.SeriesInstanceUID = s.series_uid
    return ds


class DimseTransport:
    """C-FIND + C-GET or C-MOVE against a PACS with pynetdicom (Study Root model)."""

    def __init__(self, cfg: PacsConfig) -> None:
        self.cfg = cfg

    def new_ae(self) -> AE:
        """An AE with this site's calling AE title and the configured timeouts."""
        ae = AE(ae_title=self.cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout_s
        ae.connection_timeout = min(self.cfg.timeout_s, 10.0)
        return ae

    @contextmanager
    def associate(self, ae: AE, **kw: Any) -> Iterator[Association]:
        """An association with the PACS (released on exit), or a PacsError naming the fix."""
        assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.called_ae, **kw)
        if not assoc.is_established:
            why = ("rejected by the PACS" if assoc.is_rejected else
                   "not established (connection refused, timed out or aborted)")
            raise PacsError(f"PACS {self.cfg.describe()}: association {why}. Fix: check "
                            "[pacs] host, port, called_ae/calling_ae, and that the PACS is "
                            "running and knows this site's AE title")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _find(self, queries: list[Dataset]) -> list[Dataset]:
        ae = self.new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        out: list[Dataset] = []
        with self.associate(ae) as assoc:
            for q in queries:
                for status, ident in assoc.send_c_find(
                        q, StudyRootQueryRetrieveInformationModelFind):
                    if not status:
                        raise PacsError(f"PACS {self.cfg.describe()}: C-FIND got no response "
                                        f"within {self.cfg.timeout_s:.0f}s. Fix: raise "
                                        "[pacs] timeout_s or check the PACS load")
                    if status.Status in PENDING and ident is not None:
                        out.append(ident)
                    elif status.Status not in PENDING and status.Status != 0x0000:
                        raise PacsError(f"PACS {self.cfg.describe()}: C-FIND failed with "
                                        f"status 0x{status.Status:04X}. Fix: check that the "
                                        "PACS allows queries from this AE title")
        return out

    def find_series(self, query: CohortQuery, *,
                    refuse: Refuse = log_refusal) -> list[SeriesRef]:
        study_qs = ([_study_query(query, u) for u in query.study_uids] if query.study_uids
                    else [_study_query(query)])
        studies = self._find(study_qs)
        uids = set()
        for st in studies:
            uid = header_uid(st, "StudyInstanceUID") or ""
            if valid_uid(uid):
                uids.add(uid)
            else:  # never put it into a series query (an empty one would match everything)
                refuse(Refusal(BAD_UID, shown(uid), uid_problem(uid, "StudyInstanceUID") +
                               " in the PACS' C-FIND answer; its series were not queried"))
        series = self._find([_series_query(u) for u in sorted(uids)])
        refs = [SeriesRef(header_uid(s, "StudyInstanceUID") or "",
                          header_uid(s, "SeriesInstanceUID") or "",
                          str(s.get("Modality", "")), str(s.get("SeriesDescription", "")))
                for s in series]
        return sorted((r for r in refs if series_matches(query, r)),
                      key=lambda r: (r.study_uid, r.series_uid))

    def find_instances(self, series: SeriesRef) -> list[str]:
        return sorted(header_uid(d, "SOPInstanceUID") or ""
                      for d in self._find([_image_query(series)]))

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                 refuse: Refuse = log_refusal) -> int:
        _check_request_uids(self.cfg, series, sop_uids)
        policy = StorePolicy(series.study_uid, series.series_uid,
                             None if sop_uids is None else frozenset(sop_uids),
                             self.cfg.max_instance_bytes)
        if self.cfg.method == "c-move":
            return self._move(series, sop_uids, sink, policy, refuse)
        return self._get(series, sop_uids, sink, policy, refuse)

    def _requests(self, series: SeriesRef, sop_uids: list[str] | None) -> list[Dataset]:
        return ([_series_level(series)] if sop_uids is None
                else [_image_query(series, u) for u in sop_uids])

    def _check(self, status: Dataset | None, what: str) -> None:
        if not status:
            raise PacsError(f"PACS {self.cfg.describe()}: {what} got no response within "
                            f"{self.cfg.timeout_s:.0f}s. Fix: raise [pacs] timeout_s")
        if status.Status not in PENDING and status.Status not in (0x0000, 0xB000):
            raise PacsError(f"PACS {self.cfg.describe()}: {what} failed with status "
                            f"0x{status.Status:04X}. Fix: check the PACS allows retrieval "
                            "by this AE title (and, for C-MOVE, knows the destination)")

    def _get(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink,
             policy: StorePolicy, refuse: Refuse) -> int:
        ae = self.new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for uid in GET_STORAGE_CLASSES:
            ae.add_requested_context(uid, TRANSFER_SYNTAXES)
        roles = [build_role(uid, scp_role=True) for uid in GET_STORAGE_CLASSES]
        received = _Receiver(sink, policy, refuse)  # our own association: no peer check
        with self.associate(ae, ext_neg=roles,
                            evt_handlers=[(evt.EVT_C_STORE, received.handle)]) as assoc:
            for req in self._requests(series, sop_uids):
                for status, _ in assoc.send_c_get(req, StudyRootQueryRetrieveInformationModelGet):
                    self._check(status, "C-GET")
        return received.count

    def _move(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink,
              policy: StorePolicy, refuse: Refuse) -> int:
        """C-MOVE to this site's own storage SCP, which listens only for this request."""
        dest = self.cfg.move_destination or self.cfg.calling_ae
        hosts = resolve_hosts(self.cfg.host, self.cfg.port)
        policy = replace(policy, peer_hosts=hosts,
                         peer_aes=frozenset({self.cfg.move_source_ae or self.cfg.called_ae}))
        scp_ae = AE(ae_title=dest)
        scp_ae.acse_timeout = scp_ae.dimse_timeout = scp_ae.network_timeout = self.cfg.timeout_s
        scp_ae.require_called_aet = True
        for uid in GET_STORAGE_CLASSES:  # the image classes a site ingests, as with C-GET
            scp_ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        received = _Receiver(sink, policy, refuse)
        address = (listen_address(hosts, self.cfg.port), self.cfg.storage_port)
        try:
            server = scp_ae.make_server(
                address, server_class=_PeerCheckedServer, allow_host=received.allow_host,
                evt_handlers=[(evt.EVT_C_STORE, received.handle),
                              (evt.EVT_REQUESTED, received.on_requested),
                              (evt.EVT_DATA_RECV, received.on_data)])
        except OSError as exc:
            raise PacsError(f"cannot listen for C-MOVE on {address[0]} port "
                            f"{self.cfg.storage_port} ({exc.strerror}). Fix: set [pacs] "
                            "storage_port to a free port registered at the PACS for this "
                            "site's AE") from exc
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                  name="fedpacs-move-scp", daemon=True)
        thread.start()
        try:
            ae = self.new_ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self.associate(ae) as assoc:
                for req in self._requests(series, sop_uids):
                    for status, _ in assoc.send_c_move(
                            req, dest, StudyRootQueryRetrieveInformationModelMove):
                        self._check(status, "C-MOVE")
        finally:
            server.shutdown()  # no new connections; then none left open either
            for assoc in server.active_associations:
                assoc.abort()
            thread.join(timeout=self.cfg.timeout_s)
        return received.count


def _check_request_uids(cfg: PacsConfig, series: SeriesRef, sop_uids: list[str] | None
                        ) -> None:
    """Never ask for (or build a URL of) something that is not a DICOM UID."""
    for field, uid in (("StudyInstanceUID", series.study_uid),
                       ("SeriesInstanceUID", series.series_uid),
                       *(("SOPInstanceUID", u) for u in sop_uids or ())):
        if not valid_uid(uid):
            raise PacsError(f"PACS {cfg.describe()}: refusing to request "
                            f"{uid_problem(uid, field)}. Fix: report this PACS answer; the "
                            "ingest skips such UIDs")


class _PeerCheckedServer(ThreadedAssociationServer):
    """pynetdicom's association server, closing connections from any address but the
    PACS' before a byte is read (``socketserver``'s ``verify_request``)."""

    def __init__(self, *args: Any, allow_host: Callable[[str], bool], **kw: Any) -> None:
        self._allow_host = allow_host
        super().__init__(*args, **kw)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._allow_host(str(client_address[0]))

    def shutdown(self) -> None:  # not started by AE.start_server: not in the AE's list
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _Receiver:
    """C-STORE handler: checks each received instance against a :class:`StorePolicy`
    (:func:`store_refusal`) and hands what passes (as Part-10 bytes) to the sink; the rest
    goes to ``refuse`` with its reason code and is answered with a failure status. With
    peer checks (C-MOVE) it also refuses connections and associations of other peers and
    aborts an association that sends more than one instance's worth of bytes."""

    def __init__(self, sink: Sink, policy: StorePolicy, refuse: Refuse) -> None:
        self.sink = sink
        self.policy = policy
        self.refuse = refuse
        self.count = 0
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # association -> bytes since its last C-STORE

    def allow_host(self, host: str) -> bool:
        why = peer_refusal(replace(self.policy, peer_aes=frozenset()), host, "")
        if why:
            self.refuse(Refusal(REJECTED_PEER, f"peer {shown(host)}",
                                f"connection closed: {why}"))
        return why is None

    def on_requested(self, event: Any) -> None:
        """A-ASSOCIATE-RQ: reject a calling AE title (or address) that is not the PACS'."""
        assoc = event.assoc
        host = str(assoc.requestor.address)
        ae = str(assoc.requestor.primitive.calling_ae_title)
        why = peer_refusal(self.policy, host, ae)
        if why:
            self.refuse(Refusal(REJECTED_PEER, f"peer {shown(host)} AE {shown(ae.strip())}",
                                f"association rejected: {why}"))
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent: calling AE not recognised
            assoc.kill()

    def on_data(self, event: Any) -> None:
        """Bytes received: abort an association past one instance (plus slack) unanswered."""
        key = id(event.assoc)
        with self._lock:
            total = self._inflight.get(key, 0) + len(event.data)
            self._inflight[key] = total
        limit = self.policy.max_bytes + WIRE_SLACK
        if total > limit >= total - len(event.data):  # once, when the limit is crossed
            peer = shown(str(event.assoc.requestor.address))
            self.refuse(Refusal(TOO_LARGE, f"{self.policy.series_uid} from {peer}",
                                f"more than {self.policy.max_bytes // MIB} MB in one "
                                "instance: association aborted (raise [pacs] max_instance_mb "
                                "if such instances are expected)"))
            event.assoc.abort(block=False)

    def handle(self, event: Any) -> int:
        with self._lock:
            self._inflight[id(event.assoc)] = 0
        requestor = event.assoc.requestor
        size = event.request.DataSet.getbuffer().nbytes
        announced = str(event.request.AffectedSOPInstanceUID)
        item = f"{self.policy.series_uid}/{shown(announced)}"
        sop = announced if valid_uid(announced) else ""
        header = None
        if size <= self.policy.max_bytes:
            try:
                header = pydicom.dcmread(io.BytesIO(event.encoded_dataset()),
                                         stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, KeyError,
                    AttributeError) as exc:
                self.refuse(Refusal(UNREADABLE, item,
                                    f"unreadable header ({type(exc).__name__})", sop))
                return STATUS_CANNOT_UNDERSTAND
        study, series, sop = (("", "", "") if header is None else
                              (header_uid(header, k) or "" for k in UID_KEYWORDS))
        offer = StoreOffer(str(requestor.address), str(requestor.ae_title), size,
                           study, series, sop)
        refusal = store_refusal(self.policy, offer)
        if refusal is None and offer.sop_uid != str(event.request.AffectedSOPInstanceUID):
            refusal = BAD_UID, "SOP Instance UID differs from the C-STORE's"
        if refusal is not None:
            kind, why = refusal
            self.refuse(Refusal(kind, item, why, sop))
            return {REJECTED_PEER: STATUS_REFUSED, REJECTED_SERIES: STATUS_REFUSED,
                    TOO_LARGE: STATUS_OUT_OF_RESOURCES}.get(kind, STATUS_CANNOT_UNDERSTAND)
        try:
            self.sink(event.encoded_dataset(), offer.sop_uid)
        except (OSError, ValueError) as exc:
            log.error("could not store received instance: %s", exc)
            return STATUS_OUT_OF_RESOURCES  # the PACS will report the failure
        with self._lock:
            self.count += 1
        return 0x0000


# --------------------------------------------------------------------------- DICOMweb
class DicomWebTransport:
    """QIDO-RS queries and WADO-RS instance retrieval over HTTP(S)."""

    def __init__(self, cfg: PacsConfig) -> None:
        err = dicomweb_url_error(cfg.method, cfg.dicomweb_url)
        if err is not None:
            raise ConfigError("[pacs]", [err])
        self.cfg = cfg
        self.base = cfg.dicomweb_url.rstrip("/")

    def _url(self, *parts: str) -> str:
        """``studies/<uid>/series/<uid>/...``: each UID checked, then quoted anyway."""
        out = []
        for i, part in enumerate(parts):
            if i % 2 and not valid_uid(part):
                raise PacsError(f"PACS {self.cfg.describe()}: refusing to put "
                                f"{uid_problem(part, parts[i - 1])} into a URL. Fix: report "
                                "this PACS answer; the ingest skips such UIDs")
            out.append(urllib.parse.quote(part, safe=""))
        return "/".join(out)

    def _get(self, path: str, params: dict[str, str] | None = None,
             accept: str = "application/dicom+json",
             limit: int | None = None) -> tuple[bytes, str]:
        q = {k: v for k, v in (params or {}).items() if v}
        url = f"{self.base}/{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        req = urllib.request.Request(url, headers={"Accept": accept})
        cap = self.cfg.max_instance_bytes + WIRE_SLACK if limit is None else limit
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                body = read_capped(resp, cap, f"PACS {self.cfg.describe()}: GET {path}")
                return body, resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise PacsError(f"PACS {self.cfg.describe()}: GET {path} answered HTTP "
                            f"{exc.code}. Fix: check [pacs] dicomweb_url and access rights"
                            ) from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise PacsError(f"PACS {self.cfg.describe()}: unreachable ({exc}). Fix: check "
                            "[pacs] dicomweb_url and that the PACS is running") from exc

    def _json(self, path: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
        body, _ = self._get(path, params)
        try:
            items = json.loads(body or b"[]")
        except ValueError as exc:
            raise PacsError(f"PACS {self.cfg.describe()}: GET {path} answered no DICOM JSON "
                            f"({type(exc).__name__}). Fix: check [pacs] dicomweb_url") from exc
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise PacsError(f"PACS {self.cfg.describe()}: GET {path} answered JSON that is "
                            "not a list of DICOM datasets. Fix: check [pacs] dicomweb_url")
        return items

    @staticmethod
    def _val(item: dict[str, Any], tag: str) -> str:
        element = item.get(tag)
        v = element.get("Value", [""]) if isinstance(element, dict) else [""]
        return str(v[0]) if isinstance(v, list) and v else ""

    def find_series(self, query: CohortQuery, *,
                    refuse: Refuse = log_refusal) -> list[SeriesRef]:
        params = {"StudyDate": query.date_range(), "StudyDescription": query.study_description}
        studies = ([{"0020000D": {"Value": [u]}} for u in query.study_uids] if query.study_uids
                   else self._json("studies", params))
        refs = []
        for st in studies:
            suid = self._val(st, "0020000D")
            if not valid_uid(suid):  # never into a URL
                refuse(Refusal(BAD_UID, shown(suid), uid_problem(suid, "StudyInstanceUID") +
                               " in the PACS' QIDO answer; its series were not queried"))
                continue
            for se in self._json(self._url("studies", suid, "series")):
                refs.append(SeriesRef(suid, self._val(se, "0020000E"), self._val(se, "00080060"),
                                      self._val(se, "0008103E")))
        return sorted((r for r in refs if series_matches(query, r)),
                      key=lambda r: (r.study_uid, r.series_uid))

    def find_instances(self, series: SeriesRef) -> list[str]:
        items = self._json(self._url("studies", series.study_uid, "series", series.series_uid,
                                     "instances"))
        return sorted(self._val(i, "00080018") for i in items)

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                 refuse: Refuse = log_refusal) -> int:
        uids = sop_uids if sop_uids is not None else self.find_instances(series)
        n = 0
        for uid in uids:
            if not valid_uid(uid):
                refuse(Refusal(BAD_UID, f"{series.series_uid}/{shown(uid)}",
                               uid_problem(uid, "SOPInstanceUID") + ": not requested"))
                continue
            try:
                body, ctype = self._get(
                    self._url("studies", series.study_uid, "series", series.series_uid,
                              "instances", uid),
                    accept='multipart/related; type="application/dicom"')
            except ResponseTooLarge as exc:
                refuse(Refusal(TOO_LARGE, f"{series.series_uid}/{uid}", str(exc), uid))
                continue
            for part in split_multipart(body, ctype):
                sink(part, uid)
                n += 1
        return n


class ResponseTooLarge(PacsError):
    """A DICOMweb response over the site's cap (read no further than the cap)."""


def read_capped(resp: Any, limit: int, what: str, chunk: int = MIB) -> bytes:
    """At most ``limit`` bytes of an HTTP response body (DICOMweb answers are read with
    ``max_instance_mb`` plus :data:`WIRE_SLACK`), or ResponseTooLarge: refused at
    once when Content-Length says more, else as soon as more than ``limit`` arrived (an
    endless body is never read past the cap)."""
    declared = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ResponseTooLarge(f"{what}: the response announces {int(declared)} bytes, more "
                               f"than the {limit} bytes allowed. Fix: raise [pacs] "
                               "max_instance_mb if such instances are expected")
    parts: list[bytes] = []
    total = 0
    while True:
        piece = resp.read(min(chunk, limit + 1 - total))
        if not piece:
            return b"".join(parts)
        parts.append(piece)
        total += len(piece)
        if total > limit:
            raise ResponseTooLarge(f"{what}: the response is larger than the {limit} bytes "
                                   "allowed (read stopped there). Fix: raise [pacs] "
                                   "max_instance_mb if such instances are expected")


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """Bodies of a multipart/related response (WADO-RS), or the body if not multipart."""
    if "multipart" not in content_type.lower():
        return [body]
    boundary = ""
    for piece in content_type.split(";"):
        k, _, v = piece.strip().partition("=")
        if k.lower() == "boundary":
            boundary = v.strip().strip('"')
    if not boundary:
        raise PacsError(f"multipart response without boundary ({content_type!r})")
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, rest = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(rest[:-2] if rest.endswith(b"\r\n") else rest)
    return parts


def make_transport(cfg: PacsConfig) -> Transport:
    return DicomWebTransport(cfg) if cfg.method == "dicomweb" else DimseTransport(cfg)
