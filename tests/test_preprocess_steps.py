"""A task's preprocessing steps (fedpacs.common.preprocess): CLAHE and ACE on real
BreastMNIST ultrasound images and an AdrenalMNIST3D volume, Macenko stain normalisation,
the same input at a site's training and validation, the server's held-out evaluation and
an exported MONAI bundle, a federated run with CLAHE, and the task validation.

No H&E image ships in ../shared/data, nor among pydicom's, pydicom-data's or highdicom's
test files (their colour images are ultrasound, endoscopy and photographs), so the Macenko
tests synthesise H&E images by the Beer-Lambert model Macenko's method inverts:
``I = Io * exp(-HE @ C)``, with the stain concentrations ``C`` taken from the structure of
real BreastMNIST images (haematoxylin from one image's dark tissue, eosin from another's
bright tissue, with regions of pure stain), rendered once with the reference stains and
several times with perturbed stain vectors and strengths, as slides stained in other
laboratories would look. The normaliser must map every copy back to the reference
rendering.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from scipy.ndimage import uniform_filter
from skimage.exposure import equalize_adapthist
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from fedpacs.common.artifacts import save_model
from fedpacs.common.config import RunConfig
from fedpacs.common.datasets import DataSpec, load_holdout, load_partition, read_medmnist
from fedpacs.common.errors import ConfigError
from fedpacs.common.models import build_model
from fedpacs.common.preprocess import (
    ACE_ALPHA,
    ACE_MAX_GAIN,
    MACENKO_HE_REF,
    MACENKO_MAX_C_REF,
    PreprocessCounts,
    PreprocessedDataset,
    PreprocessedIterable,
    TaskPreprocess,
    TaskPreprocessd,
    ace,
    apply_steps,
    clahe,
    macenko,
    preprocessed,
)
from fedpacs.common.registry_api import export_bundle
from fedpacs.common.tasks import TASK_PRESETS, TaskConfig

BREAST = TASK_PRESETS["breastmnist"]
CLAHE_TASK = TaskConfig.from_dict(BREAST.to_dict() | {"name": "breast-clahe",
                                                      "preprocess": ["clahe"], "width": 8})
RGB = BREAST.to_dict() | {"name": "he-patches", "in_channels": 3}


@pytest.fixture(scope="module")
def breast(data_dir: Path) -> dict[str, np.ndarray]:
    return read_medmnist(data_dir / "medmnist_breast" / "breastmnist.npz")


def _as_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> model inputs (N, 1, H, W) in [-1, 1], as the MedMNIST reader."""
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]


def _local_contrast(img: np.ndarray) -> float:
    """Mean standard deviation over 7x7 windows, relative to the image's range."""
    a = img.astype(np.float64)
    mean = uniform_filter(a, 7)
    std = np.sqrt(np.maximum(uniform_filter(a * a, 7) - mean * mean, 0.0))
    return float(std.mean() / (a.max() - a.min()))


