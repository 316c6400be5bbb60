"""Multi-channel cases from a site's PACS cache: the series of one study, one per channel.

A site's ``[data] channels`` (:class:`~fedpacs.client.config.ChannelRule`, e.g. ``["*T1*",
"*T2*", "*FLAIR*"]``) names one series per input channel by its SeriesDescription (and
Modality), matched as the [cohort] patterns are (:func:`fedpacs.client.pacs.pattern_matches`).

:func:`group_channels` groups the cache's converted volumes (fedpacs.client.volumes) by
StudyInstanceUID into :class:`ChannelCase` s, channel i being the series that rule i matches:

* a study where some rule matches no series is skipped as ``missing-channel`` (the reason
  names each rule that matched nothing);
* a series that matches two rules is skipped with its study as ``ambiguous-channel``: the
  rules do not say which channel it is (make the patterns exclusive);
* a rule that matches several series of a study (a repeated acquisition) takes the one with
  the most slices, then the lowest SeriesInstanceUID, and the case carries a note saying so:
  deterministic for a cache, independent of file order, and no study is lost to a rescan.

:func:`load_channels` reads a case as one (channel, slice, row, column) float32 array on the
grid of channel 0 (the reference): every other channel is resampled onto it in patient space
(trilinear, :func:`resample_onto`), from each volume's origin, direction and spacing as
fedpacs.client.dicom's ``Volume`` defines them (:meth:`Grid.affine`). Reference voxels outside
a channel's extent are 0 in that channel; their fraction is in the returned meta, with a note
above :data:`OUTSIDE_NOTE_FRACTION`; a channel that does not overlap the reference at all is a
:class:`~fedpacs.common.errors.DataError` of kind ``channel-off-grid``.

The case is channel 0's series in everything else: its SeriesInstanceUID is the case's
``volume_id`` (label manifest rows and the patient split apply through it), its meta (patient
key, modality, geometry) is the case's. Normalisation is the caller's: z-score each channel
on its own (``fedpacs.common.datasets.zscore`` per ``array[c]``), since T1, T2 and FLAIR
intensities share no scale.

Skip items and reasons (UIDs) stay in the site's log; only the kinds may be counted centrally.
"""

from __future__ import annotations

import zipfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import map_coordinates

from fedpacs.client.config import ChannelRule
from fedpacs.client.ingest import Skipped
from fedpacs.client.pacs import pattern_matches
from fedpacs.client.volumes import load_volume, volume_meta
from fedpacs.common.errors import DataError

MISSING_CHANNEL = "missing-channel"      # some rule matches no series of the study
AMBIGUOUS_CHANNEL = "ambiguous-channel"  # a series of the study matches two rules
CHANNEL_OFF_GRID = "channel-off-grid"    # a channel does not overlap the reference at all
# A channel leaving more than this fraction of the reference grid empty gets a note.
OUTSIDE_NOTE_FRACTION = 0.05
# How far (in voxels) outside a volume's first/last voxel centre still counts as inside
# (rounding of the affine): such points take the edge voxel's value.
EDGE_TOLERANCE = 1e-3
# Entries of a grid-to-grid map this close to a whole number are that number, so grids that
# differ by whole voxels map exactly (no interpolation between neighbours).
SNAP = 1e-6


@dataclass(frozen=True)
class ChannelSeries:
    """One converted volume as grouping sees it (read from its meta, without its array)."""

    path: Path
    study_uid: str
    series_uid: str
    description: str
    modality: str
    slices: int


@dataclass(frozen=True)
class ChannelCase:
    """One study's series in channel order (``series[i]`` matched rule i)."""

    study_uid: str
    series: tuple[ChannelSeries, ...]
    notes: tuple[str, ...] = ()

    @property
    def volume_id(self) -> str:
        """The case's id: its reference (channel 0) SeriesInstanceUID."""
        return self.series[0].series_uid


