"""PACS -> local cache -> volumes: the site's ingest, with a summary of what happened.

The cache is keyed by SOP Instance UID (``instances/<study>/<series>/<sop>.dcm``), each
file written atomically after it was read back and checked, so a second ingest downloads
nothing new and a failed transfer never leaves a corrupt file. Converted series go to
``volumes/<series>.npz`` with their geometry and patient key (fedpacs.client.volumes).

Label series (``[cohort] labels``: DICOM SEG, RTSTRUCT; any such instance a folder import
finds) are retrieved like image series, then, once the image series are converted, each
instance becomes the label maps of the image series it references that this ingest
converted (``labels/<image series>.npz``, fedpacs.client.seglabels). One that references
none (``label-unmatched``), lies off their grid (``label-off-grid``), cannot be read
(``label-unreadable``), has a segment no class of the task is named like
(``label-classes``) or shares an image series with another label instance
(``label-ambiguous``) is skipped with that reason, and writes nothing; its label maps from
an earlier ingest are removed. Label maps are remade only when the label instance, the image
volume or the task's classes changed (a fingerprint, as for volumes).

Only a valid DICOM UID becomes a path component (``..`` or ``1..2`` never does: such an
instance or series is skipped as ``bad-uid`` before any path is built), an instance must
belong to the series (and be one of the instances) that was asked for, and nothing larger
than ``[pacs] max_instance_mb`` (as received, or as the pixels its header promises) is
written or decoded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from fedpacs.client import seglabels, volumes
from fedpacs.client.dicom import (
    BAD_UID,
    DEFAULT_MAX_INSTANCE_MB,
    LABEL_KINDS,
    MIB,
    TOO_LARGE,
    UNDECODABLE,
    UNREADABLE,
    Volume,
    build_volume,
    check_pixel_length,
    check_pixel_size,
    check_uids,
    read_dicom,
    shown,
    uid_problem,
    valid_uid,
)
from fedpacs.client.pacs import (
    REJECTED_PEER,
    REJECTED_SERIES,
    UNRESOLVED,
    CohortQuery,
    PacsConfig,
    PacsRefused,
    Refusal,
    Removal,
    SeriesRef,
    Transport,
    as_cohort,
    make_transport,
)
from fedpacs.common.errors import DataError, ExitCode, PacsError

__all__ = ["BAD_UID", "NOT_RETRIEVED", "PACS_REFUSED", "PACS_UNREACHABLE", "REJECTED_PEER",
           "REJECTED_SERIES", "RETRIEVE_FAILED", "TOO_LARGE", "UNRESOLVED", "InstanceCache",
           "IngestSummary", "Skipped", "import_folder", "ingest"]

log = logging.getLogger("fedpacs.ingest")

Progress = Callable[[str, int, int], None]  # (stage, done, total)

# Skip kinds of the ingest itself (instance and series problems carry the DataError kinds
# of fedpacs.client.dicom: not-dicom, unreadable, truncated, no-pixels, missing-slices,
# bad-uid, too-large, unsupported-sop, no-decoder, undecodable; refusals of the transport:
# rejected-peer, rejected-series; and unresolved: a series whose [cohort] values neither
# the PACS nor its first header gave).
PACS_UNREACHABLE = "pacs-unreachable"  # the cohort query failed: nothing was ingested
PACS_REFUSED = "pacs-refused"          # the PACS refused in a way every series would meet
                                       # (association/context, move destination): stopped
RETRIEVE_FAILED = "retrieve-failed"    # the PACS refused or broke off one series' transfer
NOT_RETRIEVED = "not-retrieved"        # instances the PACS listed but did not send


@dataclass(frozen=True)
class Skipped:
    item: str  # file, series or PACS (local only: never sent to the server)
    kind: str  # short code, safe to count and report centrally
    reason: str


@dataclass
class IngestSummary:
    """What an ingest did. ``studies_found``/``series_found``: what the PACS answered (the
    series of the studies no study-level pattern removed); ``cohort_studies``/
    ``cohort_series``: what the [cohort] patterns left (``removed``: what each removed);
    ``empty_cohort``: why nothing was left, with the fix ("" when something was)."""

    studies_found: int = 0
    series_found: int = 0
    cohort_studies: int = 0
    cohort_series: int = 0
    instances_found: int = 0
    retrieved: int = 0
    already_cached: int = 0
    converted: int = 0
    labels_converted: int = 0  # label maps made (or current) from SEG/RTSTRUCT instances
    header_reads: int = 0  # series whose [cohort] values were read from an instance header
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    asked: str = ""  # what the PACS itself was asked to match
    removed: list[Removal] = field(default_factory=list)
    empty_cohort: str = ""

    @property
    def unreachable(self) -> bool:
        """The PACS could not be queried at all (a skip of kind :data:`PACS_UNREACHABLE`)."""
        return any(s.kind == PACS_UNREACHABLE for s in self.skipped)

    @property
    def exit_code(self) -> ExitCode:
        """PACS: unreachable, or it refused (association, context, move destination);
        CONFIG: the [cohort] left nothing to ingest; DATA: something skipped; else OK."""
        if any(s.kind in (PACS_UNREACHABLE, PACS_REFUSED) for s in self.skipped):
            return ExitCode.PACS
        if self.empty_cohort:
            return ExitCode.CONFIG
        return ExitCode.DATA if self.skipped else ExitCode.OK

    def counts(self) -> dict[str, int]:
        """Counts and codes only: what may leave the site."""
        out = {k: v for k, v in self.__dict__.items() if isinstance(v, int)}
        out.update({f"skipped-{k}": n for k, n in Counter(s.kind for s in self.skipped).items()})
        return out

    def lines(self) -> list[str]:
        out = [f"studies found {self.studies_found}, series {self.series_found}; in the cohort "
               f"studies {self.cohort_studies}, series {self.cohort_series}, instances "
               f"{self.instances_found}; retrieved {self.retrieved}, already cached "
               f"{self.already_cached}; series converted {self.converted}; label maps "
               f"{self.labels_converted}; skipped {len(self.skipped)} ({self.seconds:.1f}s)"]
        if self.asked:
            out.append(f"  asked the PACS for: {self.asked}")
        out += [f"  {r.line()}" for r in self.removed]
        if self.header_reads:
            out.append(f"  {self.header_reads} series: [cohort] values read from the header of "
                       "their first instance (the PACS does not answer them in C-FIND)")
        if self.empty_cohort:
            out.append(f"  nothing to ingest: {self.empty_cohort}")
        out += [f"  skipped [{s.kind}] {s.item}: {s.reason}" for s in self.skipped]
        return out


class InstanceCache:
    """Instances by SOP Instance UID, plus converted volumes, under one folder.

    Every path below ``root`` is built from UIDs checked by :func:`valid_uid` (digits and
    dots), so none can point outside it; anything else is a DataError of kind ``bad-uid``.
    """

    def __init__(self, root: Path, *,
                 max_instance_bytes: int = DEFAULT_MAX_INSTANCE_MB * MIB) -> None:
        self.root = root
        self.max_instance_bytes = max_instance_bytes
        (root / "instances").mkdir(parents=True, exist_ok=True)
        (root / volumes.VOLUMES_DIR).mkdir(parents=True, exist_ok=True)
        self._salt: bytes | None = None  # of patient keys: read (or made) when first needed

    def salt(self) -> bytes:
        if self._salt is None:
            self._salt = volumes.make_salt(self.root)
        return self._salt

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / "instances" / _component(study_uid, "StudyInstanceUID") / \
            _component(series_uid, "SeriesInstanceUID")

    def path(self, s: SeriesRef, sop_uid: str) -> Path:
        return self.series_dir(s.study_uid, s.series_uid) / \
            f"{_component(sop_uid, 'SOPInstanceUID')}.dcm"

    def has(self, s: SeriesRef, sop_uid: str) -> bool:
        return self.path(s, sop_uid).is_file()

    def files(self, s: SeriesRef) -> list[Path]:
        return sorted(self.series_dir(s.study_uid, s.series_uid).glob("*.dcm"))

    def store(self, data: bytes, *, expect_sop: str = "", expect_series: SeriesRef | None = None,
              source: str = "") -> SeriesRef:
        """Check an instance and write it atomically: at most ``max_instance_bytes`` (as
        received and as promised pixels), readable, valid UIDs, the requested SOP instance
        of the requested series (when given), pixel data complete."""
        label = source or expect_sop or "instance"
        if len(data) > self.max_instance_bytes:
            raise DataError(label, f"{len(data)} bytes, more than the "
                            f"{self.max_instance_bytes // MIB} MB allowed",
                            "raise [pacs] max_instance_mb if such instances are expected; it "
                            "was not written", kind=TOO_LARGE)
        ds = read_dicom(data, label)
        study, series, sop = check_uids(ds, label)
        if expect_sop and sop != expect_sop:
            raise DataError(label, f"SOP Instance UID {sop} != requested {shown(expect_sop)}",
                            "report this PACS answer", kind=UNREADABLE)
        if expect_series is not None and (series, study) != (expect_series.series_uid,
                                                              expect_series.study_uid):
            raise DataError(label, f"instance of series {series} (study {study}) while series "
                            f"{expect_series.series_uid} was retrieved", "report this PACS "
                            "answer; it was not written", kind=REJECTED_SERIES)
        check_pixel_size(ds, label, self.max_instance_bytes)
        check_pixel_length(ds, label)
        ref = SeriesRef(study, series, str(ds.get("Modality", "")),
                        str(ds.get("SeriesDescription", "")))
        dest = self.path(ref, sop)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
        return ref

    def volume_path(self, series_uid: str) -> Path:
        return volumes.volume_path(self.root, _component(series_uid, "SeriesInstanceUID"))

    def save_volume(self, vol: Volume, fingerprint: str) -> Path:
        meta = {"modality": vol.modality, "study_uid": vol.study_uid,
                "series_uid": vol.series_uid, "series_description": vol.series_description,
                "irregular_spacing": vol.irregular_spacing, "fingerprint": fingerprint,
                "num_instances": len(vol.source_files),
                **volumes.patient_meta(self.salt(), vol.patient_id)}
        return volumes.save_volume(self.volume_path(vol.series_uid), array=vol.array,
                                   spacing=vol.spacing, origin=vol.origin,
                                   direction=vol.direction, meta=meta)

    def label_path(self, image_series_uid: str) -> Path:
        return volumes.label_path(self.root, _component(image_series_uid, "SeriesInstanceUID"))

    def volume_fingerprint(self, series_uid: str) -> str:
        return str(volumes.volume_meta(self.volume_path(series_uid)).get("fingerprint", ""))

    def volume_current(self, series_uid: str, fingerprint: str) -> bool:
        """The series' volume was converted from these instances, with a patient key
        under this cache's salt (a volume from before patient keys is converted again)."""
        meta = volumes.volume_meta(self.volume_path(series_uid))
        return (meta.get("fingerprint") == fingerprint
                and meta.get(volumes.PATIENT_KEY_SALT) == volumes.salt_id(self.salt()))


