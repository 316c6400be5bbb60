"""Native resolution (a task's sampling = "patches") on real data: random input_shape
patches weighted toward foreground, cases streamed from disk (no arrays held), a task's
spacing resampling NIfTI and PACS cases alike, CT windowing, multi-channel (4D) NIfTI with
in_channels checked, sliding-window evaluation of whole cases (checked against a direct
forward pass) and a federation whose held-out Dice comes from whole cases."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pickle
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn

from fedpacs.client.config import PacsPreprocess
from fedpacs.client.data import load_site_data
from fedpacs.client.dicom import WINDOW_PRESETS, build_volume
from fedpacs.client.volumes import save_volume, volume_path
from fedpacs.common import engine, metrics
from fedpacs.common.config import DataSpec, RunConfig
from fedpacs.common.datasets import (
    NiftiReader,
    list_nifti_cases,
    load_holdout,
    load_partition,
    nifti_readers,
    zscore,
)
from fedpacs.common.errors import ConfigError, DataError
from fedpacs.common.patches import CaseDataset, PatchDataset, patch_seed
from fedpacs.common.tasks import TASK_PRESETS, TaskConfig

HIPPO = TASK_PRESETS["hippocampus"]
PATCHES = dataclasses.replace(HIPPO, name="hippo-patches", sampling="patches",
                              input_shape=(16, 16, 16), width=4)
CT_SERIES = "Philips_Ingenuity_phantom/S2010_STD_BRAIN_5MM"


def hippo(data_dir: Path) -> Path:
    return data_dir / "msd_hippocampus_udacity"


def case_reader(data_dir: Path, task: TaskConfig, index: int = 0) -> NiftiReader:
    cases, _ = list_nifti_cases(hippo(data_dir))
    readers, skipped = nifti_readers([cases[index]], task)
    assert not skipped
    return readers[0]


# --------------------------------------------------------------------------- patches
def test_patches_have_the_input_shape_and_favour_foreground(data_dir: Path) -> None:
    task = dataclasses.replace(PATCHES, input_shape=(8, 8, 8))
    reader = case_reader(data_dir, task)
    image, label = reader.read()
    assert image.shape[1:] == label.shape[1:] and image.shape[0] == 1
    assert all(n > 8 for n in label.shape[1:])  # the case is larger than a patch
    ds = PatchDataset([reader], task)
    patches = [ds.drawn(seed=3, epoch=e)[0] for e in range(90)]
    assert all(x.shape == (1, 8, 8, 8) and y.shape == (1, 8, 8, 8) for x, y in patches)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in patches)
    weighted = float(np.mean([float((y > 0).float().mean()) for _, y in patches]))
    # uniform patches (every position inside the case equally likely), measured alike
    # (seeded: 0.37 weighted, 0.086 uniform; the case holds 4.7% foreground)
    rng = np.random.default_rng(0)
    lab = label[0]
    uniform = []
    for _ in range(2000):
        start = [int(rng.integers(0, n - 8 + 1)) for n in lab.shape]
        crop = lab[tuple(slice(s, s + 8) for s in start)]
        uniform.append(float((crop > 0).mean()))
    assert weighted > 2 * float(np.mean(uniform)), (weighted, float(np.mean(uniform)))
    # a patch's voxels are the case's: the label patch is the label at the image's offset
    x, y = patches[0]
    hits = [(i, j, k) for i in range(lab.shape[0] - 7) for j in range(lab.shape[1] - 7)
            for k in range(lab.shape[2] - 7)
            if np.array_equal(image[0, i:i + 8, j:j + 8, k:k + 8], x[0].numpy())]
    assert len(hits) == 1
    (i, j, k), = hits
    assert np.array_equal(lab[i:i + 8, j:j + 8, k:k + 8], y[0].numpy())


def test_patches_are_seeded_by_seed_epoch_and_index(data_dir: Path) -> None:
    ds = PatchDataset([case_reader(data_dir, PATCHES, i) for i in range(3)], PATCHES)
    a = ds.drawn(seed=5, epoch=1)
    again = ds.drawn(seed=5, epoch=1)
    for i in (2, 0, 1):  # any order
        assert torch.equal(a[i][0], again[i][0]) and torch.equal(a[i][1], again[i][1])
    other = ds.drawn(seed=5, epoch=2)
    assert any(not torch.equal(a[i][0], other[i][0]) for i in range(3))
    assert patch_seed(5, 1, 0) != patch_seed(5, 1, 1) != patch_seed(6, 1, 1)


def test_a_case_smaller_than_the_patch_is_padded_whole(data_dir: Path) -> None:
    task = dataclasses.replace(PATCHES, input_shape=(48, 64, 48))
    reader = case_reader(data_dir, task)
    image, label = reader.read()
    x, y = PatchDataset([reader], task)[0]
    assert x.shape == (1, 48, 64, 48)
    assert int((y > 0).sum()) == int((label > 0).sum())  # nothing cut off
    assert float(x.abs().sum()) == pytest.approx(float(np.abs(image).sum()), rel=1e-5)


# --------------------------------------------------------------------------- streaming
class _NoArrays(pickle.Pickler):
    def persistent_id(self, obj: Any) -> None:
        if isinstance(obj, np.ndarray | torch.Tensor):
            raise AssertionError(f"a streaming data set holds an array {tuple(obj.shape)}")
        return None


def _pickled_size(obj: Any) -> int:
    buf = io.BytesIO()
    _NoArrays(buf).dump(obj)
    return len(buf.getvalue())


def test_streaming_sets_hold_no_voxels(data_dir: Path) -> None:
    """What a site keeps (and its warm parent forks) is one small reader per case: no
    array anywhere in the data set, and a size per case independent of the cohort."""
    task = dataclasses.replace(PATCHES, input_shape=(48, 64, 48))
    sizes = {}
    for parts in (20, 5):  # ~8 and ~33 training cases
        spec = DataSpec(format="nifti", root=hippo(data_dir), partition=0,
                        num_partitions=parts)
        data = load_partition(spec, task)
        assert isinstance(data.train, PatchDataset) and isinstance(data.val, CaseDataset)
        sizes[len(data.train)] = _pickled_size(data.train) / len(data.train)
        fit = load_partition(spec, HIPPO)  # the eager arrays: the same cases, in memory
        assert len(fit.train) == len(data.train)
        with pytest.raises(AssertionError, match="array"):
            _pickled_size(fit.train)
    small, large = sorted(sizes)
    assert large > 3 * small
    assert sizes[large] < 1.2 * sizes[small] and sizes[large] < 2048, sizes


# --------------------------------------------------------------------------- 4D NIfTI
def _write_4d_site(data_dir: Path, root: Path, n: int) -> list[str]:
    """``n`` real hippocampus cases as 2-channel 4D NIfTI (the image, and its negative
    scaled by 2 as a second modality) plus one case of 3 channels; returns its ids."""
    cases, _ = list_nifti_cases(hippo(data_dir))
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ids: list[str] = []
    for c in cases[:n + 1]:
        img = nib.load(str(c.image))
        arr = np.asarray(img.dataobj).astype(np.float32)  # type: ignore[attr-defined]
        chans = [arr, 2.0 * (arr.max() - arr)] + ([np.sqrt(arr)] if len(ids) == n else [])
        nib.save(nib.Nifti1Image(np.stack(chans, axis=-1),
                                 img.affine),  # type: ignore[attr-defined]
                 str(root / "images" / c.image.name))
        assert c.label is not None
        (root / "labels" / c.label.name).write_bytes(c.label.read_bytes())
        ids.append(c.case_id)
    return ids


def test_4d_nifti_reads_as_channels_and_a_wrong_count_is_skipped(data_dir: Path,
                                                                  tmp_path: Path) -> None:
    root = tmp_path / "brats-like"
    ids = _write_4d_site(data_dir, root, 5)
    two = dataclasses.replace(HIPPO, name="two-channel", in_channels=2)
    spec = DataSpec(format="nifti", root=root, holdout_fraction=0.0, val_fraction=0.0)
    fit = load_partition(spec, two)
    assert isinstance(fit.train, torch.utils.data.TensorDataset)
    x, y = fit.train.tensors
    assert x.shape == (5, 2, 48, 64, 48) and y.shape == (5, 1, 48, 64, 48)
    (path, why), = fit.skipped
    assert path.endswith(f"{ids[-1]}.nii.gz")
    assert "3 channel(s)" in why and "in_channels = 2" in why
    # channel 0 is the 1-channel reader's sample of the original file, bit for bit;
    # channel 1 (a scaled negative) z-scores to its negative (the padding 0 in both)
    originals = tmp_path / "originals"
    for sub in ("images", "labels"):
        (originals / sub).mkdir(parents=True)
        for cid in ids[:5]:
            name = f"{cid}.nii.gz"
            (originals / sub / name).write_bytes((hippo(data_dir) / sub / name).read_bytes())
    one = load_partition(dataclasses.replace(spec, root=originals), HIPPO)
    assert isinstance(one.train, torch.utils.data.TensorDataset)
    assert torch.equal(x[:, :1], one.train.tensors[0])
    assert torch.allclose(x[:, 1], -x[:, 0], atol=1e-4)
    # streamed ("patches"): the same skip, 2-channel patches
    streamed = load_partition(spec, dataclasses.replace(two, sampling="patches",
                                                        input_shape=(16, 16, 16)))
    assert [p for p, _ in streamed.skipped] == [path]
    assert streamed.train[0][0].shape == (2, 16, 16, 16)
    # the DataError itself names the file, the channels found and expected, and the fix
    reader_cases, _ = list_nifti_cases(root)
    bad = [c for c in reader_cases if c.case_id == ids[-1]]
    with pytest.raises(DataError) as err:
        NiftiReader(bad[0], two).read()
    text = str(err.value)
    assert ids[-1] in text and "3 channel(s)" in text and "in_channels = 2" in text
    assert "Fix:" in text and err.value.kind == "channels"


# --------------------------------------------------------------------------- spacing, CT
def _ct_cache(data_dir: Path, root: Path, *, modality: str = "CT") -> tuple[Path, Any]:
    """A PACS cache holding the real head-phantom CT series (as the ingest converts it) and
    a label manifest: its mask is the phantom's voxels above 0 HU (class 1)."""
    files = sorted(p for p in (data_dir / "dicom_ct_dcmqa" / CT_SERIES).iterdir()
                   if p.is_file())
    vol = build_volume(files)
    save_volume(volume_path(root, vol.series_uid), array=vol.array, spacing=vol.spacing,
                origin=vol.origin, direction=vol.direction,
                meta={"modality": modality, "study_uid": vol.study_uid,
                      "series_uid": vol.series_uid, "series_description": ""})
    mask = (vol.array > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(np.transpose(mask), np.eye(4)), str(root / "mask.nii.gz"))
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([("SeriesInstanceUID", "mask"), (vol.series_uid, "mask.nii.gz")])
    return root / "labels.csv", vol