# --------------------------------------------------------------------------- CLAHE
def test_clahe_raises_local_contrast_of_real_ultrasound(breast: dict[str, np.ndarray]) -> None:
    x = _as_input(breast["train_images"][:20])
    before = [_local_contrast(i[0]) for i in x]
    after = [_local_contrast(clahe(i)[0]) for i in x]
    assert all(a > 1.3 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert np.mean(after) > 1.8 * np.mean(before)  # measured: 0.111 -> 0.229 (first 50)
    out = clahe(x[0])
    assert out.dtype == np.float32 and out.shape == x[0].shape
    # the input's own range, end to end (scikit-image stretches its result to [0, 1])
    assert (out.min(), out.max()) == pytest.approx((x[0].min(), x[0].max()), abs=1e-6)


def test_clahe_is_scikit_image_on_the_min_max_mapping(breast: dict[str, np.ndarray],
                                                      data_dir: Path) -> None:
    x = _as_input(breast["test_images"][:1])[0]
    lo, hi = float(x.min()), float(x.max())
    want = lo + equalize_adapthist((x[0] - lo) / (hi - lo), clip_limit=0.01) * (hi - lo)
    np.testing.assert_allclose(clahe(x)[0], want, atol=1e-6)
    # 3D: a real AdrenalMNIST3D volume (28^3), CLAHE in 3D contextual regions
    vol = read_medmnist(data_dir / "medmnist_adrenal3d" / "adrenalmnist3d.npz")["val_images"][0]
    v = vol.astype(np.float32)[None]
    lo, hi = float(v.min()), float(v.max())
    want3 = lo + equalize_adapthist((v[0] - lo) / (hi - lo)) * (hi - lo)
    np.testing.assert_allclose(clahe(v)[0], want3, atol=1e-4 * (hi - lo))


def test_clahe_of_a_colour_image_keeps_its_hues(breast: dict[str, np.ndarray]) -> None:
    """Three channels are RGB: equalised on the HSV value as scikit-image does."""
    g = breast["train_images"][3].astype(np.float32) / 255.0
    rgb = np.stack([g, g * 0.8, g * 0.6])  # a tinted real image, in [0, 1]
    x = (rgb - 0.5) / 0.5
    lo, hi = float(x.min()), float(x.max())
    want = lo + np.moveaxis(equalize_adapthist(np.moveaxis((x - lo) / (hi - lo), 0, -1)),
                            -1, 0) * (hi - lo)
    out = clahe(x)
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert out.shape == (3, 28, 28)


# --------------------------------------------------------------------------- ACE
def test_ace_matches_the_hand_computed_value() -> None:
    """A 7x7 image in [0, 1] (its min/max mapping is the identity): at the centre the
    7-wide window is the whole image, so local and global statistics are equal:
    mean m = (46 * 0.5 + 0.6 + 0 + 1) / 49 = 24.6 / 49 = 0.5020408,
    E[x^2] = (46 * 0.25 + 0.36 + 0 + 1) / 49 = 12.86 / 49, var = 24.98 / 2401 = 0.102^2,
    gain G = 0.5 * m / 0.102 = 2.460985 (< 3), out = m + G * (0.6 - m) = 0.7431169."""
    assert (ACE_ALPHA, ACE_MAX_GAIN) == (0.5, 3.0)
    x = np.full((1, 7, 7), 0.5, np.float32)
    x[0, 3, 3], x[0, 0, 0], x[0, 6, 6] = 0.6, 0.0, 1.0
    assert ace(x)[0, 3, 3] == pytest.approx(0.7431169, abs=1e-6)


def test_ace_clips_the_gain() -> None:
    """7x21: the centre's window (columns 0..6) holds 48 x 0.5 and one 0.55, the extremes
    lie far right: local std 0.00707, gain 0.5 * 0.50034 / 0.00707 = 35.4 -> clipped to 3;
    out = m + 3 * (0.55 - m) = 1.65 - 2 * 24.55 / 49 = 0.6479592."""
    x = np.full((1, 7, 21), 0.5, np.float32)
    x[0, 3, 3], x[0, 0, 20], x[0, 6, 20] = 0.55, 0.0, 1.0
    assert ace(x)[0, 3, 3] == pytest.approx(0.6479592, abs=1e-6)


def test_ace_keeps_the_range_and_raises_contrast(breast: dict[str, np.ndarray]) -> None:
    x = _as_input(breast["train_images"][:20])
    for img in x:
        out = ace(img)
        assert out.min() >= img.min() - 1e-6 and out.max() <= img.max() + 1e-6
        assert _local_contrast(out[0]) > _local_contrast(img[0])
    flat = np.full((1, 8, 8), 0.3, np.float32)
    assert np.array_equal(ace(flat), flat) and np.array_equal(clahe(flat), flat)


# --------------------------------------------------------------------------- Macenko
def _stain_concentrations(breast: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration maps from two real images, with a region of
    each stain alone, scaled so their 99th percentiles are the reference maxima."""
    h = 1.0 - breast["train_images"][0].astype(np.float64) / 255.0
    e = breast["train_images"][1].astype(np.float64) / 255.0
    e[:, :9] = 0.0  # left: haematoxylin only
    h[:, -9:] = 0.0  # right: eosin only
    return (h * MACENKO_MAX_C_REF[0] / np.percentile(h, 99),
            e * MACENKO_MAX_C_REF[1] / np.percentile(e, 99))


def _render(he: np.ndarray, c_h: np.ndarray, c_e: np.ndarray) -> np.ndarray:
    """An 8-bit RGB image I = 240 exp(-HE C) as a model input (3, H, W) in [-1, 1]."""
    od = he @ np.stack([c_h.ravel(), c_e.ravel()])
    rgb = np.clip(np.round(240.0 * np.exp(-od)), 0, 255).reshape(3, *c_h.shape)
    return ((rgb / 255.0 - 0.5) / 0.5).astype(np.float32)


def _perturbed(turn_h: float, turn_e: float) -> np.ndarray:
    he = np.array(MACENKO_HE_REF)
    h = he[:, 0] + turn_h * np.array([1.0, -1.0, 0.5])
    e = he[:, 1] + turn_e * np.array([-0.5, 1.0, -1.0])
    return np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)], axis=1)


PERTURBATIONS = [(0.08, -0.05, 1.3, 0.8), (-0.06, 0.07, 0.7, 1.2), (0.1, 0.1, 1.1, 1.4)]


def test_the_reference_stains_are_torchstains_published_defaults() -> None:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    ref = NumpyMacenkoNormalizer()
    assert np.array_equal(ref.HERef, np.array(MACENKO_HE_REF))
    assert np.array_equal(ref.maxCRef, np.array(MACENKO_MAX_C_REF))


def test_macenko_maps_restained_slides_to_the_reference(breast: dict[str, np.ndarray]) -> None:
    c_h, c_e = _stain_concentrations(breast)
    reference = _render(np.array(MACENKO_HE_REF), c_h, c_e)
    copies = [_render(_perturbed(th, te), c_h * sh, c_e * se)
              for th, te, sh, se in PERTURBATIONS]
    for copy in copies:
        assert np.abs(copy - reference).mean() > 0.1  # visibly other stains (~13 grey levels)
        out = macenko(copy)
        assert out.shape == (3, 28, 28) and out.dtype == np.float32
        # back to the reference appearance within 3 of 255 grey levels, ~1 on average
        assert np.abs(out - reference).max() * 127.5 <= 3.01
        assert np.abs(out - reference).mean() * 127.5 < 1.5
    before = np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(copies, 2)])
    normed = [macenko(c) for c in copies]
    after = np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(normed, 2)])
    assert after < before / 10, (before, after)  # measured 0.224 -> 0.006


def test_macenko_leaves_a_blank_tile_unchanged_and_counts_it(
        breast: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture) -> None:
    c_h, c_e = _stain_concentrations(breast)
    tissue = _render(_perturbed(0.08, -0.05), c_h * 1.3, c_e * 0.8)
    blank = np.full((3, 28, 28), 0.95, np.float32)  # glass: no optical density
    task = TaskConfig.from_dict(RGB | {"preprocess": ["macenko"]})
    data = TensorDataset(torch.from_numpy(np.stack([tissue, blank])), torch.tensor([0, 1]))
    counts = PreprocessCounts()
    with caplog.at_level(logging.WARNING, logger="fedpacs.common.preprocess"):
        out = preprocessed(data, task, counts=counts)
    assert counts.images == 2 and counts.unchanged == {"macenko": 1}
    assert torch.equal(out.tensors[1], data.tensors[1])
    assert np.array_equal(out.tensors[0][1].numpy(), blank)
    assert not np.array_equal(out.tensors[0][0].numpy(), tissue)
    assert "macenko left 1 of 2 image(s) unchanged" in caplog.text
    # almost no tissue (a few stained pixels on glass) is blank too, not an error
    speck = blank.copy()
    speck[:, :2, :2] = tissue[:, :2, :2]
    assert np.array_equal(macenko(speck), speck)


# --------------------------------------------------------------------------- transforms
def test_the_monai_transforms_apply_the_steps_to_arrays_and_tensors(
        breast: dict[str, np.ndarray]) -> None:
    x = _as_input(breast["val_images"][:1])[0]
    want = apply_steps(x, ["ace", "clahe"])
    assert np.array_equal(want, clahe(ace(x)))  # in the listed order
    assert np.array_equal(TaskPreprocess(["ace", "clahe"])(x), want)
    t = TaskPreprocess(["ace", "clahe"])(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), want)
    label = np.ones((1, 28, 28), np.int64)
    d = TaskPreprocessd("image", ["ace", "clahe"])({"image": x, "label": label})
    assert np.array_equal(d["image"], want) and d["label"] is label
    assert np.array_equal(apply_steps(x, []), x)


def test_a_streamed_or_lazy_data_set_is_processed_per_sample(
        breast: dict[str, np.ndarray]) -> None:
    x = torch.from_numpy(_as_input(breast["val_images"][:3]))
    want = [apply_steps(i, ["clahe"]) for i in x.numpy()]

    class Dicts(Dataset[dict[str, Any]]):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"image": x[i], "label": i}

    class Stream(IterableDataset[tuple[torch.Tensor, int]]):
        def __iter__(self) -> Any:
            return ((x[i], i) for i in range(3))

    lazy = preprocessed(Dicts(), CLAHE_TASK)
    assert isinstance(lazy, PreprocessedDataset) and len(lazy) == 3
    assert all(np.array_equal(lazy[i]["image"].numpy(), want[i]) and lazy[i]["label"] == i
               for i in range(3))
    stream = preprocessed(Stream(), CLAHE_TASK)
    assert isinstance(stream, PreprocessedIterable)
    assert [(np.array_equal(a.numpy(), want[i]), y) for i, (a, y) in enumerate(stream)] == \
        [(True, 0), (True, 1), (True, 2)]
    assert preprocessed(Dicts(), BREAST).__class__ is Dicts  # no steps: the same set


def test_streamed_cases_keep_their_set_and_are_processed_whole(
        breast: dict[str, np.ndarray]) -> None:
    """A set of case readers (fedpacs.common.patches) stays that set; each whole case is
    preprocessed when read, before any patch is cut from it."""
    from fedpacs.common.patches import CaseDataset

    images = _as_input(breast["val_images"][:2])

    class Reader:
        def __init__(self, i: int) -> None:
            self.i = i

        @property
        def case_id(self) -> str:
            return f"case-{self.i}"

        def read(self) -> tuple[np.ndarray, np.ndarray]:
            return images[self.i], np.zeros((1, 28, 28), np.int64)

    out = preprocessed(CaseDataset([Reader(0), Reader(1)]), CLAHE_TASK)
    assert isinstance(out, CaseDataset) and len(out) == 2
    assert out.readers[1].case_id == "case-1"
    image, label = out[1]
    assert np.array_equal(image.numpy(), apply_steps(images[1], ["clahe"]))
    assert not label.any()


# --------------------------------------------------------------------------- bundle
def test_the_bundle_preprocesses_as_the_sites_did(breast: dict[str, np.ndarray],
                                                   tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    model = build_model(CLAHE_TASK, seed=0)
    save_model(tmp_path / "model.pt", model=model, task=CLAHE_TASK, card={})
    out = export_bundle(tmp_path / "model.pt", tmp_path / "bundle")
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["fedpacs"]["preprocess"] == ["clahe"]
    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    pre = parser.get_parsed_content("preprocessing")
    x = _as_input(breast["test_images"][5:6])[0]  # a real image, as the reader gives it
    site = apply_steps(x, CLAHE_TASK.preprocess)  # what the sites trained on
    assert np.array_equal(pre({"image": x})["image"], site)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    batch = torch.as_tensor(pre({"image": torch.from_numpy(x)})["image"])[None]
    with torch.no_grad():
        assert torch.equal(net.eval()(batch), model.eval()(torch.from_numpy(site)[None]))
    # a task without steps: an empty preprocessing, the image as it is
    save_model(tmp_path / "plain.pt", model=build_model(BREAST), task=BREAST, card={})
    plain = ConfigParser()
    plain.read_config(str(export_bundle(tmp_path / "plain.pt", tmp_path / "b2") / "configs" /
                          "inference.json"))
    assert np.array_equal(plain.get_parsed_content("preprocessing")({"image": x})["image"], x)


# --------------------------------------------------------------------------- federated run
def _site_configs(tmp_path: Path, data_dir: Path, task: TaskConfig) -> dict[int, Path]:
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in task.to_dict().items())
    sites = {}
    for i in range(3):
        p = tmp_path / f"site{i}.toml"
        p.write_text(f'[site]\nname = "site-{i}"\ntask = "{task.name}"\n[data]\nformat = '
                     f'"medmnist"\nroot = "{data_dir}/medmnist_breast/breastmnist.npz"\n'
                     f"partition = {i}\nnum_partitions = 3\n[compute]\nthreads = 1\n"
                     f"[security]\nrequire_secagg = false\n[task]\n{table}\n")
        sites[i + 1] = p
    return sites


@pytest.mark.usefixtures("task_identity")
def test_a_federated_run_with_clahe_trains_and_exports_its_steps(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real ServerApp and ClientApps over LoopbackGrid, 2 rounds of BreastMNIST with CLAHE:
    every site's training and validation sets and the server's held-out set are the
    readers' images with the steps applied (spied where the run loads them), and the
    final model's bundle carries the steps."""
    from monai.bundle import ConfigParser

    from fedpacs.client import datacache
    from fedpacs.client.app import app as client_app
    from fedpacs.server import app as server_app
    from fedpacs.server.rundir import read_rounds
    from tests.loopback import LoopbackGrid

    loaded: list[Any] = []  # (site, data) of each site_data call at the sites
    real_site_data = datacache.site_data

    def site_data(site: Any, task: TaskConfig) -> Any:
        loaded.append((site, real_site_data(site, task)))
        return loaded[-1][1]

    evaluated: list[Any] = []  # the data of each server-side evaluation
    real_evaluate = server_app.evaluate

    def evaluate(model: Any, data: Any, **kw: Any) -> Any:
        evaluated.append(data)
        return real_evaluate(model, data, **kw)

    monkeypatch.setattr(datacache, "site_data", site_data)
    monkeypatch.setattr(server_app, "evaluate", evaluate)

    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    cfg = RunConfig(task=CLAHE_TASK.name, task_json=json.dumps(CLAHE_TASK.to_dict()),
                    rounds=2, local_epochs=1, batch_size=64, min_sites=3,
                    round_timeout_s=120.0, cross_site=False, secagg=False, lr=0.01,
                    run_dir=str(tmp_path / "run"), run_name="run", eval_root=str(npz),
                    eval_format="medmnist")
    assert not cfg.validate()
    server_app.run_federation(LoopbackGrid(client_app, _site_configs(tmp_path, data_dir,
                                                                     CLAHE_TASK)),
                              cfg, Context(1, 0, {}, RecordDict(), {}))
    rounds = read_rounds(tmp_path / "run")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert sorted(r["train_sites"]) == ["site-0", "site-1", "site-2"]
        assert all(math.isfinite(v) for v in r["train"].values())
    assert all(r["heldout"]["num-examples"] == 156 for r in rounds)
    assert rounds[2]["weights_sha256"] != rounds[0]["weights_sha256"]  # it trained

    def steps_of(images: torch.Tensor) -> np.ndarray:
        return np.stack([apply_steps(i, ["clahe"]) for i in images.numpy()])

    # each site trained and validated on its partition with the steps applied
    assert {s.name for s, _ in loaded} == {"site-0", "site-1", "site-2"}
    for site, data in loaded:
        raw = load_partition(site.data, CLAHE_TASK)
        for got, want in ((data.train, raw.train), (data.val, raw.val)):
            assert np.array_equal(got.tensors[0].numpy(), steps_of(want.tensors[0]))
            assert torch.equal(got.tensors[1], want.tensors[1])
    # the server's held-out evaluation too
    held = load_holdout(DataSpec("medmnist", npz), CLAHE_TASK)
    assert evaluated and all(np.array_equal(d.tensors[0].numpy(), steps_of(held.tensors[0]))
                             for d in evaluated)
    # the exported bundle applies the same steps
    bundle = export_bundle(tmp_path / "run" / "final" / "model.pt", tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    x = held.tensors[0][0].numpy()
    assert np.array_equal(parser.get_parsed_content("preprocessing")({"image": x})["image"],
                          apply_steps(x, ["clahe"]))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["fedpacs"]["preprocess"] == ["clahe"]


def test_the_sites_data_check_loads_with_the_steps(tmp_path: Path, data_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedpacs site check` (the daemon's check_site) reads the data as training will."""
    from fedpacs.client.daemon import check_site
    from fedpacs.common import preprocess

    seen: list[tuple[str, ...]] = []
    real = preprocess.apply_steps

    def spy(img: Any, steps: Any, **kw: Any) -> np.ndarray:
        seen.append(tuple(steps))
        return real(img, steps, **kw)

    monkeypatch.setattr(preprocess, "apply_steps", spy)
    summary = check_site(_site_configs(tmp_path, data_dir, CLAHE_TASK)[1])
    assert (summary.train, summary.val) == (182, 26)  # 546 and 78 images / 3 partitions
    assert seen == [("clahe",)] * (182 + 26)


# --------------------------------------------------------------------------- validation
def test_an_unknown_step_and_macenko_on_grey_images_are_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        TaskConfig.from_dict(BREAST.to_dict() | {"preprocess": ["clahe", "sharpen"]})
    (err,) = exc.value.errors
    assert err.field == "preprocess" and "clahe, ace, macenko" in err.expected
    assert "sharpen" in err.got
    with pytest.raises(ConfigError) as exc:
        TaskConfig.from_dict(BREAST.to_dict() | {"preprocess": ["macenko"]})
    (err,) = exc.value.errors
    assert err.field == "preprocess" and "in_channels = 3" in err.expected
    assert "in_channels = 1" in err.got and "drop" in err.fix
    # through a run's custom task: the field under task-json
    bad = BREAST.to_dict() | {"name": "x", "preprocess": ["macenko"]}
    errs = RunConfig(task="x", task_json=json.dumps(bad)).validate()
    assert [e.field for e in errs] == ["task-json.preprocess"]
    ok = TaskConfig.from_dict(RGB | {"preprocess": ["macenko", "clahe"]})
    assert ok.preprocess == ("macenko", "clahe")
    with pytest.raises(ConfigError) as exc:
        TaskPreprocessd("image", ["sharpen"])
    assert exc.value.errors[0].field == "task.preprocess"
    with pytest.raises(ValueError, match="3 channels"):
        macenko(np.zeros((1, 8, 8), np.float32))
