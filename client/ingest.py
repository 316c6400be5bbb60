"""PACS -> local cache -> volumes: the site's ingest, with a summary of what happened.

The cache is keyed by SOP Instance UID (``instances/<study>/<series>/<sop>.dcm``), each
file written atomically after it was read back and checked, so a second ingest downloads
nothing new and a failed transfer never leaves a corrupt file. Converted series go to
``volumes/<series>.npz`` with their geometry.
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

from fedpacs.client import volumes
from fedpacs.client.dicom import UNREADABLE, Volume, build_volume, check_pixel_length, read_dicom
from fedpacs.client.pacs import CohortQuery, PacsConfig, SeriesRef, Transport, make_transport
from fedpacs.common.errors import DataError, PacsError

__all__ = ["NOT_RETRIEVED", "PACS_UNREACHABLE", "RETRIEVE_FAILED", "InstanceCache",
           "IngestSummary", "Skipped", "import_folder", "ingest"]

log = logging.getLogger("fedpacs.ingest")

Progress = Callable[[str, int, int], None]  # (stage, done, total)

# Skip kinds of the ingest itself (instance and series problems carry the DataError kinds
# of fedpacs.client.dicom: not-dicom, unreadable, truncated, no-pixels, missing-slices).
PACS_UNREACHABLE = "pacs-unreachable"  # the cohort query failed: nothing was ingested
RETRIEVE_FAILED = "retrieve-failed"    # the PACS refused or broke off one series' transfer
NOT_RETRIEVED = "not-retrieved"        # instances the PACS listed but did not send


@dataclass(frozen=True)
class Skipped:
    item: str  # file, series or PACS (local only: never sent to the server)
    kind: str  # short code, safe to count and report centrally
    reason: str


@dataclass
class IngestSummary:
    studies_found: int = 0
    series_found: int = 0
    instances_found: int = 0
    retrieved: int = 0
    already_cached: int = 0
    converted: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unreachable(self) -> bool:
        """The PACS could not be queried at all (a skip of kind :data:`PACS_UNREACHABLE`)."""
        return any(s.kind == PACS_UNREACHABLE for s in self.skipped)

    def counts(self) -> dict[str, int]:
        """Counts and codes only: what may leave the site."""
        out = {k: v for k, v in self.__dict__.items() if isinstance(v, int)}
        out.update({f"skipped-{k}": n for k, n in Counter(s.kind for s in self.skipped).items()})
        return out

    def lines(self) -> list[str]:
        out = [f"studies found {self.studies_found}, series {self.series_found}, instances "
               f"{self.instances_found}; retrieved {self.retrieved}, already cached "
               f"{self.already_cached}; series converted {self.converted}; skipped "
               f"{len(self.skipped)} ({self.seconds:.1f}s)"]
        out += [f"  skipped [{s.kind}] {s.item}: {s.reason}" for s in self.skipped]
        return out


class InstanceCache:
    """Instances by SOP Instance UID, plus converted volumes, under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "instances").mkdir(parents=True, exist_ok=True)
        (root / volumes.VOLUMES_DIR).mkdir(parents=True, exist_ok=True)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / "instances" / _safe(study_uid) / _safe(series_uid)

    def path(self, s: SeriesRef, sop_uid: str) -> Path:
        return self.series_dir(s.study_uid, s.series_uid) / f"{_safe(sop_uid)}.dcm"

    def has(self, s: SeriesRef, sop_uid: str) -> bool:
        return self.path(s, sop_uid).is_file()

    def files(self, s: SeriesRef) -> list[Path]:
        return sorted(self.series_dir(s.study_uid, s.series_uid).glob("*.dcm"))

    def store(self, data: bytes, *, expect_sop: str = "", source: str = "") -> SeriesRef:
        """Check an instance (readable, complete, right UID) and write it atomically."""
        label = source or expect_sop or "instance"
        ds = read_dicom(data, label)
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not ds.get(tag):
                raise DataError(label, f"no {tag}", "only complete instances can be cached",
                                kind=UNREADABLE)
        if expect_sop and str(ds.SOPInstanceUID) != expect_sop:
            raise DataError(label, f"SOP Instance UID {ds.SOPInstanceUID} != requested "
                            f"{expect_sop}", "report this PACS answer", kind=UNREADABLE)
        check_pixel_length(ds, label)
        ref = SeriesRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                        str(ds.get("Modality", "")), str(ds.get("SeriesDescription", "")))
        dest = self.path(ref, str(ds.SOPInstanceUID))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
        return ref

    def volume_path(self, series_uid: str) -> Path:
        return volumes.volume_path(self.root, _safe(series_uid))

    def save_volume(self, vol: Volume, fingerprint: str) -> Path:
        meta = {"modality": vol.modality, "study_uid": vol.study_uid,
                "series_uid": vol.series_uid, "series_description": vol.series_description,
                "irregular_spacing": vol.irregular_spacing, "fingerprint": fingerprint,
                "num_instances": len(vol.source_files)}
        return volumes.save_volume(self.volume_path(vol.series_uid), array=vol.array,
                                   spacing=vol.spacing, origin=vol.origin,
                                   direction=vol.direction, meta=meta)

    def volume_fingerprint(self, series_uid: str) -> str:
        return str(volumes.volume_meta(self.volume_path(series_uid)).get("fingerprint", ""))


