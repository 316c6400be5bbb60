"""Multi-channel PACS cases ([data] channels): the series of a study grouped by rule, every
channel resampled onto channel 0's grid in patient space, and the site config's checks.

Real data: the brain MR studies of the shared data (TCIA Brain-Tumor-Progression; see
dicom_brainmr/PROVENANCE.md). Study1's registered T1post/T2/FLAIR series as they are, and
series derived from its real T1post images (new UIDs, a SeriesDescription per channel, the
geometry shifted by whole voxels or halved in resolution), imported with the site's own
``import_folder`` into a temporary cache.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DSfloat

from fedpacs.client.channels import (
    AMBIGUOUS_CHANNEL,
    CHANNEL_OFF_GRID,
    MISSING_CHANNEL,
    ChannelCase,
    Grid,
    group_channels,
    load_channels,
    read_series,
    resample_onto,
)
from fedpacs.client.config import ChannelRule, SiteConfig, parse_site_config
from fedpacs.client.ingest import import_folder
from fedpacs.client.volumes import list_volumes, load_volume
from fedpacs.common.errors import ConfigError, DataError
from fedpacs.common.tasks import MAX_CHANNELS

RULES = (ChannelRule("*T1*"), ChannelRule("*T2*"), ChannelRule("*FLAIR*"))
SHIFT = (1, 3, -5)  # (slice, row, column) voxels the "T2 shifted" series' origin moves by
SLICES, CROP = slice(8, 14), slice(128, 384)  # 6 slices of 256 x 256 of the real T1post


# --------------------------------------------------------------------------- array core
def test_grid_affine_is_the_hand_computed_voxel_to_patient_map() -> None:
    # column axis along +y, row axis along -x, slices along +z (as dicom.Volume.direction)
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    grid = Grid((2, 3, 4), (3.0, 2.0, 0.5), (10.0, 20.0, 30.0), direction)
    # voxel (slice 1, row 2, column 3): 10 - 2*2, 20 + 3*0.5, 30 + 1*3
    assert grid.affine() @ np.array([1, 2, 3, 1.0]) == pytest.approx([6.0, 21.5, 33.0, 1.0])
    assert grid.affine() @ np.array([0, 0, 0, 1.0]) == pytest.approx([10.0, 20.0, 30.0, 1.0])


def test_resample_onto_matches_hand_computed_values() -> None:
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    src = Grid((2, 3, 4), (3.0, 2.0, 0.5), (10.0, 20.0, 30.0), direction)
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    before = arr.copy()
    # half a column (0.25 mm along the column axis, +y) further: column j of the new grid is
    # column j + 0.5 of src, the mean of columns j and j + 1; column 3 falls off (0)
    moved = Grid((2, 3, 4), (3.0, 2.0, 0.5), (10.0, 20.25, 30.0), direction)
    out, outside = resample_onto(arr, src, moved)
    want = np.zeros_like(arr)
    want[:, :, :3] = (arr[:, :, :3] + arr[:, :, 1:]) / 2
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert outside == pytest.approx(6 / 24)
    # rows and columns swapped (their axes and spacings): the same points, transposed
    swapped = Grid((2, 4, 3), (3.0, 0.5, 2.0), (10.0, 20.0, 30.0), direction[[1, 0, 2]])
    out, outside = resample_onto(arr, src, swapped)
    np.testing.assert_array_equal(out, arr.transpose(0, 2, 1))
    assert outside == 0.0
    # the same grid: an unchanged copy; the input is never modified
    out, outside = resample_onto(arr, src, src)
    np.testing.assert_array_equal(out, arr)
    assert outside == 0.0 and out is not arr
    np.testing.assert_array_equal(arr, before)


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def study1_cache(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Study1 (T1post, T1pre_reg, FLAIR_reg, T2_reg, HippoCrop) in a cache."""
    cache = tmp_path_factory.mktemp("study1") / "cache"
    summary = import_folder(data_dir / "dicom_brainmr" / "Study1", cache)
    assert summary.converted == 5 and not summary.skipped, summary.lines()
    return cache


