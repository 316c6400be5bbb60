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

The [cohort] patterns are matched here, one way for every PACS (:func:`pattern_matches`:
case-insensitive, whole value, ``*`` and ``?``); the PACS is asked only for what narrows
safely (dates, study UIDs, a plain modality code). :func:`find_cohort` counts what the PACS
found and what each pattern removed, and reads a value the PACS does not answer from an
instance-level answer or the first instance's header rather than dropping the series.
A refusal (association, presentation context, a DIMSE failure status) is named with the
fix (:func:`dimse_status`); one that every further request would meet is a
:class:`PacsRefused`.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeGuard

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
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
    LABEL_KINDS,
    LABEL_MODALITIES,
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
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
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
# an association closed without an answer within this many seconds is tried again, at
# most QUICK_DROP_TRIES times in all (a refused or timed-out one is not: that answer stands)
QUICK_DROP_S = 2.0
QUICK_DROP_TRIES = 3
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


class PacsRefused(PacsError):
    """The PACS refused this site's association or a request in a way every further request
    would meet too (association or presentation context rejected, move destination unknown,
    not authorised): the ingest stops asking and exits with ``ExitCode.PACS``."""


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


def label_kinds(value: object, *, field: str = "cohort.labels"
                ) -> tuple[tuple[str, ...], FieldError | None]:
    """The label series kinds of ``[cohort] labels`` ("seg", "rtstruct", "seg,rtstruct" or
    a list of them; "" or "none": none), or () and the FieldError naming the fix."""
    if isinstance(value, str):
        parts = [p.strip().lower() for p in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = [str(v).strip().lower() for v in value]
    else:
        parts = [repr(value)]
    parts = [p for p in parts if p and p != "none"]
    bad = [p for p in parts if p not in LABEL_KINDS]
    if bad:
        hint = did_you_mean(bad[0], LABEL_KINDS)
        return (), FieldError(field, f"label series kinds: {', '.join(LABEL_KINDS)} (comma "
                              'separated, or "none")', f"{bad[0]!r}{hint}",
                              'e.g. labels = "seg" (DICOM SEG of the image series), or remove '
                              "the key to ingest image series only")
    return tuple(dict.fromkeys(parts)), None


@dataclass(frozen=True)
class CohortQuery:
    """Which studies/series to ingest. Empty fields do not filter.

    ``modality``, ``study_description`` and ``series_description`` are patterns (``*`` any
    characters, ``?`` one, everything else literal) matched by this site, case-insensitively,
    against the whole value (:func:`pattern_matches`), whatever the PACS. The PACS is asked
    only for what narrows safely: the date range, the study UIDs and, for a modality without
    wildcards, ModalitiesInStudy (exact codes).

    ``labels``: the kinds of label series (``seg``, ``rtstruct``) also ingested from the
    cohort's studies and turned into label maps of the image series they reference
    (fedpacs.client.seglabels); the series-level patterns (modality, series description)
    select image series and never remove such a label series. ``label_classes``: the site
    task's class names, which segment labels / ROI names are matched against (set from the
    site's task, not a [cohort] key; empty: segment numbers are the classes)."""

    modality: str = ""
    study_description: str = ""
    series_description: str = ""
    date_from: str = ""  # YYYYMMDD
    date_to: str = ""
    study_uids: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    label_classes: tuple[str, ...] = ()

    def label_series(self, modality: str) -> bool:
        """A series of this Modality is a label series the [cohort] asks for."""
        return LABEL_MODALITIES.get(modality.strip().upper(), "") in self.labels

    def date_range(self) -> str:
        return f"{self.date_from}-{self.date_to}" if self.date_from or self.date_to else ""

    def pacs_modality(self) -> str:
        """ModalitiesInStudy to ask the PACS for: the modality as a code (upper case) when
        it is a plain code, else "" (a pattern is matched here only)."""
        code = self.modality.strip().upper()
        return code if _CS_CODE.fullmatch(code) else ""

    def asked(self) -> str:
        """What the PACS itself is asked to match (for the ingest summary)."""
        parts = [f"StudyDate {self.date_range()}"] if self.date_range() else []
        if self.pacs_modality():
            parts.append(f"ModalitiesInStudy {self.pacs_modality()}")
        if self.study_uids:
            parts.append(f"{len(self.study_uids)} StudyInstanceUID(s)")
        return ", ".join(parts) or "every study"


_CS_CODE = re.compile(r"[A-Z0-9_]{1,16}")


@dataclass(frozen=True)
class SeriesRef:
    study_uid: str
    series_uid: str
    modality: str = ""
    series_description: str = ""
    study_description: str = ""


def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in pattern.strip()), re.IGNORECASE | re.DOTALL)


