"""An in-memory PACS for unit tests: the ``Transport`` protocol of fedpacs.client.pacs
(find_series, find_instances, retrieve) over a list of real pydicom datasets.

Series are built from pydicom's bundled ``CT_small.dcm`` (a 128x128 CT slice in HU via its
rescale) under new UIDs, one slice every ``slice_mm`` along the normal. A test can make the
PACS misbehave the ways a real one does: list instances it then does not send
(``withhold``), send broken bytes for an instance (``corrupt``), refuse a series' transfer
(``fail_series``) or not answer at all (``unreachable``), or push instances nobody asked
for along with a series (``extra``). It checks nothing itself (like a naive PACS: UIDs such
as ``..`` are listed and sent as they are), so the ingest's own checks are what a test sees.
End-to-end tests use a real Orthanc (fedpacs.deploy.orthanc) instead.
"""

from __future__ import annotations

import copy
import fnmatch
import io
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fedpacs.client.pacs import (
    CohortQuery,
    Refuse,
    SeriesRef,
    Sink,
    log_refusal,
    series_matches,
)
from fedpacs.common.errors import PacsError

FAKE_PACS = "FAKEPACS@memory"


def ct_series(n: int = 4, *, slice_mm: float = 5.0, study_uid: str = "",
              description: str = "fake CT", study_date: str = "20200115") -> list[Dataset]:
    """``n`` CT slices of one new series (a new study unless ``study_uid`` is given); slice
    i holds CT_small's pixels plus i, so every slice differs."""
    template = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    origin = np.array(template.ImagePositionPatient, float)
    out: list[Dataset] = []
    for i in range(n):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = description
        ds.StudyDate = study_date
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [float(v) for v in origin + [0.0, 0.0, i * slice_mm]]
        ds.SliceThickness = slice_mm
        ds.PixelData = (template.pixel_array + np.int16(i)).astype(np.int16).tobytes()
        out.append(ds)
    return out


def part10(ds: Dataset) -> bytes:
    """A dataset as the DICOM Part-10 bytes a PACS sends."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sop_uids(datasets: list[Dataset]) -> list[str]:
    return sorted(str(ds.SOPInstanceUID) for ds in datasets)


@dataclass
class FakePacs:
    """A PACS holding ``datasets``, answering like DimseTransport/DicomWebTransport."""

    datasets: list[Dataset]
    withhold: set[str] = field(default_factory=set)  # SOP UIDs listed by C-FIND, never sent
    corrupt: dict[str, bytes] = field(default_factory=dict)  # SOP UID -> bytes sent instead
    fail_series: set[str] = field(default_factory=set)  # series whose retrieve fails
    unreachable: bool = False
    # series UID -> (bytes, SOP UID) sent after that series' own instances (a push)
    extra: dict[str, list[tuple[bytes, str]]] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)  # SOP UIDs handed to a sink, in order
    retrieves: list[tuple[str, list[str] | None]] = field(default_factory=list)

    def _check_up(self) -> None:
        if self.unreachable:
            raise PacsError(f"PACS {FAKE_PACS}: association not established (connection "
                            "refused). Fix: check [pacs] host, port and AE titles")

    def _series(self) -> dict[str, list[Dataset]]:
        out: dict[str, list[Dataset]] = {}
        for ds in self.datasets:
            out.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
        return out

    def find_series(self, query: CohortQuery, *,
                    refuse: Refuse = log_refusal) -> list[SeriesRef]:
        self._check_up()
        refs = []
        for items in self._series().values():
            first = items[0]
            date = str(first.get("StudyDate", ""))
            if query.study_uids and str(first.StudyInstanceUID) not in query.study_uids:
                continue
            if (query.date_from and date < query.date_from) or (
                    query.date_to and date > query.date_to):
                continue
            if query.study_description and not fnmatch.fnmatch(
                    str(first.get("StudyDescription", "")).lower(),
                    query.study_description.lower()):
                continue
            ref = SeriesRef(str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                            str(first.get("Modality", "")), str(first.get("SeriesDescription",
                                                                          "")))
            if series_matches(query, ref):
                refs.append(ref)
        return sorted(refs, key=lambda r: (r.study_uid, r.series_uid))

    def find_instances(self, series: SeriesRef) -> list[str]:
        self._check_up()
        return sop_uids(self._series().get(series.series_uid, []))

    def retrieve(self, series: SeriesRef, sop_uids: list[str] | None, sink: Sink, *,
                 refuse: Refuse = log_refusal) -> int:
        self._check_up()
        self.retrieves.append((series.series_uid, None if sop_uids is None else list(sop_uids)))
        if series.series_uid in self.fail_series:
            raise PacsError(f"PACS {FAKE_PACS}: C-GET failed with status 0xA702. Fix: check "
                            "the PACS allows retrieval by this AE title")
        wanted = None if sop_uids is None else set(sop_uids)
        n = 0
        for ds in self._series().get(series.series_uid, []):
            sop = str(ds.SOPInstanceUID)
            if (wanted is not None and sop not in wanted) or sop in self.withhold:
                continue
            sink(self.corrupt[sop] if sop in self.corrupt else part10(ds), sop)
            self.sent.append(sop)
            n += 1
        for data, sop in self.extra.get(series.series_uid, []):
            sink(data, sop)
            self.sent.append(sop)
            n += 1
        return n