def test_real_registered_series_become_one_case_in_rule_order(study1_cache: Path) -> None:
    rules = (ChannelRule("*t1POST*"), ChannelRule("*T2*"), ChannelRule("*FLAIR*", "MR"))
    cases, skipped = group_channels(list_volumes(study1_cache), rules)
    assert skipped == [] and len(cases) == 1
    case = cases[0]
    assert [s.description for s in case.series] == ["T1post", "T2_reg", "FLAIR_reg"]
    assert case.notes == () and case.volume_id == case.series[0].series_uid
    arr, meta = load_channels(case)
    assert arr.shape == (3, 22, 512, 512) and arr.dtype == np.float32
    for c, s in enumerate(case.series):  # registered on one grid: taken as they are
        np.testing.assert_array_equal(arr[c], load_volume(s.path)[0])
    ref_meta = load_volume(case.series[0].path)[1]
    assert meta["patient_key"] == ref_meta["patient_key"] != ""
    assert meta["series_uid"] == case.volume_id
    assert meta["channel_outside"] == (0.0, 0.0, 0.0)
    assert meta["channel_series"] == tuple(s.series_uid for s in case.series)


def test_a_rule_matching_two_series_takes_the_lowest_uid_of_equal_size(
        study1_cache: Path) -> None:
    cases, skipped = group_channels(list_volumes(study1_cache), RULES)
    assert skipped == [] and len(cases) == 1
    t1 = sorted((read_series(p) for p in list_volumes(study1_cache)
                 if read_series(p).description in ("T1post", "T1pre_reg")),
                key=lambda s: s.series_uid)
    assert t1[0].slices == t1[1].slices == 22
    assert cases[0].series[0] == t1[0]
    assert len(cases[0].notes) == 1
    assert "channel 0 '*T1*': 2 series match" in cases[0].notes[0]
    assert t1[0].series_uid in cases[0].notes[0]


# --------------------------------------------------------------------------- derived series
@dataclass(frozen=True)
class Source:
    """6 real T1post slices, cropped, on a regular grid: the pixels of every derived series."""

    slices: tuple[Dataset, ...]
    pixels: np.ndarray  # (slice, row, column) int16
    origin: np.ndarray  # patient position of voxel (0, 0, 0)
    row: np.ndarray     # unit vector of increasing column index (IOP row cosine)
    col: np.ndarray     # unit vector of increasing row index (IOP column cosine)
    normal: np.ndarray
    dz: float
    ps: float


def _uid(*parts: str) -> UID:
    return generate_uid(entropy_srcs=["fedpacs test_channels", *parts])


def _ds(v: float) -> DSfloat:
    return DSfloat(float(v), auto_format=True)


def read_source(folder: Path) -> Source:
    dss = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.dot([float(v) for v in d.ImagePositionPatient], normal)))
    chosen = dss[SLICES]
    ps = float(chosen[0].PixelSpacing[0])
    assert ps == float(chosen[0].PixelSpacing[1])
    first = np.array([float(v) for v in chosen[0].ImagePositionPatient])
    origin = first + CROP.start * ps * (row + col)
    pixels = np.stack([d.pixel_array[CROP, CROP] for d in chosen]).astype(np.int16)
    return Source(tuple(chosen), pixels, origin, row, col, normal, 6.5, ps)


def write_series(src: Source, out: Path, *, study: str, patient: str, description: str,
                 shift: tuple[int, int, int] = (0, 0, 0), half: bool = False, count: int = 6,
                 far_mm: float = 0.0) -> str:
    """A new series of ``src``'s pixels: its origin moved by ``shift`` voxels (and
    ``far_mm`` along the normal), or at half the in-plane resolution (2 x 2 means, each
    pixel centred on the block it averages)."""
    series = _uid(study, description)
    a, b, c = shift
    origin = (src.origin + (a * src.dz + far_mm) * src.normal + b * src.ps * src.col
              + c * src.ps * src.row)
    ps = src.ps
    if half:
        origin = origin + 0.5 * ps * (src.row + src.col)
        ps = 2 * ps
    (out / series).mkdir(parents=True)
    for k in range(count):
        px = src.pixels[k]
        if half:
            n = px.shape[0] // 2
            px = np.round(px.reshape(n, 2, n, 2).mean(axis=(1, 3))).astype(np.int16)
        ds = copy.deepcopy(src.slices[k])
        sop = _uid(series, str(k))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = UID(study), UID(series)
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SeriesDescription, ds.PatientID, ds.InstanceNumber = description, patient, k + 1
        ds.Rows, ds.Columns = px.shape
        ds.PixelData = px.tobytes()
        ds.PixelSpacing = [_ds(ps), _ds(ps)]
        ds.ImageOrientationPatient = [_ds(v) for v in (*src.row, *src.col)]
        ds.ImagePositionPatient = [_ds(v) for v in origin + k * src.dz * src.normal]
        for tag in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if tag in ds:
                delattr(ds, tag)
        ds.save_as(out / series / f"{k:03d}.dcm")
    return series