def _component(uid: str, field: str) -> str:
    """A UID as a path component: only a valid DICOM UID (no ``..``, no separators)."""
    if not valid_uid(uid):
        raise DataError(shown(uid), uid_problem(uid, field), "nothing was written for it; ask "
                        "the PACS administrator to correct the instance", kind=BAD_UID)
    return uid


def _ref_problem(s: SeriesRef) -> str | None:
    for name, uid in (("StudyInstanceUID", s.study_uid), ("SeriesInstanceUID", s.series_uid)):
        if not valid_uid(uid):
            return uid_problem(uid, name) + " in the PACS' answer: series not retrieved"
    return None


def _fingerprint(files: list[Path]) -> str:
    return hashlib.sha256("\n".join(p.name for p in files).encode()).hexdigest()[:16]


def convert_series(cache: InstanceCache, s: SeriesRef, summary: IngestSummary) -> Path | None:
    """Convert one cached image series (unless its volume is current); its volume file, or
    None when it was skipped (the summary says why)."""
    files = cache.files(s)
    if not files:
        return None
    fp = _fingerprint(files)
    if cache.volume_current(s.series_uid, fp):
        summary.converted += 1
        return cache.volume_path(s.series_uid)
    try:
        vol = build_volume(files, series_uid=s.series_uid,
                           max_pixel_bytes=cache.max_instance_bytes)
    except DataError as err:
        summary.skipped.append(Skipped(err.path, err.kind, err.problem))
        if err.kind == UNDECODABLE and Path(err.path) in files:
            Path(err.path).unlink(missing_ok=True)  # damaged in transit: retrieved again
        return None
    path = cache.save_volume(vol, fp)
    summary.converted += 1
    return path


