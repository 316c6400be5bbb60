"""Query/retrieve from a hospital PACS: DIMSE (C-FIND + C-GET or C-MOVE, pynetdicom) or
DICOMweb (QIDO-RS + WADO-RS). Transports share one small interface so the ingest logic is
the same whatever the PACS speaks, and tests can inject a fake.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeGuard

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
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


class Transport(Protocol):
    def find_series(self, query: CohortQuery) -> list[SeriesRef]: ...

    def find_instances(self, series: SeriesRef) -> list[str]: ...

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink) -> int: ...


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

    def find_series(self, query: CohortQuery) -> list[SeriesRef]:
        study_qs = ([_study_query(query, u) for u in query.study_uids] if query.study_uids
                    else [_study_query(query)])
        studies = self._find(study_qs)
        uids = sorted({str(s.StudyInstanceUID) for s in studies})
        series = self._find([_series_query(u) for u in uids])
        refs = [SeriesRef(str(s.StudyInstanceUID), str(s.SeriesInstanceUID),
                          str(s.get("Modality", "")), str(s.get("SeriesDescription", "")))
                for s in series]
        return sorted((r for r in refs if series_matches(query, r)),
                      key=lambda r: (r.study_uid, r.series_uid))

    def find_instances(self, series: SeriesRef) -> list[str]:
        return sorted(str(d.SOPInstanceUID) for d in self._find([_image_query(series)]))

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink) -> int:
        if self.cfg.method == "c-move":
            return self._move(series, sop_uids, sink)
        return self._get(series, sop_uids, sink)

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

    def _get(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink) -> int:
        ae = self.new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for uid in GET_STORAGE_CLASSES:
            ae.add_requested_context(uid, TRANSFER_SYNTAXES)
        roles = [build_role(uid, scp_role=True) for uid in GET_STORAGE_CLASSES]
        received = _Receiver(sink)
        with self.associate(ae, ext_neg=roles,
                            evt_handlers=[(evt.EVT_C_STORE, received.handle)]) as assoc:
            for req in self._requests(series, sop_uids):
                for status, _ in assoc.send_c_get(req, StudyRootQueryRetrieveInformationModelGet):
                    self._check(status, "C-GET")
        return received.count

    def _move(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink) -> int:
        dest = self.cfg.move_destination or self.cfg.calling_ae
        scp_ae = AE(ae_title=dest)
        scp_ae.network_timeout = self.cfg.timeout_s
        for cx in StoragePresentationContexts:
            if cx.abstract_syntax:
                scp_ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        received = _Receiver(sink)
        try:
            server = scp_ae.start_server(("127.0.0.1" if self.cfg.host in ("127.0.0.1", "localhost")
                                          else "0.0.0.0", self.cfg.storage_port), block=False,
                                         evt_handlers=[(evt.EVT_C_STORE, received.handle)])
        except OSError as exc:
            raise PacsError(f"cannot listen for C-MOVE on port {self.cfg.storage_port} "
                            f"({exc.strerror}). Fix: set [pacs] storage_port to a free port "
                            "registered at the PACS for this site's AE") from exc
        assert server is not None  # block=False returns the running server
        try:
            ae = self.new_ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self.associate(ae) as assoc:
                for req in self._requests(series, sop_uids):
                    for status, _ in assoc.send_c_move(
                            req, dest, StudyRootQueryRetrieveInformationModelMove):
                        self._check(status, "C-MOVE")
        finally:
            server.shutdown()
        return received.count


class _Receiver:
    """C-STORE handler: hands each received instance (as Part-10 bytes) to the sink."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.count = 0

    def handle(self, event: Any) -> int:
        try:
            data = event.encoded_dataset()
            sop = str(event.request.AffectedSOPInstanceUID)
            self.sink(data, sop)
        except (OSError, ValueError) as exc:
            log.error("could not store received instance: %s", exc)
            return 0xA700  # out of resources: the PACS will report the failure
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

    def _get(self, path: str, params: dict[str, str] | None = None,
             accept: str = "application/dicom+json") -> tuple[bytes, str]:
        q = {k: v for k, v in (params or {}).items() if v}
        url = f"{self.base}/{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        req = urllib.request.Request(url, headers={"Accept": accept})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                return resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise PacsError(f"PACS {self.cfg.describe()}: GET {path} answered HTTP "
                            f"{exc.code}. Fix: check [pacs] dicomweb_url and access rights"
                            ) from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise PacsError(f"PACS {self.cfg.describe()}: unreachable ({exc}). Fix: check "
                            "[pacs] dicomweb_url and that the PACS is running") from exc

    def _json(self, path: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
        body, _ = self._get(path, params)
        return list(json.loads(body or b"[]"))

    @staticmethod
    def _val(item: dict[str, Any], tag: str) -> str:
        v = item.get(tag, {}).get("Value", [""])
        return str(v[0]) if v else ""

    def find_series(self, query: CohortQuery) -> list[SeriesRef]:
        params = {"StudyDate": query.date_range(), "StudyDescription": query.study_description}
        studies = ([{"0020000D": {"Value": [u]}} for u in query.study_uids] if query.study_uids
                   else self._json("studies", params))
        refs = []
        for st in studies:
            suid = self._val(st, "0020000D")
            for se in self._json(f"studies/{suid}/series"):
                refs.append(SeriesRef(suid, self._val(se, "0020000E"), self._val(se, "00080060"),
                                      self._val(se, "0008103E")))
        return sorted((r for r in refs if series_matches(query, r)),
                      key=lambda r: (r.study_uid, r.series_uid))

    def find_instances(self, series: SeriesRef) -> list[str]:
        items = self._json(f"studies/{series.study_uid}/series/{series.series_uid}/instances")
        return sorted(self._val(i, "00080018") for i in items)

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink) -> int:
        uids = sop_uids if sop_uids is not None else self.find_instances(series)
        n = 0
        for uid in uids:
            body, ctype = self._get(
                f"studies/{series.study_uid}/series/{series.series_uid}/instances/{uid}",
                accept='multipart/related; type="application/dicom"')
            for part in split_multipart(body, ctype):
                sink(part, uid)
                n += 1
        return n


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