def pattern_matches(pattern: str, value: str) -> bool:
    """The one [cohort] matching rule: an empty pattern matches anything; otherwise the
    whole value (surrounding spaces ignored; for a multi-valued one such as
    ModalitiesInStudy ``CT\\SR``, any of its values) matches ``pattern`` case-insensitively,
    ``*`` standing for any characters and ``?`` for one (``[`` and the rest are literal)."""
    if not pattern.strip():
        return True
    regex = _wildcard_regex(pattern)
    return any(regex.fullmatch(v.strip()) for v in value.split("\\"))


@dataclass(frozen=True)
class CohortFilter:
    """One [cohort] pattern: its key, the DICOM attribute it is matched against (for a
    series; ``study_keyword`` at study level, "" when a study answer cannot decide it)."""

    key: str
    keyword: str
    study_keyword: str
    pattern: str


FILTER_KEYWORDS = ("Modality", "StudyDescription", "SeriesDescription")


def cohort_filters(query: CohortQuery) -> tuple[CohortFilter, ...]:
    """The patterns ``query`` sets, in the order they are applied."""
    return tuple(f for f in (
        CohortFilter("modality", "Modality", "ModalitiesInStudy", query.modality),
        CohortFilter("study_description", "StudyDescription", "StudyDescription",
                     query.study_description),
        CohortFilter("series_description", "SeriesDescription", "", query.series_description),
    ) if f.pattern.strip())


def series_matches(query: CohortQuery, s: SeriesRef) -> bool:
    """Whether a series' modality and description match the series-level patterns (a
    label series the [cohort] asks for always does)."""
    return query.label_series(s.modality) or (pattern_matches(query.modality, s.modality)
                                               and pattern_matches(query.series_description,
                                                                   s.series_description))



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
    """What the ingest asks of a PACS. ``find_series``: the series of the cohort, as a
    :class:`Cohort` (with what the PACS found and what each pattern removed: the real
    transports, through :func:`find_cohort`) or just the series (a fake that filters
    itself)."""

    def find_series(self, query: CohortQuery, *,
                    refuse: Refuse = log_refusal) -> Cohort | Sequence[SeriesRef]: ...

    def find_instances(self, series: SeriesRef) -> list[str]: ...

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                 refuse: Refuse = log_refusal) -> int: ...


Answer = dict[str, str]  # keyword -> value, for the values a PACS answered (UIDs always)


def failing_filter(filters: tuple[CohortFilter, ...], answer: Answer, *, study: bool = False,
                   final: bool = False) -> tuple[CohortFilter | None, tuple[CohortFilter, ...]]:
    """(the first filter whose answered value does not match, the filters ``answer`` leaves
    undecided). An empty or missing value decides nothing (a PACS may not answer a key),
    unless ``final`` (the values are from the instance's own header: empty is empty). At
    study level (``study``) a ModalitiesInStudy can only rule a study out (its series are
    still matched one by one) and a series description decides nothing."""
    open_: list[CohortFilter] = []
    for f in filters:
        keyword = f.study_keyword if study else f.keyword
        value = answer.get(keyword, "").strip() if keyword else ""
        if not value and not final:
            open_.append(f)
        elif not pattern_matches(f.pattern, value):
            return f, ()
        elif study and keyword == "ModalitiesInStudy":
            open_.append(f)
    return None, tuple(open_)


