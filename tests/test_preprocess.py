"""A site's [data] window and spacing: parsed from the site config, applied to the PACS
volumes it trains on (CT window before normalisation, resampling before the fit to the
task's shape, masks with nearest); an unknown window preset is a coded config error."""

from __future__ import annotations

import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedpacs.client.config import PacsPreprocess, SiteConfig, parse_site_config
from fedpacs.client.data import load_site_data
from fedpacs.client.dicom import (
    WINDOW_PRESETS,
    prepare_image,
    prepare_mask,
    window_preset,
)
from fedpacs.client.ingest import ingest
from fedpacs.client.pacs import CohortQuery, PacsConfig
from fedpacs.client.volumes import list_volumes, load_volume
from fedpacs.common.datasets import DataSpec, resize, zscore
from fedpacs.common.errors import ConfigError, ExitCode
from fedpacs.common.tasks import TaskConfig
from tests.fakepacs import FakePacs, ct_series

HU = np.array([-1000.0, 0.0, 20.0, 40.0, 80.0, 1000.0], np.float32).reshape(1, 2, 3)


# --------------------------------------------------------------------------- array core
def test_brain_window_clips_ct_to_the_window() -> None:
    out = prepare_image(HU, (1.0, 1.0, 1.0), modality="CT",
                        preprocess=PacsPreprocess(window="brain"))
    # brain: centre 40, width 80 -> HU 0..80 maps linearly to 0..1, the rest is clipped
    assert out.ravel().tolist() == pytest.approx([0, 0, 0.25, 0.5, 1, 1])
    assert out.shape == HU.shape and out.min() >= 0 and out.max() <= 1


def test_window_is_for_ct_only_and_off_by_default() -> None:
    mr = prepare_image(HU, (1.0, 1.0, 1.0), modality="MR",
                       preprocess=PacsPreprocess(window="brain"))
    assert np.array_equal(mr, HU)
    assert np.array_equal(prepare_image(HU, (1.0, 1.0, 1.0), modality="CT",
                                        preprocess=PacsPreprocess()), HU)


def test_resampling_follows_the_spacing_ratio() -> None:
    arr = np.random.default_rng(0).normal(size=(10, 8, 6)).astype(np.float32)
    pp = PacsPreprocess(spacing=(2.0, 0.5, 1.0))
    out = prepare_image(arr, (1.0, 1.0, 1.0), modality="MR", preprocess=pp)
    assert out.shape == (5, 16, 6)  # 10 * 1/2, 8 * 1/0.5, 6 * 1/1
    mask = (arr > 0).astype(np.int64)
    m = prepare_mask(mask, (1.0, 1.0, 1.0), preprocess=pp)
    assert m.shape == out.shape and m.dtype == np.int64 and set(np.unique(m)) <= {0, 1}
    assert prepare_mask(mask, (1.0, 1.0, 1.0), preprocess=PacsPreprocess()) is mask


def test_unknown_window_preset_is_a_coded_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        window_preset(HU, "brian")
    err = info.value
    assert err.code == ExitCode.CONFIG
    [field] = err.errors
    assert field.field == "data.window" and "'brian'" in field.got
    assert "did you mean 'brain'" in field.got
    assert all(name in field.expected for name in WINDOW_PRESETS)
    assert 'window = "brain"' in field.fix


# --------------------------------------------------------------------------- site config
def site(tmp_path: Path, data_extra: str, fmt: str = "pacs") -> SiteConfig:
    (tmp_path / "labels.csv").write_text("SeriesInstanceUID,label\n")
    (tmp_path / "images").mkdir(exist_ok=True)
    text = (f'[site]\nname = "h"\ntask = "pacs-modality"\n[data]\nformat = "{fmt}"\n'
            f'root = "{tmp_path}"\nlabels = "labels.csv"\n{data_extra}\n')
    return parse_site_config(tomllib.loads(text), source="site.toml", base_dir=tmp_path)


def test_site_config_window_and_spacing(tmp_path: Path) -> None:
    cfg = site(tmp_path, 'window = "brain"\nspacing = [2, 0.5, 0.5]')
    assert cfg.preprocess == PacsPreprocess(window="brain", spacing=(2.0, 0.5, 0.5))
    assert site(tmp_path, "").preprocess == PacsPreprocess(window="", spacing=None)