def label_kind(cache: InstanceCache, s: SeriesRef) -> str:
    """"seg"/"rtstruct" when the series' first cached instance is a SEG/RTSTRUCT, else ""
    (its header only; what the PACS said the Modality is does not decide)."""
    files = cache.files(s)
    if not files:
        return ""
    try:
        return seglabels.label_kind(pydicom.dcmread(files[0], stop_before_pixels=True))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, AttributeError):
        return ""  # converted as an image: its skip says what is wrong


class _Converter:
    """Converts the series of one ingest: image series at once, label series (the kinds
    asked for) once every image series is (:meth:`finish`)."""

    def __init__(self, cache: InstanceCache, summary: IngestSummary, *,
                 labels: tuple[str, ...], class_names: tuple[str, ...]) -> None:
        self.cache = cache
        self.summary = summary
        self.labels = labels
        self.class_names = class_names
        self.images: dict[str, tuple[Path, list[Path]]] = {}
        self.label_series: list[SeriesRef] = []

    def add(self, s: SeriesRef) -> None:
        if self.labels and label_kind(self.cache, s) in self.labels:
            self.label_series.append(s)
            return
        path = convert_series(self.cache, s, self.summary)
        if path is not None:
            self.images[s.series_uid] = (path, self.cache.files(s))

    def finish(self, progress: Progress | None = None) -> None:
        if self.label_series:
            convert_labels(self.cache, self.label_series, self.images, self.summary,
                           class_names=self.class_names, progress=progress)