@dataclass
class Removal:
    """What one [cohort] pattern removed: studies (decided by a study-level answer) and
    series, with a few of the values it did not match (site-local: for the summary)."""

    key: str
    pattern: str
    studies: int = 0
    series: int = 0
    seen: tuple[str, ...] = ()

    def add(self, value: str, *, study: bool) -> None:
        if study:
            self.studies += 1
        else:
            self.series += 1
        if len(self.seen) < 5 and value not in self.seen:
            self.seen += (value,)

    def line(self) -> str:
        seen = f" (values not matched: {', '.join(repr(shown(v)) for v in self.seen)})" \
            if self.seen else ""
        return (f"[cohort] {self.key} = {self.pattern!r} removed {self.studies} study(ies) "
                f"and {self.series} series{seen}")


@dataclass(frozen=True)
class Cohort:
    """What a cohort query found: the series in the cohort, what the PACS was asked and
    answered (studies, and series of the studies still in the cohort), what each pattern
    removed, and how many series' values had to be read from an instance header."""

    series: tuple[SeriesRef, ...] = ()
    asked: str = ""
    studies_found: int = 0
    series_found: int = 0
    removed: tuple[Removal, ...] = ()
    header_reads: int = 0

    @classmethod
    def of(cls, series: Sequence[SeriesRef]) -> Cohort:
        """The series of a transport that filters itself (a fake): nothing removed here."""
        return cls(tuple(series), "", len({s.study_uid for s in series}), len(series))

    def nothing_left(self) -> str:
        """Why the cohort is empty, and the fix ("" when it is not)."""
        if self.series:
            return ""
        if not self.studies_found:
            return (f"the PACS found no study for {self.asked or 'the query'}. Fix: check "
                    "[cohort] date_from, date_to, modality and study_uids, and that [pacs] "
                    "names the PACS that holds the studies")
        culprits = [r for r in self.removed if r.studies or r.series]
        named = ", ".join(f"{r.key} = {r.pattern!r}" for r in culprits) or "the [cohort] patterns"
        return (f"the PACS found {self.studies_found} study(ies) ({self.series_found} series "
                f"asked for), and {named} removed them all. Fix: widen or clear the "
                "pattern(s) named (matched here, case-insensitively, against the whole value: "
                "* any characters, ? one); the values not matched are listed above")


def as_cohort(found: Cohort | Sequence[SeriesRef]) -> Cohort:
    return found if isinstance(found, Cohort) else Cohort.of(found)


class QueryAnswers(Protocol):
    """The answers :func:`find_cohort` asks a transport for (only values the PACS gave)."""

    def study_answers(self, query: CohortQuery) -> list[Answer]: ...

    def series_answers(self, study_uids: list[str]) -> list[Answer]: ...

    def instance_answers(self, series: SeriesRef) -> list[Answer]: ...

    def find_instances(self, series: SeriesRef) -> list[str]: ...

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                 refuse: Refuse = log_refusal) -> int: ...


# Reason code of a series whose [cohort] values neither the PACS' answers nor its first
# instance's header gave (it is left out of the cohort, reported as a skip).
UNRESOLVED = "unresolved"