@dataclass(frozen=True)
class Derived:
    cache: Path
    studies: dict[str, str]  # name -> StudyInstanceUID
    series: dict[str, str]   # "study/description" -> SeriesInstanceUID
    source: Source


@pytest.fixture(scope="module")
def derived(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Derived:
    """Four studies of series derived from the real T1post:

    * A: T1, T2 shifted by SHIFT voxels, FLAIR at half resolution (described in lower
      case), and a 4-slice T1 repeat;
    * B: T1 and T2 only (no FLAIR); C: T1, T2 and a "T2 FLAIR" that matches two rules;
    * D: T1, T2 and a FLAIR 1 m away along the slice normal (no overlap).
    """
    src = read_source(data_dir / "dicom_brainmr" / "Study1" / "12-T1post-05670")
    root = tmp_path_factory.mktemp("derived")
    dicom = root / "dicom"
    studies = {name: str(_uid("study", name)) for name in "ABCD"}
    plan: dict[str, list[tuple[str, dict[str, object]]]] = {
        "A": [("T1", {}), ("T2 shifted", {"shift": SHIFT}), ("flair half", {"half": True}),
              ("T1 repeat", {"count": 4})],
        "B": [("T1", {}), ("T2", {})],
        "C": [("T1", {}), ("T2", {}), ("T2 FLAIR", {})],
        "D": [("T1", {}), ("T2", {}), ("FLAIR", {"far_mm": 1000.0})],
    }
    series = {f"{name}/{desc}": write_series(src, dicom, study=studies[name],
                                             patient=f"P{name}", description=desc,
                                             **kw)  # type: ignore[arg-type]
              for name, items in plan.items() for desc, kw in items}
    summary = import_folder(dicom, root / "cache")
    assert summary.converted == len(series) and not summary.skipped, summary.lines()
    return Derived(root / "cache", studies, series, src)


def _case(cases: list[ChannelCase], study: str) -> ChannelCase:
    return next(c for c in cases if c.study_uid == study)


def test_group_channels_by_study_skips_missing_and_ambiguous(derived: Derived) -> None:
    paths = list_volumes(derived.cache)
    cases, skipped = group_channels(paths, RULES)
    st = derived.studies
    assert [c.study_uid for c in cases] == sorted([st["A"], st["D"]])
    a = _case(cases, st["A"])
    assert [s.description for s in a.series] == ["T1", "T2 shifted", "flair half"]
    assert a.volume_id == derived.series["A/T1"]
    assert len(a.notes) == 1 and "channel 0 '*T1*': 2 series match" in a.notes[0]
    assert f"took {derived.series['A/T1']} (6 slices" in a.notes[0]
    by_study = {s.item: s for s in skipped}
    assert set(by_study) == {st["B"], st["C"]}
    assert by_study[st["B"]].kind == MISSING_CHANNEL
    assert by_study[st["B"]].reason == "no series matches channel 2 '*FLAIR*'"
    c = by_study[st["C"]]
    assert c.kind == AMBIGUOUS_CHANNEL
    assert derived.series["C/T2 FLAIR"] in c.reason and "channels 1 '*T2*', 2 '*FLAIR*'" in c.reason
    assert "T2 FLAIR" not in c.reason  # a series is named by its UID, not its description
    # independent of the order the volumes are listed in
    again, skipped_again = group_channels(list(reversed(paths)), RULES)
    assert again == cases and skipped_again == skipped


def test_shifted_channel_is_resampled_back_by_whole_voxels(derived: Derived) -> None:
    a = _case(group_channels(list_volumes(derived.cache), RULES)[0], derived.studies["A"])
    arr, meta = load_channels(a)
    ref = arr[0]
    assert arr.shape == (3, 6, 256, 256)
    np.testing.assert_array_equal(ref, derived.source.pixels.astype(np.float32))
    # origin moved by (1, 3, -5) voxels: channel 1 at (k, i, j) is the image at
    # (k - 1, i - 3, j + 5); the rest of the grid is outside it (0)
    np.testing.assert_allclose(arr[1, 1:, 3:, :-5], ref[:-1, :-3, 5:], atol=1e-2)
    inside = np.zeros(ref.shape, bool)
    inside[1:, 3:, :-5] = True
    assert not arr[1][~inside].any()
    covered = (5 / 6) * (253 / 256) * (251 / 256)
    assert meta["channel_outside"][1] == pytest.approx(1 - covered)
    assert any(n.startswith(f"channel 1 (series {derived.series['A/T2 shifted']}) covers 81%")
               for n in meta["notes"])


def test_half_resolution_channel_matches_the_reference(derived: Derived) -> None:
    a = _case(group_channels(list_volumes(derived.cache), RULES)[0], derived.studies["A"])
    arr, meta = load_channels(a)
    half, _ = load_volume(a.series[2].path)
    assert half.shape == (6, 128, 128)
    # reference rows/columns 1..254 lie within the half-resolution grid, 0 and 255 do not
    defined = np.zeros(arr.shape[1:], bool)
    defined[:, 1:-1, 1:-1] = True
    assert not arr[2][~defined].any()
    assert meta["channel_outside"][2] == pytest.approx(1 - (254 / 256) ** 2)
    assert np.corrcoef(arr[2][defined], arr[0][defined])[0, 1] > 0.99
    # reference pixel 2m + 1 is half-grid pixel m + 1/4: bilinear weights 3/4 and 1/4
    want = (0.5625 * half[:, :-1, :-1] + 0.1875 * half[:, 1:, :-1]
            + 0.1875 * half[:, :-1, 1:] + 0.0625 * half[:, 1:, 1:])
    np.testing.assert_allclose(arr[2][:, 1:254:2, 1:254:2], want, atol=1e-2)
    assert all("channel 2" not in n for n in meta["notes"])  # 1.6% outside: no note


def test_channel_that_does_not_overlap_is_off_grid(derived: Derived) -> None:
    d = _case(group_channels(list_volumes(derived.cache), RULES)[0], derived.studies["D"])
    with pytest.raises(DataError) as info:
        load_channels(d)
    assert info.value.kind == CHANNEL_OFF_GRID
    assert info.value.path == derived.studies["D"]
    assert derived.series["D/FLAIR"] in info.value.problem


# --------------------------------------------------------------------------- site config
def site(tmp_path: Path, data_extra: str, *, fmt: str = "pacs", in_channels: int = 3
         ) -> SiteConfig:
    (tmp_path / "labels.csv").write_text("SeriesInstanceUID,label\n")
    (tmp_path / "images").mkdir(exist_ok=True)
    text = (f'[site]\nname = "h"\ntask = "mc"\n[data]\nformat = "{fmt}"\n'
            f'root = "{tmp_path}"\nlabels = "labels.csv"\n{data_extra}\n'
            '[task]\nname = "mc"\nkind = "classification"\nnetwork = "resnet18"\n'
            f"spatial_dims = 3\nin_channels = {in_channels}\nnum_classes = 2\n"
            "input_shape = [8, 8, 8]\n")
    return parse_site_config(tomllib.loads(text), source="site.toml", base_dir=tmp_path)


def test_site_config_channels(tmp_path: Path) -> None:
    cfg = site(tmp_path, 'channels = [" *T1* ", "*T2*", {description = "*FLAIR*", '
               'modality = "MR"}]')
    assert cfg.preprocess.channels == (ChannelRule("*T1*"), ChannelRule("*T2*"),
                                       ChannelRule("*FLAIR*", "MR"))
    one = site(tmp_path, "", in_channels=1)
    assert one.preprocess.channels == ()


def test_site_config_collects_channel_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        site(tmp_path, 'channels = ["*T1*", 3, "", {description = "*T2*", echo = "1"}, '
             '"*t1*"]\nspacing = [1, -1]', in_channels=3)
    by_field = {e.field: e for e in info.value.errors}
    assert set(by_field) == {"data.channels[1]", "data.channels[2]", "data.channels[3]",
                             "data.channels[4]", "data.spacing", "data.channels"}
    assert "channels[0]" in by_field["data.channels[4]"].got  # patterns ignore case
    assert by_field["data.channels[1]"].got == "3 (int)"
    assert "echo" in by_field["data.channels[3]"].got
    count = by_field["data.channels"]
    assert (count.expected, count.got) == ("3 channel rule(s), the in_channels of task 'mc'",
                                           "5")
    with pytest.raises(ConfigError) as info:
        site(tmp_path, 'channels = "*T1*"', in_channels=1)
    (err,) = info.value.errors
    assert err.field == "data.channels" and err.got == "'*T1*' (str)"
    assert "channels = [" in err.fix
    with pytest.raises(ConfigError) as info:
        site(tmp_path, f"channels = {['*T1*'] * (MAX_CHANNELS + 1)}")
    assert f"1..{MAX_CHANNELS}" in info.value.errors[0].expected


def test_site_config_duplicate_channel_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        site(tmp_path, 'channels = ["*T1*", "*T2*", "*T1*"]')
    (err,) = info.value.errors
    assert err.field == "data.channels[2]" and "channels[0]" in err.got


def test_site_config_channels_only_for_pacs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        site(tmp_path, 'channels = ["*T1*", "*T2*", "*FLAIR*"]', fmt="nifti")
    assert [e.field for e in info.value.errors] == ["data.channels"]
    assert 'format = "pacs"' in info.value.errors[0].expected
    assert info.value.errors[0].got == "format 'nifti'"


def test_site_config_multichannel_task_needs_channels(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        site(tmp_path, "", in_channels=2)
    (err,) = info.value.errors
    assert err.field == "data.channels"
    assert err.expected == "2 channel rules for task 'mc' (in_channels 2)"
    assert "in_channels = 1" in err.fix


# --------------------------------------------------------------------------- site data
def test_site_data_stacks_each_studys_channels_and_skips_the_rest(derived: Derived) -> None:
    """client.data forms the cases from the rules and feeds the task one channel per rule,
    each prepared and z-scored on its own; studies the rules cannot form are skipped."""
    from fedpacs.client.config import PacsPreprocess
    from fedpacs.client.data import _pacs_arrays, pacs_cases
    from fedpacs.common.datasets import resize, zscore
    from fedpacs.common.tasks import TaskConfig

    prep = PacsPreprocess(channels=RULES)
    cases, skipped, notes = pacs_cases(derived.cache, prep)
    st = derived.studies
    assert sorted(cases) == sorted([derived.series["A/T1"], derived.series["D/T1"]])
    assert sorted(item for item, _ in skipped) == sorted([st["B"], st["C"]])
    assert any(why.startswith(f"{MISSING_CHANNEL}: ") for _, why in skipped)
    assert len(notes) == 1 and "2 series match" in notes[0]
    task = TaskConfig(name="t", kind="classification", network="resnet18", spatial_dims=2,
                      in_channels=3, num_classes=2, input_shape=(32, 32))
    labels: dict[str, int | Path] = {st["A"]: 1, st["D"]: 0}  # by StudyInstanceUID
    ds, skips = _pacs_arrays(derived.cache, list(cases.values()), labels, task, prep)
    assert [why.split(":")[0] for _, why in skips] == [CHANNEL_OFF_GRID]  # study D
    x, y = ds.tensors
    assert tuple(x.shape) == (6, 3, 32, 32) and y.tolist() == [1] * 6  # A's 6 slices
    a = cases[derived.series["A/T1"]]
    stacked, _ = load_channels(_case(group_channels(list_volumes(derived.cache), RULES)[0],
                                     st["A"]))
    for c in range(3):  # each channel z-scored alone, then its slices resized
        expect = np.stack([resize(s, (32, 32)) for s in zscore(stacked[c])])
        np.testing.assert_allclose(x[:, c].numpy(), expect, rtol=1e-5, atol=1e-5)
    one = TaskConfig(name="t1", kind="classification", network="resnet18", spatial_dims=2,
                     in_channels=1, num_classes=2, input_shape=(32, 32))
    ds1, skips1 = _pacs_arrays(derived.cache, [a], labels, one, prep)
    assert len(ds1) == 0 and "expects in_channels = 1" in skips1[0][1]