def convert_labels(cache: InstanceCache, series: list[SeriesRef],
                   images: dict[str, tuple[Path, list[Path]]], summary: IngestSummary, *,
                   class_names: tuple[str, ...] = (), progress: Progress | None = None) -> None:
    """Each SEG/RTSTRUCT instance of ``series`` -> the label maps of the image series it
    references among ``images`` (series UID -> (volume, instance files), converted by this
    ingest); see the module docstring for the skips. A label map is written only when all
    of its instance's maps were made."""
    index = seglabels.ImageIndex(images)
    sources: list[tuple[SeriesRef, Path, list[str]]] = []
    for s in series:
        for f in cache.files(s):
            try:
                ds = read_dicom(f, str(f))
                found = seglabels.targets(ds, index)
            except DataError as err:
                summary.skipped.append(Skipped(err.path, seglabels.LABEL_UNREADABLE,
                                               err.problem))
                continue
            if not found:
                summary.skipped.append(Skipped(str(f), seglabels.LABEL_UNMATCHED, (
                    "references no image series converted by this ingest (another series, "
                    "not in the [cohort], or one skipped above). Fix: "
                    + seglabels.FIX_REFERENCE)))
                continue
            sources.append((s, f, found))
    claims = Counter(t for _, _, found in sources for t in found)
    for i, (s, f, found) in enumerate(sources):
        if progress:
            progress("labels", i, len(sources))
        shared = [t for t in found if claims[t] > 1]
        if shared:
            summary.skipped.append(Skipped(str(f), seglabels.LABEL_AMBIGUOUS, (
                f"another SEG/RTSTRUCT also labels image series {shared[0]}: neither is "
                "used. Fix: keep one label instance per image series in the [cohort]")))
            _drop_labels(cache, s, found)
            continue
        wanted = {t: seglabels.fingerprint(f, str(volumes.volume_meta(images[t][0]).get(
            "fingerprint", "")), class_names) for t in found}
        if all(_label_fingerprint(cache, t) == fp for t, fp in wanted.items()):
            summary.labels_converted += len(wanted)
            continue
        try:
            maps = seglabels.label_maps(f, index, class_names)
        except DataError as err:
            summary.skipped.append(Skipped(err.path, err.kind, err.problem))
            _drop_labels(cache, s, found)
            continue
        for m in maps:  # every map of the instance was made: now written, each crash-safe
            volumes.save_label(cache.label_path(m.image_series_uid), mask=m.mask, meta={
                "source_series": s.series_uid, "source_sop": f.stem,
                "fingerprint": wanted.get(m.image_series_uid, ""), "classes": m.classes})
            summary.labels_converted += 1