def find_cohort(pacs: QueryAnswers, query: CohortQuery, *,
                refuse: Refuse = log_refusal) -> Cohort:
    """Studies and series the PACS answers for ``query``'s PACS-side keys, matched here
    against every [cohort] pattern (:func:`pattern_matches`), each removal counted.

    A study whose answer already fails a pattern is removed before its series are asked
    for. A value the PACS does not answer (``dcmqrscp`` leaves SeriesDescription out of its
    series answers) is never taken for a mismatch: it is read from an instance-level answer,
    else from the header of the series' first instance (retrieved with every check of
    :meth:`Transport.retrieve`, then dropped); a series for which neither works goes to
    ``refuse`` (:data:`UNRESOLVED`) instead of silently out of the cohort."""
    filters = cohort_filters(query)
    removed = {f.key: Removal(f.key, f.pattern) for f in filters}
    studies: dict[str, Answer] = {}
    answers = pacs.study_answers(query)
    found = {st.get("StudyInstanceUID", "") for st in answers}
    for st in answers:
        uid = st.get("StudyInstanceUID", "")
        if not valid_uid(uid):  # never into a series query (an empty one matches everything)
            refuse(Refusal(BAD_UID, shown(uid), uid_problem(uid, "StudyInstanceUID") +
                           " in the PACS' answer; its series were not queried"))
            continue
        fails, _ = failing_filter(filters, st, study=True)
        if fails is not None:
            removed[fails.key].add(st.get(fails.study_keyword, ""), study=True)
        else:
            studies.setdefault(uid, st)
    series_answers = pacs.series_answers(sorted(studies))
    refs: list[SeriesRef] = []
    header_reads = 0
    for se in series_answers:
        study_uid = se.get("StudyInstanceUID", "")
        answer = {k: v for k, v in studies.get(study_uid, {}).items()
                  if k == "StudyDescription"} | se
        fails, open_ = failing_filter(filters, answer)
        ref = _series_ref(answer)
        if query.label_series(answer.get("Modality", "")):  # the patterns select images
            refs.append(ref)
            continue
        if fails is None and open_ and valid_uid(ref.study_uid) and valid_uid(ref.series_uid):
            resolved = _resolve(pacs, ref, answer, open_, refuse)
            if isinstance(resolved, str):
                refuse(Refusal(UNRESOLVED, ref.series_uid, "the PACS does not answer "
                               f"{', '.join(f.keyword for f in open_)} for this series and "
                               f"{resolved}: not in the cohort. Fix: clear those [cohort] "
                               "patterns, or check the series on the PACS"))
                continue
            answer, from_header = resolved
            header_reads += from_header
            fails, _ = failing_filter(filters, answer, final=True)
            ref = _series_ref(answer)
        if fails is not None and not query.label_series(answer.get("Modality", "")):
            removed[fails.key].add(answer.get(fails.keyword, ""), study=False)
            continue
        refs.append(ref)
    return Cohort(tuple(sorted(refs, key=lambda r: (r.study_uid, r.series_uid))),
                  query.asked(), len(found), len(series_answers), tuple(removed.values()),
                  header_reads)


def _series_ref(answer: Answer) -> SeriesRef:
    return SeriesRef(answer.get("StudyInstanceUID", ""), answer.get("SeriesInstanceUID", ""),
                     answer.get("Modality", ""), answer.get("SeriesDescription", ""),
                     answer.get("StudyDescription", ""))


def _resolve(pacs: QueryAnswers, ref: SeriesRef, answer: Answer,
             open_: tuple[CohortFilter, ...], refuse: Refuse) -> tuple[Answer, bool] | str:
    """``answer`` completed with the values of ``open_`` from an instance-level answer,
    else from the first instance's header (then True): or why neither worked."""
    wanted = {f.keyword for f in open_}
    try:
        instances = pacs.instance_answers(ref)
    except PacsRefused:
        raise
    except PacsError:  # a PACS that refuses keys it does not know: the plain UID query
        instances = [{"SOPInstanceUID": u} for u in pacs.find_instances(ref)]
    out = dict(answer)
    for inst in instances:
        for k in wanted - {k for k, v in out.items() if v.strip()}:
            if inst.get(k, "").strip():
                out[k] = inst[k]
    still = {k for k in wanted if not out.get(k, "").strip()}
    if not still:
        return out, False
    sops = sorted(u for u in (i.get("SOPInstanceUID", "") for i in instances) if valid_uid(u))
    if not sops:
        return "it lists no instance whose header could tell"
    header = _header_answer(pacs, ref, sops[0], refuse)
    if isinstance(header, str):
        return header
    return out | {k: header.get(k, "") for k in still}, True