CT_TASK = TaskConfig(name="ct-head", kind="segmentation", network="unet", spatial_dims=3,
                     in_channels=1, num_classes=2, input_shape=(32, 32, 16), width=4,
                     sampling="patches", spacing=(2.0, 2.0, 5.0))


def test_task_spacing_resamples_a_real_ct_and_the_window_applies_to_ct_only(
        data_dir: Path, tmp_path: Path) -> None:
    labels, vol = _ct_cache(data_dir, tmp_path / "ct")
    spec = DataSpec(format="pacs", root=tmp_path / "ct", labels=labels, holdout_fraction=0.0,
                    val_fraction=1.0)
    data = load_site_data(spec, CT_TASK, preprocess=PacsPreprocess(window="brain"))
    assert isinstance(data.val, CaseDataset) and len(data.val) == 1 and not data.skipped
    x, y = data.val[0]
    s, r, c = vol.array.shape  # (slice, row, column) at vol.spacing mm
    want = (round(c * vol.spacing[2] / 2.0), round(r * vol.spacing[1] / 2.0),
            round(s * vol.spacing[0] / 5.0))
    assert vol.spacing[1] < 1.0 and x.shape == (1, *want) and y.shape == (1, *want)
    # independently: trilinear to the task's grid, the brain window (40, 80) to [0, 1],
    # then z-scored; laid out (column, row, slice)
    grid = torch.nn.functional.interpolate(torch.from_numpy(vol.array)[None, None],
                                           size=want[::-1], mode="trilinear",
                                           align_corners=False)[0, 0].numpy()
    centre, width = WINDOW_PRESETS["brain"]
    windowed = np.clip((grid - (centre - width / 2)) / width, 0.0, 1.0)
    assert windowed.min() == 0.0 and windowed.max() == 1.0
    np.testing.assert_allclose(x[0].numpy(), np.transpose(zscore(windowed)), atol=1e-4)
    assert set(np.unique(y.numpy())) == {0, 1}
    # an MR series is not windowed: z-scored HU-free values
    labels_mr, _ = _ct_cache(data_dir, tmp_path / "mr", modality="MR")
    mr = load_site_data(DataSpec(format="pacs", root=tmp_path / "mr", labels=labels_mr,
                                 holdout_fraction=0.0, val_fraction=1.0), CT_TASK,
                        preprocess=PacsPreprocess(window="brain"))
    np.testing.assert_allclose(mr.val[0][0][0].numpy(), np.transpose(zscore(grid)), atol=1e-4)