def _label_fingerprint(cache: InstanceCache, image_series_uid: str) -> str:
    path = cache.label_path(image_series_uid)
    if not path.is_file():
        return ""
    found = volumes.load_label(cache.root, image_series_uid)
    return str(found[1].get("fingerprint", "")) if found is not None else ""


def _drop_labels(cache: InstanceCache, s: SeriesRef, image_series: list[str]) -> None:
    """Remove the label maps an earlier ingest made from label series ``s``."""
    for t in image_series:
        found = volumes.load_label(cache.root, t)
        if found is not None and found[1].get("source_series") == s.series_uid:
            cache.label_path(t).unlink(missing_ok=True)


def ingest(pacs: PacsConfig, query: CohortQuery, cache_dir: Path, *,
           transport: Transport | None = None, convert: bool = True,
           progress: Progress | None = None) -> IngestSummary:
    """Find the cohort on the PACS, fetch what the cache lacks, convert each series.

    Problems become skips in the summary (an unreachable PACS: ``summary.unreachable``;
    what `site ingest` exits with: ``summary.exit_code``);
    a [pacs] config no transport can use (dicomweb without a URL) raises ConfigError.
    Series and instances whose UIDs are not DICOM UIDs are skipped (``bad-uid``) before
    anything is asked or written; what the transport refuses (another peer, another series,
    too large) and what arrives but was not asked for are skipped with their reason code.
    """
    t0 = time.monotonic()
    summary = IngestSummary()
    cache = InstanceCache(cache_dir, max_instance_bytes=pacs.max_instance_bytes)
    tr = transport or make_transport(pacs)
    converter = _Converter(cache, summary, labels=query.labels,
                           class_names=query.label_classes)

    def refuse(r: Refusal) -> None:
        summary.skipped.append(Skipped(r.item, r.kind, r.reason))

    try:
        cohort = as_cohort(tr.find_series(query, refuse=refuse))
    except PacsError as err:
        summary.skipped.append(Skipped(pacs.describe(), PACS_UNREACHABLE, str(err)))
        summary.seconds = time.monotonic() - t0
        return summary
    series = list(cohort.series)
    summary.studies_found, summary.series_found = cohort.studies_found, cohort.series_found
    summary.cohort_series = len(series)
    summary.cohort_studies = len({s.study_uid for s in series})
    summary.asked, summary.removed = cohort.asked, list(cohort.removed)
    summary.header_reads = cohort.header_reads
    if not summary.skipped:  # else the skips say why (bad UIDs, unresolved values)
        summary.empty_cohort = cohort.nothing_left()
    for i, s in enumerate(series):
        if progress:
            progress("retrieve", i, len(series))
        problem = _ref_problem(s)
        if problem:
            refuse(Refusal(BAD_UID, shown(s.series_uid), problem))
            continue
        try:
            listed = tr.find_instances(s)
            summary.instances_found += len(listed)
            sops = [u for u in listed if valid_uid(u)]
            for u in listed:
                if not valid_uid(u):
                    refuse(Refusal(BAD_UID, f"{s.series_uid}/{shown(u)}",
                                   uid_problem(u, "SOPInstanceUID") + ": not retrieved"))
            missing = [u for u in sops if not cache.has(s, u)]
            summary.already_cached += len(sops) - len(missing)
            if missing:  # the whole series when nothing listed is cached or refused
                _retrieve(tr, cache, s, missing, summary, whole=len(missing) == len(listed))
        except PacsRefused as err:  # every further series would meet it: stop asking
            left = len(series) - i - 1
            summary.skipped.append(Skipped(s.series_uid, PACS_REFUSED, str(err) + (
                f" ({left} more series not asked for)" if left else "")))
            break
        except PacsError as err:
            summary.skipped.append(Skipped(s.series_uid, RETRIEVE_FAILED, str(err)))
            continue
        if convert:
            if progress:
                progress("convert", i, len(series))
            converter.add(s)
    if convert:
        converter.finish(progress)
    if progress:
        progress("done", len(series), len(series))
    summary.seconds = time.monotonic() - t0
    return summary