def _header_answer(pacs: QueryAnswers, ref: SeriesRef, sop_uid: str,
                   refuse: Refuse) -> Answer | str:
    """The [cohort] values in the header of one instance, retrieved like any other (the
    storage checks apply; the pixels are not decoded, the bytes are not kept)."""
    got: list[bytes] = []

    def keep(data: bytes, sop: str) -> None:
        if sop == sop_uid and not got:
            got.append(data)

    try:
        pacs.retrieve(ref, [sop_uid], keep, refuse=refuse)
    except PacsRefused:
        raise
    except PacsError as err:
        return f"its first instance could not be retrieved ({err})"
    if not got:
        return "its first instance did not arrive"
    try:
        ds = pydicom.dcmread(io.BytesIO(got[0]), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        return f"its first instance is unreadable ({type(exc).__name__})"
    if (header_uid(ds, "SeriesInstanceUID"), header_uid(ds, "SOPInstanceUID")) != \
            (ref.series_uid, sop_uid):
        return "the instance sent is not the one asked for"
    return {k: _text(ds, k) for k in FILTER_KEYWORDS}


def _text(ds: Dataset, keyword: str) -> str:
    """A (possibly multi-valued) string element as one string ("" when absent, empty or
    undecodable)."""
    try:
        value = ds[keyword].value if keyword in ds else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()



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
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDescription", "ModalitiesInStudy")
SERIES_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription")
INSTANCE_KEYWORDS = ("SOPInstanceUID", *FILTER_KEYWORDS)
SERVICES = {"C-FIND": StudyRootQueryRetrieveInformationModelFind,
            "C-GET": StudyRootQueryRetrieveInformationModelGet,
            "C-MOVE": StudyRootQueryRetrieveInformationModelMove}


@dataclass(frozen=True)
class DimseStatus:
    """A DIMSE failure status as a person reads it: its name, the fix, and whether every
    further request would meet it too (``refused``: the ingest stops, exit code PACS).
    ``fix`` may name ``{calling}``, ``{dest}``, ``{port}`` and ``{method}`` of the config."""

    name: str
    fix: str
    refused: bool = False


_RETRY = "retry later; if it persists, ask the PACS administrator (the PACS' log names the cause)"
DIMSE_STATUSES: dict[int, DimseStatus] = {
    0x0110: DimseStatus("processing failure", _RETRY),
    0x0122: DimseStatus("SOP class not supported", "the PACS does not offer this Study Root "
                        "query/retrieve service: ask its administrator to enable it for AE "
                        "title {calling}, or set [pacs] method to another of c-get, c-move, "
                        "dicomweb", refused=True),
    0x0124: DimseStatus("refused: not authorised", "ask the PACS administrator to allow queries "
                        "and retrieves from AE title {calling} ([pacs] calling_ae)",
                        refused=True),
    0x0211: DimseStatus("unrecognised operation", "the PACS does not offer this operation to "
                        "{calling}: set [pacs] method to another of c-get, c-move, dicomweb",
                        refused=True),
    0x0213: DimseStatus("resource limitation", _RETRY),
    0xA700: DimseStatus("out of resources", "the PACS is short of memory, disk or "
                        "connections: retry later, or ingest a smaller cohort ([cohort] "
                        "date_from/date_to)"),
    0xA701: DimseStatus("out of resources: unable to calculate the number of matches",
                        "retry later, or ingest a smaller cohort ([cohort] date_from/date_to)"),
    0xA702: DimseStatus("out of resources: unable to perform sub-operations", "the PACS could "
                        "not send the instances: with c-move, check that the PACS can connect "
                        "to this host at port {port} as AE {dest} ([pacs] storage_port, "
                        "move_destination); else retry later"),
    0xA801: DimseStatus("move destination unknown", "the PACS does not know AE title {dest}: "
                        "register {dest} at the PACS with this host's address and port {port} "
                        "(Orthanc: DicomModalities; dcmqrscp: HostTable), or set [pacs] "
                        "move_destination to the AE title under which the PACS knows this "
                        "site; method c-get needs no destination", refused=True),
    0xA900: DimseStatus("identifier does not match SOP class", "the PACS refused the keys of "
                        "this site's request (a PACS with strict identifier checks): report "
                        "this with the PACS' log; method dicomweb, where the PACS offers it, "
                        "asks differently", refused=True),
    0xFE00: DimseStatus("cancelled", "the request was cancelled at the PACS: run the ingest "
                        "again"),
}


def dimse_status(code: int) -> DimseStatus:
    """The name and fix of a DIMSE failure status (PS3.4 C.4 and PS3.7 C)."""
    if code in DIMSE_STATUSES:
        return DIMSE_STATUSES[code]
    if 0xC000 <= code <= 0xCFFF:
        return DimseStatus("unable to process", _RETRY)
    if 0xA700 <= code <= 0xA7FF:
        return DIMSE_STATUSES[0xA700]
    if 0xA900 <= code <= 0xA9FF:
        return DIMSE_STATUSES[0xA900]
    return DimseStatus("a failure status this site does not know", _RETRY)


def _answer(ds: Dataset, keywords: tuple[str, ...]) -> Answer:
    """The values of ``keywords`` a C-FIND answer holds (UIDs as on the wire, always)."""
    out: Answer = {}
    for k in keywords:
        if k in UID_TAGS:
            out[k] = header_uid(ds, k) or ""
        elif value := _text(ds, k):  # empty, absent or undecodable: not answered
            out[k] = value
    return out


def _study_query(query: CohortQuery, uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    ds.StudyDate = query.date_range()
    ds.StudyDescription = ""  # a return key: matched here (PACS match case-sensitively)
    ds.ModalitiesInStudy = query.pacs_modality()
    return ds


def _series_query(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.SeriesDescription = ""
    return ds


def _image_query(s: SeriesRef, sop_uid: str = "", keywords: tuple[str, ...] = ()) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = s.study_uid
    ds.SeriesInstanceUID = s.series_uid
    ds.SOPInstanceUID = sop_uid
    for k in keywords:
        setattr(ds, k, "")
    return ds


def _series_level(s: SeriesRef) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = s.study_uid
    ds.SeriesInstanceUID = s.series_uid
    return ds


# Why a PACS rejects an association ((result source, diagnostic) of the A-ASSOCIATE-RJ)
REJECT_FIXES = {
    (1, 3): "ask the PACS administrator to register this site's AE title {calling} ([pacs] "
            "calling_ae) with this host's address",
    (1, 7): "set [pacs] called_ae to the PACS' own AE title",
    (3, 1): "the PACS is busy: retry later",
    (3, 2): "the PACS has too many associations open: retry later",
}


def close_unanswered(assoc: Association) -> None:
    """Close the socket of an association that ended without an answer (pynetdicom leaves
    it open)."""
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is not None:
        raw.close()


class DimseTransport:
    """C-FIND + C-GET or C-MOVE against a PACS with pynetdicom (Study Root model).

    Every association proposes the Study Root FIND context (a PACS such as ``dcmqrscp
    --require-find`` refuses GET/MOVE without it); an association or presentation context
    the PACS refuses, and a failure status, are named with the fix (:func:`dimse_status`)."""

    def __init__(self, cfg: PacsConfig) -> None:
        self.cfg = cfg

    def new_ae(self) -> AE:
        """An AE with this site's calling AE title and the configured timeouts."""
        ae = AE(ae_title=self.cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout_s
        ae.connection_timeout = min(self.cfg.timeout_s, 10.0)
        return ae

    def _fix(self, text: str) -> str:
        return text.format(calling=self.cfg.calling_ae, port=self.cfg.storage_port,
                           dest=self.cfg.move_destination or self.cfg.calling_ae,
                           method=self.cfg.method)

    @contextmanager
    def associate(self, ae: AE, *, service: str = "", **kw: Any) -> Iterator[Association]:
        """An association with the PACS (released on exit) on which the PACS accepted the
        context of ``service`` (C-FIND, C-GET, C-MOVE), or a PacsError naming the fix: a
        :class:`PacsRefused` when the PACS answered with a refusal."""
        started = time.monotonic()
        assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.called_ae, **kw)
        for attempt in range(1, QUICK_DROP_TRIES):
            if assoc.is_established or assoc.acceptor.primitive is not None \
                    or time.monotonic() - started >= QUICK_DROP_S:
                break
            # closed before any answer, at once (not a timeout): a PACS busy forking, or a
            # drop on the way; another try reads its real answer (a rejection names why)
            close_unanswered(assoc)
            time.sleep(attempt * QUICK_DROP_S / 4)
            started = time.monotonic()
            assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.called_ae,
                                 **kw)
        if not assoc.is_established:
            if assoc.acceptor.primitive is None:
                close_unanswered(assoc)
            raise self._not_established(assoc)
        try:
            wanted = SERVICES.get(service)
            if wanted is not None and wanted not in {cx.abstract_syntax
                                                     for cx in assoc.accepted_contexts}:
                raise PacsRefused(
                    f"PACS {self.cfg.describe()}: association accepted, but the PACS refused "
                    f"the {service} presentation context ({wanted.name}). Fix: "
                    + (f'set [pacs] method = "{"c-move" if service == "C-GET" else "c-get"}" '
                       "(or dicomweb), or ask the PACS administrator to allow "
                       f"{service} for AE title {self.cfg.calling_ae}"
                       if service != "C-FIND" else "ask the PACS administrator to allow "
                       f"Study Root queries for AE title {self.cfg.calling_ae}"))
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _not_established(self, assoc: Association) -> PacsError:
        rsp = assoc.acceptor.primitive
        where = f"PACS {self.cfg.describe()}"
        if assoc.is_rejected and rsp is not None:
            fix = REJECT_FIXES.get((rsp.result_source or 0, rsp.diagnostic or 0),
                                   "check [pacs] called_ae and calling_ae, and ask the PACS "
                                   "administrator whether it accepts AE title {calling}")
            return PacsRefused(f"{where}: association rejected ({rsp.result_str}; "
                               f"{rsp.source_str}: {rsp.reason_str}). Fix: {self._fix(fix)}")
        if rsp is not None and not assoc.accepted_contexts:
            names = ", ".join(sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts
                                      if cx.abstract_syntax is not None})) or "all"
            return PacsRefused(f"{where}: the PACS answered but accepted none of the "
                               f"presentation contexts proposed ({names}). Fix: ask the PACS "
                               "administrator to allow Study Root query/retrieve for AE title "
                               f"{self.cfg.calling_ae}, or set [pacs] method to another of "
                               "c-get, c-move, dicomweb")
        return PacsError(f"{where}: association not established (connection refused, timed "
                         "out or aborted). Fix: check [pacs] host and port, and that the PACS "
                         "is running and reachable from this host")

    def _status_error(self, what: str, code: int) -> PacsError:
        st = dimse_status(code)
        fix = st.fix
        if what == "C-MOVE" and 0xC000 <= code <= 0xCFFF:
            fix += ("; with c-move, a PACS that does not know the destination answers this too "
                    "(Orthanc does): check that AE title {dest} is registered at the PACS with "
                    "this host's address and port {port} ([pacs] move_destination, "
                    "storage_port)")
        return (PacsRefused if st.refused else PacsError)(
            f"PACS {self.cfg.describe()}: {what} failed with status 0x{code:04X} ({st.name})."
            f" Fix: {self._fix(fix)}")

    def _find(self, queries: list[Dataset]) -> list[Dataset]:
        if not queries:
            return []
        ae = self.new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        out: list[Dataset] = []
        with self.associate(ae, service="C-FIND") as assoc:
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
                        raise self._status_error("C-FIND", status.Status)
        return out

    def study_answers(self, query: CohortQuery) -> list[Answer]:
        qs = ([_study_query(query, u) for u in query.study_uids] if query.study_uids
              else [_study_query(query)])
        return [_answer(d, STUDY_KEYWORDS) for d in self._find(qs)]

    def series_answers(self, study_uids: list[str]) -> list[Answer]:
        return [_answer(d, SERIES_KEYWORDS)
                for d in self._find([_series_query(u) for u in study_uids])]

    def instance_answers(self, series: SeriesRef) -> list[Answer]:
        return [_answer(d, INSTANCE_KEYWORDS)
                for d in self._find([_image_query(series, keywords=FILTER_KEYWORDS)])]

    def find_series(self, query: CohortQuery, *, refuse: Refuse = log_refusal) -> Cohort:
        return find_cohort(self, query, refuse=refuse)

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
            raise self._status_error(what, status.Status)

    def _get(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink,
             policy: StorePolicy, refuse: Refuse) -> int:
        ae = self.new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        for uid in GET_STORAGE_CLASSES:
            ae.add_requested_context(uid, TRANSFER_SYNTAXES)
        roles = [build_role(uid, scp_role=True) for uid in GET_STORAGE_CLASSES]
        received = _Receiver(sink, policy, refuse)  # our own association: no peer check
        with self.associate(ae, service="C-GET", ext_neg=roles,
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
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
            with self.associate(ae, service="C-MOVE") as assoc:
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

    @staticmethod
    def _answer(item: dict[str, Any], keywords: tuple[str, ...]) -> Answer:
        """The values of ``keywords`` in a DICOM JSON dataset (multi-valued joined by
        backslashes; UIDs always, "" when absent)."""
        out: Answer = {}
        for k in keywords:
            element = item.get(f"{tag_for_keyword(k):08X}")
            values = element.get("Value") if isinstance(element, dict) else None
            texts = [str(v).strip() for v in values if isinstance(v, str | int | float)] \
                if isinstance(values, list) else []
            value = "\\".join(texts) if k not in UID_TAGS else (texts[0] if texts else "")
            if value or k in UID_TAGS:
                out[k] = value
        return out

    def study_answers(self, query: CohortQuery) -> list[Answer]:
        params = {"StudyDate": query.date_range(), "ModalitiesInStudy": query.pacs_modality(),
                  "includefield": "00081030,00080061"}  # StudyDescription, ModalitiesInStudy
        items = ([i for u in query.study_uids
                  for i in self._json("studies", params | {"StudyInstanceUID": u})]
                 if query.study_uids else self._json("studies", params))
        return [self._answer(i, STUDY_KEYWORDS) for i in items]

    def series_answers(self, study_uids: list[str]) -> list[Answer]:
        return [self._answer(i, SERIES_KEYWORDS) | {"StudyInstanceUID": uid}
                for uid in study_uids
                for i in self._json(self._url("studies", uid, "series"),
                                    {"includefield": "00080060,0008103E"})]

    def instance_answers(self, series: SeriesRef) -> list[Answer]:
        items = self._json(self._url("studies", series.study_uid, "series", series.series_uid,
                                     "instances"),
                           {"includefield": "00080060,00081030,0008103E"})
        return [self._answer(i, INSTANCE_KEYWORDS) for i in items]

    def find_series(self, query: CohortQuery, *, refuse: Refuse = log_refusal) -> Cohort:
        return find_cohort(self, query, refuse=refuse)

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