def test_site_config_collects_preprocess_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        site(tmp_path, 'window = "brian"\nspacing = [1.0, -1.0]')
    by_field = {e.field: e for e in info.value.errors}
    assert set(by_field) == {"data.window", "data.spacing"}
    assert "did you mean 'brain'" in by_field["data.window"].got
    assert "[1.0, -1.0]" in by_field["data.spacing"].got
    assert "[slice, row, column]" in by_field["data.spacing"].expected


def test_site_config_preprocess_only_for_pacs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        site(tmp_path, 'window = "lung"\nspacing = [1, 1, 1]', fmt="nifti")
    assert {e.field for e in info.value.errors} == {"data.window", "data.spacing"}
    assert all('format = "pacs"' in e.expected for e in info.value.errors)


# --------------------------------------------------------------------------- data path
@pytest.fixture()
def ct_cache(tmp_path: Path) -> tuple[Path, list[str]]:
    """Two CT series of 6 slices, 2.5 mm apart, ingested from the fake PACS."""
    series = [ct_series(6, slice_mm=2.5), ct_series(6, slice_mm=2.5)]
    s = ingest(PacsConfig(port=1), CohortQuery(), tmp_path / "cache",
               transport=FakePacs(series[0] + series[1]))
    assert s.converted == 2 and s.skipped == []
    return tmp_path / "cache", [str(x[0].SeriesInstanceUID) for x in series]


CLASSIFY = TaskConfig(name="ct-2d", kind="classification", network="resnet18", spatial_dims=2,
                      in_channels=1, num_classes=2, input_shape=(32, 32), width=4)


def test_site_data_windows_and_resamples_pacs_volumes(ct_cache: tuple[Path, list[str]],
                                                      tmp_path: Path) -> None:
    cache, uids = ct_cache
    (tmp_path / "labels.csv").write_text("SeriesInstanceUID,label\n" + "".join(
        f"{u},1\n" for u in uids))
    spec = DataSpec("pacs", cache, val_fraction=0.0, labels=tmp_path / "labels.csv")
    plain = load_site_data(spec, CLASSIFY)
    assert len(plain.train) == 12  # one sample per slice
    # 2.5 mm -> 5 mm between slices: half the slices
    thick = load_site_data(spec, CLASSIFY, preprocess=PacsPreprocess(
        spacing=(5.0, 0.661468, 0.661468)))
    assert len(thick.train) == 6
    brain = load_site_data(spec, CLASSIFY, preprocess=PacsPreprocess(window="brain"))
    arr, _ = load_volume(list_volumes(cache)[0])
    vol = zscore(np.clip((arr - 0.0) / 80.0, 0.0, 1.0))  # brain window by hand, then z-score
    xs = {tuple(np.round(brain.train[i][0][0].numpy(), 4).ravel()[:64])
          for i in range(len(brain.train))}
    assert tuple(np.round(resize(vol[0], (32, 32)), 4).ravel()[:64]) in xs
    assert not np.allclose(brain.train[0][0].numpy(), plain.train[0][0].numpy())


def test_site_data_resamples_masks_with_nearest(ct_cache: tuple[Path, list[str]],
                                                tmp_path: Path) -> None:
    cache, uids = ct_cache
    rows = []
    for p in list_volumes(cache):
        arr, meta = load_volume(p)
        mask = (arr > np.median(arr)).astype(np.uint8)  # (slice, row, column)
        nib.save(nib.Nifti1Image(np.transpose(mask), np.eye(4)), tmp_path / f"{p.stem}.nii.gz")
        rows.append(f"{meta['series_uid']},{p.stem}.nii.gz\n")
    (tmp_path / "labels.csv").write_text("SeriesInstanceUID,mask\n" + "".join(rows))
    task = TaskConfig(name="ct-seg", kind="segmentation", network="unet", spatial_dims=2,
                      in_channels=1, num_classes=2, input_shape=(32, 32), width=4)
    spec = DataSpec("pacs", cache, val_fraction=0.0, labels=tmp_path / "labels.csv")
    data = load_site_data(spec, task, preprocess=PacsPreprocess(
        window="abdomen", spacing=(5.0, 0.661468, 0.661468)))
    assert len(data.train) == 6 and data.skipped == []
    ys = np.stack([data.train[i][1].numpy() for i in range(len(data.train))])
    assert set(np.unique(ys)) == {0, 1}  # nearest: labels stay labels