def _retrieve(tr: Transport, cache: InstanceCache, s: SeriesRef, missing: list[str],
              summary: IngestSummary, *, whole: bool) -> None:
    """Fetch ``missing`` of series ``s`` (with one series-level request when ``whole``);
    cache what was asked for and passes the checks, report the rest once each."""
    wanted = set(missing)
    bad: dict[str, Skipped] = {}  # requested SOP UID -> why its instance was rejected
    stored: set[str] = set()
    refused: list[Skipped] = []   # from the transport, and instances nobody asked for

    def refuse(r: Refusal) -> None:
        if r.sop_uid in wanted and r.sop_uid not in stored:
            bad[r.sop_uid] = Skipped(r.item, r.kind, r.reason)
        else:
            refused.append(Skipped(r.item, r.kind, r.reason))

    def sink(data: bytes, sop: str) -> None:
        source = f"{s.series_uid}/{shown(sop)}"
        if sop not in wanted:  # also any UID that is not one (wanted holds valid UIDs only)
            refused.append(Skipped(source, REJECTED_SERIES if valid_uid(sop) else BAD_UID,
                                   "an instance that was not requested: not written"))
            return
        try:
            cache.store(data, expect_sop=sop, expect_series=s, source=source)
        except DataError as err:
            bad[sop] = Skipped(err.path, err.kind, err.problem)
            return
        stored.add(sop)
        bad.pop(sop, None)

    try:
        tr.retrieve(s, None if whole else missing, sink, refuse=refuse)
    finally:  # also when the transfer broke off (then a retrieve-failed skip follows)
        summary.skipped.extend(refused)
        summary.skipped.extend(bad.values())
        summary.retrieved += len(stored)
    # arrived-but-rejected instances are reported once, with their own kind
    still = [u for u in missing if u not in stored and u not in bad]
    if still:
        summary.skipped.append(Skipped(s.series_uid, NOT_RETRIEVED,
                                       f"{len(still)} of {len(missing)} instances did not "
                                       "arrive"))


def import_folder(folder: Path, cache_dir: Path, *, convert: bool = True,
                  progress: Progress | None = None,
                  max_instance_mb: int = DEFAULT_MAX_INSTANCE_MB,
                  labels: tuple[str, ...] = LABEL_KINDS,
                  label_classes: tuple[str, ...] = ()) -> IngestSummary:
    """Import DICOM files from a folder (CD, export) into the cache, then convert: image
    series to volumes, SEG/RTSTRUCT instances (the kinds in ``labels``: both unless told
    otherwise) to label maps of the imported image series they reference (segment labels
    matched against ``label_classes`` when given). Files over ``max_instance_mb`` are not
    read; the checks of :meth:`InstanceCache.store` apply."""
    t0 = time.monotonic()
    summary = IngestSummary()
    cache = InstanceCache(cache_dir, max_instance_bytes=max_instance_mb * MIB)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    series: dict[str, SeriesRef] = {}
    for i, f in enumerate(files):
        if progress:
            progress("import", i, len(files))
        try:
            size = f.stat().st_size
            if size > cache.max_instance_bytes:
                raise DataError(str(f), f"{size} bytes, more than the {max_instance_mb} MB "
                                "allowed", "raise [pacs] max_instance_mb if such instances "
                                "are expected; it was not read", kind=TOO_LARGE)
            ref = cache.store(f.read_bytes(), source=str(f))
        except DataError as err:
            summary.skipped.append(Skipped(err.path, err.kind, err.problem))
            continue
        summary.instances_found += 1
        summary.retrieved += 1
        series.setdefault(ref.series_uid, ref)
    summary.series_found = summary.cohort_series = len(series)
    summary.studies_found = summary.cohort_studies = len({s.study_uid
                                                          for s in series.values()})
    if convert:
        converter = _Converter(cache, summary, labels=labels, class_names=label_classes)
        for s in series.values():
            converter.add(s)
        converter.finish(progress)
    summary.seconds = time.monotonic() - t0
    return summary