@dataclass(frozen=True, eq=False)
class Grid:
    """A volume's voxel grid in patient (LPS) space, as fedpacs.client.dicom's ``Volume``:
    ``shape`` and ``spacing`` (mm) in (slice, row, column) order; ``direction`` rows are the
    unit vectors of the column, row and slice axes; ``origin`` is voxel (0, 0, 0)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def affine(self) -> np.ndarray:
        """4x4: homogeneous (slice, row, column, 1) index -> patient (x, y, z, 1) in mm:
        ``origin + slice*spacing[0]*direction[2] + row*spacing[1]*direction[1]
        + column*spacing[2]*direction[0]``."""
        d = np.asarray(self.direction, float).reshape(3, 3)
        out = np.eye(4)
        out[:3, 0] = d[2] * self.spacing[0]
        out[:3, 1] = d[1] * self.spacing[1]
        out[:3, 2] = d[0] * self.spacing[2]
        out[:3, 3] = self.origin
        return out


def volume_grid(shape: tuple[int, ...], meta: dict[str, Any]) -> Grid:
    """The grid of a volume read by fedpacs.client.volumes.load_volume."""
    if len(shape) != 3:
        raise ValueError(f"a volume is (slice, row, column), got shape {shape}")
    sp, org = meta["spacing"], meta["origin"]
    return Grid((int(shape[0]), int(shape[1]), int(shape[2])),
                (float(sp[0]), float(sp[1]), float(sp[2])),
                (float(org[0]), float(org[1]), float(org[2])),
                np.asarray(meta["direction"], float).reshape(3, 3))


def grid_map(src: Grid, ref: Grid) -> np.ndarray:
    """4x4: a voxel index of ``ref`` -> the (fractional) voxel index of ``src`` at the same
    patient point; entries within :data:`SNAP` of a whole number are snapped to it."""
    try:
        m = np.linalg.solve(src.affine(), ref.affine())
    except np.linalg.LinAlgError as exc:
        raise ValueError("a grid with zero spacing or parallel axes has no inverse") from exc
    near = np.round(m)
    return np.where(np.abs(m - near) < SNAP, near, m)


def resample_onto(arr: np.ndarray, src: Grid, ref: Grid) -> tuple[np.ndarray, float]:
    """``arr`` (on ``src``) resampled onto ``ref`` by trilinear interpolation in patient
    space, and the fraction of ``ref`` voxels outside ``src``'s extent (those are 0). Points
    within :data:`EDGE_TOLERANCE` voxel of the extent take the edge value. A ``ref`` equal to
    ``src`` returns a float32 copy. Does not change ``arr``."""
    if arr.shape != src.shape:
        raise ValueError(f"array shape {arr.shape} is not its grid's {src.shape}")
    m = grid_map(src, ref)
    data = np.asarray(arr, np.float32)
    if ref.shape == src.shape and np.array_equal(m, np.eye(4)):
        return data.copy(), 0.0
    out = np.zeros(ref.shape, np.float32)
    rows, cols = np.meshgrid(np.arange(ref.shape[1]), np.arange(ref.shape[2]), indexing="ij")
    plane = m[:3, 1, None, None] * rows + m[:3, 2, None, None] * cols + m[:3, 3, None, None]
    hi = (np.array(src.shape, float) - 1)[:, None, None]
    outside = 0
    for k in range(ref.shape[0]):
        idx = plane + m[:3, 0, None, None] * k
        inside = np.all((idx >= -EDGE_TOLERANCE) & (idx <= hi + EDGE_TOLERANCE), axis=0)
        outside += inside.size - int(np.count_nonzero(inside))
        if inside.any():
            pts = np.clip(idx[:, inside], 0.0, hi[:, :, 0])
            out[k][inside] = map_coordinates(data, pts, order=1, mode="nearest")
    return out, outside / out.size


def _array_slices(path: Path) -> int:
    """The slice count of a cached volume, from its array header (the array is not read)."""
    with zipfile.ZipFile(path) as zf, zf.open("array.npy") as f:
        version = np.lib.format.read_magic(f)
        header = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                  else np.lib.format.read_array_header_2_0(f))
    shape = header[0]
    return int(shape[0]) if shape else 0


def read_series(path: Path) -> ChannelSeries:
    """What grouping needs of one cached volume: UIDs, description, modality, slices."""
    meta = volume_meta(path)
    if not meta:
        raise DataError(str(path), "no converted volume here", "run `fedpacs site ingest`")
    return ChannelSeries(path=path, study_uid=str(meta.get("study_uid") or ""),
                         series_uid=str(meta.get("series_uid") or path.stem),
                         description=str(meta.get("series_description") or ""),
                         modality=str(meta.get("modality") or ""),
                         slices=_array_slices(path))


def rule_matches(rule: ChannelRule, series: ChannelSeries) -> bool:
    """Whether a series is the channel ``rule`` names ([cohort] pattern rule)."""
    return (pattern_matches(rule.description, series.description)
            and pattern_matches(rule.modality, series.modality))


def group_channels(series: Iterable[Path | ChannelSeries], rules: Sequence[ChannelRule]
                   ) -> tuple[list[ChannelCase], list[Skipped]]:
    """One case per study whose series give every channel (see the module docstring for
    missing, ambiguous and repeated series), sorted by StudyInstanceUID; and the studies
    skipped (item: the StudyInstanceUID; kind: ``missing-channel`` or
    ``ambiguous-channel``). Series that match no rule are not used."""
    if not rules:
        raise ValueError("group_channels needs at least one channel rule")
    by_study: dict[str, list[ChannelSeries]] = defaultdict(list)
    for s in series:
        info = s if isinstance(s, ChannelSeries) else read_series(s)
        by_study[info.study_uid or info.series_uid].append(info)
    cases: list[ChannelCase] = []
    skipped: list[Skipped] = []
    for study in sorted(by_study):
        members = sorted(by_study[study], key=lambda s: s.series_uid)
        matched = [[i for i, r in enumerate(rules) if rule_matches(r, s)] for s in members]
        double = [(s, hits) for s, hits in zip(members, matched, strict=True) if len(hits) > 1]
        if double:
            skipped.append(Skipped(study, AMBIGUOUS_CHANNEL, "; ".join(
                f"series {s.series_uid} matches channels "
                + ", ".join(f"{i} {rules[i].label()}" for i in hits) for s, hits in double)
                + ": make the [data] channels patterns exclusive"))
            continue
        candidates = [[s for s, hits in zip(members, matched, strict=True) if i in hits]
                      for i in range(len(rules))]
        missing = [i for i, c in enumerate(candidates) if not c]
        if missing:
            skipped.append(Skipped(study, MISSING_CHANNEL, "no series matches channel " + ", ".join(
                f"{i} {rules[i].label()}" for i in missing)))
            continue
        chosen: list[ChannelSeries] = []
        notes: list[str] = []
        for i, cands in enumerate(candidates):
            pick = min(cands, key=lambda s: (-s.slices, s.series_uid))
            chosen.append(pick)
            if len(cands) > 1:
                notes.append(f"channel {i} {rules[i].label()}: {len(cands)} series match; "
                             f"took {pick.series_uid} ({pick.slices} slices: the most, then "
                             "the lowest SeriesInstanceUID)")
        cases.append(ChannelCase(study, tuple(chosen), tuple(notes)))
    return cases, skipped


def load_channels(case: ChannelCase) -> tuple[np.ndarray, dict[str, Any]]:
    """The case as a (channel, slice, row, column) float32 array on channel 0's grid, and
    channel 0's meta (as load_volume gives it) plus ``channel_series`` (SeriesInstanceUID
    per channel), ``channel_outside`` (fraction of the grid outside each channel's extent)
    and ``notes`` (the case's, and one per channel above :data:`OUTSIDE_NOTE_FRACTION`).
    A channel that does not overlap channel 0 at all is a DataError ``channel-off-grid``."""
    ref_arr, ref_meta = load_volume(case.series[0].path)
    ref = volume_grid(ref_arr.shape, ref_meta)
    channels = [np.asarray(ref_arr, np.float32)]
    fractions = [0.0]
    notes = list(case.notes)
    for i, s in enumerate(case.series[1:], start=1):
        arr, meta = load_volume(s.path)
        values, outside = resample_onto(arr, volume_grid(arr.shape, meta), ref)
        if outside >= 1.0:
            raise DataError(case.study_uid, f"channel {i} (series {s.series_uid}) does not "
                            f"overlap channel 0 (series {case.volume_id}) in patient space",
                            "check that the channels' series are of one scan session, or "
                            "narrow the [data] channels patterns", kind=CHANNEL_OFF_GRID)
        if outside > OUTSIDE_NOTE_FRACTION:
            notes.append(f"channel {i} (series {s.series_uid}) covers {1 - outside:.0%} of "
                         "channel 0's grid; the rest is 0")
        channels.append(values)
        fractions.append(outside)
    out = dict(ref_meta)
    out.update(channel_series=tuple(s.series_uid for s in case.series),
               channel_outside=tuple(fractions), notes=tuple(notes))
    return np.stack(channels), out