def test_a_site_spacing_contradicting_the_tasks_is_refused(data_dir: Path,
                                                          tmp_path: Path) -> None:
    labels, _ = _ct_cache(data_dir, tmp_path / "ct")
    spec = DataSpec(format="pacs", root=tmp_path / "ct", labels=labels, holdout_fraction=0.0,
                    val_fraction=1.0)
    with pytest.raises(ConfigError) as err:
        load_site_data(spec, CT_TASK, preprocess=PacsPreprocess(spacing=(5.0, 1.0, 1.0)))
    (e,) = err.value.errors
    assert e.field == "data.spacing" and "[5.0, 2.0, 2.0]" in e.expected and "remove" in e.fix
    # the same spacing, written in the site's (slice, row, column) order, is accepted
    same = load_site_data(spec, CT_TASK, preprocess=PacsPreprocess(spacing=(5.0, 2.0, 2.0)))
    assert same.val[0][0].shape[1:] == load_site_data(spec, CT_TASK).val[0][0].shape[1:]


def test_task_spacing_resamples_nifti_cases(data_dir: Path) -> None:
    """Hippocampus is 1 mm isotropic: 2 mm halves every side (rounded)."""
    reader = case_reader(data_dir, PATCHES)
    native, _ = reader.read()
    coarse = NiftiReader(reader.case, dataclasses.replace(PATCHES, spacing=(2.0, 2.0, 2.0)))
    image, label = coarse.read()
    assert image.shape[1:] == label.shape[1:] == tuple(round(n / 2) for n in native.shape[1:])