def _safe(uid: str) -> str:
    return "".join(c for c in uid if c.isdigit() or c == ".") or hashlib.sha1(
        uid.encode()).hexdigest()


def _fingerprint(files: list[Path]) -> str:
    return hashlib.sha256("\n".join(p.name for p in files).encode()).hexdigest()[:16]


def convert_series(cache: InstanceCache, s: SeriesRef, summary: IngestSummary) -> None:
    files = cache.files(s)
    if not files:
        return
    fp = _fingerprint(files)
    if cache.volume_fingerprint(s.series_uid) == fp:
        summary.converted += 1
        return
    try:
        vol = build_volume(files, series_uid=s.series_uid)
    except DataError as err:
        summary.skipped.append(Skipped(err.path, err.kind, err.problem))
        return
    cache.save_volume(vol, fp)
    summary.converted += 1


def ingest(pacs: PacsConfig, query: CohortQuery, cache_dir: Path, *,
           transport: Transport | None = None, convert: bool = True,
           progress: Progress | None = None) -> IngestSummary:
    """Find the cohort on the PACS, fetch what the cache lacks, convert each series.

    Problems become skips in the summary (an unreachable PACS: ``summary.unreachable``);
    a [pacs] config no transport can use (dicomweb without a URL) raises ConfigError.
    """
    t0 = time.monotonic()
    summary = IngestSummary()
    cache = InstanceCache(cache_dir)
    tr = transport or make_transport(pacs)
    try:
        series = tr.find_series(query)
    except PacsError as err:
        summary.skipped.append(Skipped(pacs.describe(), PACS_UNREACHABLE, str(err)))
        summary.seconds = time.monotonic() - t0
        return summary
    summary.series_found = len(series)
    summary.studies_found = len({s.study_uid for s in series})
    for i, s in enumerate(series):
        if progress:
            progress("retrieve", i, len(series))
        try:
            sops = tr.find_instances(s)
            summary.instances_found += len(sops)
            missing = [u for u in sops if not cache.has(s, u)]
            summary.already_cached += len(sops) - len(missing)
            if missing:
                bad: dict[str, Skipped] = {}  # SOP UID -> why its instance was rejected

                def sink(data: bytes, sop: str, bad: dict[str, Skipped] = bad,
                         series_uid: str = s.series_uid) -> None:
                    try:
                        cache.store(data, expect_sop=sop, source=f"{series_uid}/{sop}")
                    except DataError as err:
                        bad[sop] = Skipped(err.path, err.kind, err.problem)

                got = tr.retrieve(s, None if len(missing) == len(sops) else missing, sink)
                summary.skipped.extend(bad.values())
                summary.retrieved += got - len(bad)
                # arrived-but-rejected instances are reported once, with their own kind
                still = [u for u in missing if not cache.has(s, u) and u not in bad]
                if still:
                    summary.skipped.append(Skipped(
                        s.series_uid, NOT_RETRIEVED,
                        f"{len(still)} of {len(sops)} instances did not arrive"))
        except PacsError as err:
            summary.skipped.append(Skipped(s.series_uid, RETRIEVE_FAILED, str(err)))
            continue
        if convert:
            if progress:
                progress("convert", i, len(series))
            convert_series(cache, s, summary)
    if progress:
        progress("done", len(series), len(series))
    summary.seconds = time.monotonic() - t0
    return summary


def import_folder(folder: Path, cache_dir: Path, *, convert: bool = True,
                  progress: Progress | None = None) -> IngestSummary:
    """Import DICOM files from a folder (CD, export) into the cache, then convert."""
    t0 = time.monotonic()
    summary = IngestSummary()
    cache = InstanceCache(cache_dir)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    series: dict[str, SeriesRef] = {}
    for i, f in enumerate(files):
        if progress:
            progress("import", i, len(files))
        try:
            ref = cache.store(f.read_bytes(), source=str(f))
        except DataError as err:
            summary.skipped.append(Skipped(err.path, err.kind, err.problem))
            continue
        summary.instances_found += 1
        summary.retrieved += 1
        series.setdefault(ref.series_uid, ref)
    summary.series_found = len(series)
    summary.studies_found = len({s.study_uid for s in series.values()})
    if convert:
        for s in series.values():
            convert_series(cache, s, summary)
    summary.seconds = time.monotonic() - t0
    return summary