# --------------------------------------------------------------------------- sliding window
def test_sliding_window_equals_a_full_forward_pass() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 20, 24, 18)
    conv = nn.Conv3d(1, 3, 3, padding=1)  # fully convolutional: roi covering the case
    with torch.no_grad():
        assert torch.allclose(engine.sliding_logits(conv, x, (20, 24, 18)), conv(x),
                              atol=1e-5)
        pointwise = nn.Conv3d(1, 3, 1)  # no context: any window gives the same voxel
        stitched = engine.sliding_logits(pointwise, x, (8, 8, 8))
        assert torch.allclose(stitched, pointwise(x), atol=1e-5)


def test_whole_case_evaluation_is_the_cases_own_dice(data_dir: Path) -> None:
    """evaluate() on streamed whole cases (patches) equals the metrics of a direct forward
    pass over each case, computed here with the metric function alone."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(1, 3, 1))
    readers = [case_reader(data_dir, PATCHES, i) for i in range(3)]
    out = engine.evaluate(net, CaseDataset(readers), task=PATCHES, device=torch.device("cpu"))
    dices = []
    with torch.no_grad():
        for r in readers:
            image, label = r.read()
            pred = net(torch.from_numpy(image)[None]).argmax(dim=1, keepdim=True)
            dices.append(metrics.dice_per_class(pred, torch.from_numpy(label)[None], 3))
    want = np.mean(dices, axis=0)
    assert out["dice-anterior"] == pytest.approx(want[0], abs=1e-5)
    assert out["dice-posterior"] == pytest.approx(want[1], abs=1e-5)
    cases = engine.evaluate_cases(net, CaseDataset(readers), task=PATCHES,
                                  device=torch.device("cpu"),
                                  recipe=engine.DEFAULT_RECIPE)
    assert [c.value for c in cases] == pytest.approx([float(np.nanmean(d)) for d in dices],
                                                     abs=1e-5)


# --------------------------------------------------------------------------- federation
@pytest.mark.usefixtures("task_identity")
def test_a_federation_on_patches_evaluates_whole_held_out_cases(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpacs.client.app import app as client_app
    from fedpacs.server.app import run_federation
    from fedpacs.server.rundir import read_rounds
    from tests.loopback import LoopbackGrid

    task = dataclasses.replace(PATCHES, name="hippo-native", input_shape=(32, 32, 32),
                               width=8)
    seen: list[tuple[int, ...]] = []
    sliding = engine.sliding_window_inference

    def spy(inputs: torch.Tensor, *args: Any, **kw: Any) -> Any:
        seen.append(tuple(inputs.shape[2:]))
        return sliding(inputs, *args, **kw)

    monkeypatch.setattr(engine, "sliding_window_inference", spy)
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in task.to_dict().items())
    sites = {}
    for i in range(2):
        site = tmp_path / f"site{i}.toml"
        site.write_text(f'[site]\nname = "site-{i}"\ntask = "{task.name}"\n[data]\n'
                        f'format = "nifti"\nroot = "{hippo(data_dir)}"\npartition = {i}\n'
                        "num_partitions = 40\n[compute]\nthreads = 1\n"
                        f"[security]\nrequire_secagg = false\n[task]\n{table}\n")
        sites[i + 1] = site
    cfg = RunConfig(task=task.name, task_json=json.dumps(task.to_dict()), rounds=2,
                    local_epochs=4, batch_size=2, min_sites=2, round_timeout_s=300.0,
                    cross_site=False, secagg=False, lr=0.01, run_dir=str(tmp_path / "run"),
                    run_name="run", eval_root=str(hippo(data_dir)), eval_format="nifti",
                    eval_holdout_fraction=0.05)
    assert not cfg.validate()
    run_federation(LoopbackGrid(client_app, sites), cfg, Context(1, 0, {}, RecordDict(), {}))
    rounds = read_rounds(tmp_path / "run")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    held = load_holdout(DataSpec(format="nifti", root=hippo(data_dir), holdout_fraction=0.05),
                        task)
    assert isinstance(held, CaseDataset)
    shapes = {tuple(held[i][0].shape[1:]) for i in range(len(held))}
    for r in rounds:
        assert r["heldout"]["num-examples"] == len(held) == 13
        assert all(math.isfinite(v) for v in r["heldout"].values())
    # it learns (seeded: held-out Dice 0.05 at round 0, then 0.36, 0.53)
    dice = [r["heldout"]["dice-mean"] for r in rounds]
    assert dice[-1] > 0.0 and dice[-1] > dice[0] + 0.2, dice
    # the held-out cases reached the sliding window whole, at their own sizes
    assert shapes <= set(seen) and (32, 32, 32) not in shapes
