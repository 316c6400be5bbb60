"""Image folders (``images``: one sub-folder per class; ``image-masks``: images/ + masks/)
written from real images: BreastMNIST ultrasound (grey, and as RGB), a pydicom colour
photo, MSD hippocampus slices with their masks; bad files are skipped with a reason code
and the rest kept; a federated run (real ServerApp and ClientApps over LoopbackGrid) on
an image folder, the server's held-out split from the same folder."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from PIL import Image

from fedpacs.common.config import RunConfig, format_task_problems, infer_eval_format
from fedpacs.common.datasets import (
    IMAGE_SKIP_REASONS,
    DataSpec,
    _holdout_cases,
    _medmnist_split,
    _site_cases,
    list_image_folder,
    load_holdout,
    load_partition,
    read_image,
    read_medmnist,
    to_channels,
)
from fedpacs.common.errors import ConfigError, DataError
from fedpacs.common.tasks import TASK_PRESETS, TaskConfig

BREAST = TASK_PRESETS["breastmnist"]  # class_names ("malignant", "normal/benign")
FOLDERS = ("malignant", "normal-benign")  # the class names, '/' written '-'
SLICES = TASK_PRESETS["hippocampus-slices"]  # 2D segmentation, 48x64, 3 classes
RGB_BREAST = TaskConfig.from_dict(BREAST.to_dict() | {"name": "breast-rgb", "in_channels": 3})


@pytest.fixture(scope="module")
def breast(data_dir: Path) -> dict[str, np.ndarray]:
    return read_medmnist(data_dir / "medmnist_breast" / "breastmnist.npz")


def _write_classes(root: Path, images: np.ndarray, labels: np.ndarray, *, prefix: str = "",
                   suffix: str = ".png") -> list[Path]:
    paths = []
    for i, (img, lab) in enumerate(zip(images, labels.reshape(-1), strict=True)):
        p = root / FOLDERS[int(lab)] / f"{prefix}{i:04d}{suffix}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.copy()


def _reasons(skipped: list[tuple[str, str]]) -> dict[str, str]:
    """file name -> reason code (the text before ':')"""
    return {Path(path).name: why.split(":")[0] for path, why in skipped}


# --------------------------------------------------------------------------- images
def test_a_breastmnist_folder_reads_as_the_npz_does(breast: dict[str, np.ndarray],
                                                    tmp_path: Path) -> None:
    """The same pixels and labels as the MedMNIST reader: an 8-bit image /255 to [-1, 1];
    the class from the folder naming the task's class ('normal/benign' as 'normal-benign')."""
    _write_classes(tmp_path, breast["test_images"], breast["test_labels"])
    hold = load_holdout(DataSpec("images", tmp_path, holdout_fraction=1.0), BREAST)
    ref = _medmnist_split(breast, "test", np.arange(156), BREAST, tmp_path)
    assert len(hold) == 156
    # held-out cases are sorted by "<class>/<index>", so match them by file name
    cases, skipped = list_image_folder(tmp_path, BREAST)
    assert skipped == [] and len(cases) == 156
    order = [int(c.image.stem) for c in sorted(cases, key=lambda c: c.case_id)]
    x, y = hold.tensors
    assert x.shape == (156, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, ref.tensors[0][order]) and torch.equal(y, ref.tensors[1][order])


def test_sites_and_server_split_an_image_folder_by_image(breast: dict[str, np.ndarray],
                                                         tmp_path: Path) -> None:
    _write_classes(tmp_path, breast["train_images"], breast["train_labels"])
    cases, _ = list_image_folder(tmp_path, BREAST)
    hold = {c.case_id for c in _holdout_cases(cases, DataSpec("images", tmp_path))}
    sites = []
    for k in range(3):
        spec = DataSpec("images", tmp_path, partition=k, num_partitions=3)
        train, val = _site_cases(cases, spec)
        ids = {c.case_id for c in train + val}
        assert not ids & hold and not any(ids & s for s in sites)
        sites.append(ids)
        site = load_partition(spec, BREAST)
        assert (len(site.train), len(site.val)) == (len(train), len(val)) and not site.skipped
    assert len(hold) == round(546 * 0.2) and len(hold | set().union(*sites)) == 546


def test_class_index_is_the_class_name_position_or_sorted_order(
        breast: dict[str, np.ndarray], tmp_path: Path) -> None:
    named = TaskConfig.from_dict(BREAST.to_dict() | {"name": "named",
                                                     "class_names": ["zeta", "alpha"]})
    unnamed = TaskConfig.from_dict(BREAST.to_dict() | {"name": "unnamed", "class_names": []})
    for cls in ("zeta", "alpha"):
        (tmp_path / cls).mkdir()
        Image.fromarray(breast["train_images"][0]).save(tmp_path / cls / "a.png")
    by_name = {c.case_id.split("/")[0]: c.label for c in list_image_folder(tmp_path, named)[0]}
    by_sort = {c.case_id.split("/")[0]: c.label for c in list_image_folder(tmp_path, unnamed)[0]}
    assert by_name == {"zeta": 0, "alpha": 1} and by_sort == {"alpha": 0, "zeta": 1}
    (tmp_path / "zeta").rename(tmp_path / "0")  # a class's index names it too
    assert {c.label for c in list_image_folder(tmp_path, named)[0]} == {0, 1}


def test_a_folder_naming_no_class_is_refused_with_the_classes_expected(
        breast: dict[str, np.ndarray], tmp_path: Path) -> None:
    _write_classes(tmp_path, breast["val_images"][:6], breast["val_labels"][:6])
    (tmp_path / "benign").mkdir()
    Image.fromarray(breast["val_images"][0]).save(tmp_path / "benign" / "x.png")
    with pytest.raises(DataError) as err:
        load_partition(DataSpec("images", tmp_path), BREAST)
    text = str(err.value)
    assert "benign" in err.value.path and "'malignant'" in text and "'normal/benign'" in text
    assert err.value.kind == "unknown-class" and "Fix: rename" in text


def test_bad_files_are_skipped_with_a_reason_and_the_rest_kept(
        breast: dict[str, np.ndarray], tmp_path: Path) -> None:
    """Corrupt and truncated files are skipped (unreadable-image), as are a float TIFF, a
    text file and an empty class folder (reported); a larger image is resized, colour
    images (a BreastMNIST image as RGB, a pydicom photo) are converted to grey."""
    from pydicom import examples

    good = _write_classes(tmp_path, breast["val_images"][:20], breast["val_labels"][:20])
    (tmp_path / "malignant" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    whole = good[0].read_bytes()
    (tmp_path / "malignant" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(breast["val_images"][0].astype(np.float32)).save(
        tmp_path / "malignant" / "float.tif")
    (tmp_path / "malignant" / "notes.txt").write_text("not an image")
    big = Image.fromarray(breast["val_images"][1]).resize((56, 56), Image.Resampling.BILINEAR)
    big.save(tmp_path / "malignant" / "big.png")
    rgb = np.repeat(breast["val_images"][2][..., None], 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "malignant" / "rgb.png")
    Image.fromarray(examples.rgb_color.pixel_array).save(tmp_path / "malignant" / "photo.jpg")
    (tmp_path / "normal-benign" / "empty").mkdir()  # a sub-folder of a class: not read
    for p in (tmp_path / "normal-benign").glob("*.png"):
        p.rename(tmp_path / "malignant" / f"b{p.name}")  # ... so that class is empty
    (tmp_path / "readme.md").write_text("# images")

    site = load_partition(DataSpec("images", tmp_path, holdout_fraction=0.0,
                                   val_fraction=0.0), BREAST)
    assert _reasons(site.skipped) == {
        "corrupt.png": "unreadable-image", "truncated.png": "unreadable-image",
        "float.tif": "unsupported-image", "notes.txt": "not-an-image",
        "normal-benign": "empty-class", "readme.md": "not-in-class-folder"}
    assert set(_reasons(site.skipped).values()) <= set(IMAGE_SKIP_REASONS)
    assert len(site.train) == 20 + 3 and site.train.tensors[0].shape == (23, 1, 28, 28)
    x = site.train.tensors[0]
    assert torch.isfinite(x).all() and -1 <= float(x.min()) and float(x.max()) <= 1


def test_grey_and_colour_are_converted_to_the_tasks_channels(breast: dict[str, np.ndarray],
                                                             tmp_path: Path) -> None:
    grey = breast["train_images"][3]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")
    g, c = read_image(tmp_path / "grey.png"), read_image(tmp_path / "rgb.png")
    assert g.shape == (1, 28, 28) and c.shape == (3, 28, 28)
    np.testing.assert_allclose(to_channels(c, 1), g, atol=1e-6)  # luminance of a grey RGB
    assert np.array_equal(to_channels(g, 3), c)  # grey repeated
    # a colour photo: ITU-R 601 luminance, as Pillow's own conversion (to 8-bit rounding)
    from pydicom import examples

    photo = examples.rgb_color.pixel_array
    Image.fromarray(photo).save(tmp_path / "photo.png")
    luma = to_channels(read_image(tmp_path / "photo.png"), 1)[0] * 255
    pil = np.asarray(Image.fromarray(photo).convert("L"), dtype=np.float32)
    assert np.abs(luma - pil).max() <= 1.0
    # a colour task reads a grey folder (and a grey task a colour one)
    _write_classes(tmp_path / "set", breast["val_images"][:8], breast["val_labels"][:8])
    site = load_partition(DataSpec("images", tmp_path / "set", holdout_fraction=0.0,
                                   val_fraction=0.0), RGB_BREAST)
    x = site.train.tensors[0]
    assert x.shape == (8, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2])


def test_16bit_tiff_reads_as_its_8bit_original(data_dir: Path, tmp_path: Path) -> None:
    vol = np.asarray(nib.load(data_dir / "msd_hippocampus_udacity" / "images" /
                              "hippocampus_001.nii.gz").dataobj)
    s = np.ascontiguousarray(vol[:, :, 17])  # uint8
    Image.fromarray(s).save(tmp_path / "s8.png")
    Image.fromarray(s.astype(np.uint16) * 257).save(tmp_path / "s16.tif")
    with Image.open(tmp_path / "s16.tif") as im:
        assert im.mode == "I;16"
    np.testing.assert_allclose(read_image(tmp_path / "s16.tif"), read_image(tmp_path / "s8.png"),
                               atol=1e-6)


# --------------------------------------------------------------------------- image-masks
def _write_slices(data_dir: Path, root: Path, cases: list[str]) -> int:
    """Each case's axial slices with foreground as images/<case>_<k>.png + masks/, the
    volume exported to 8 bits (every third image to 16 bits, as a TIFF) by its maximum;
    the number of pairs written."""
    src = data_dir / "msd_hippocampus_udacity"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    n = 0
    for case in cases:
        img = np.asarray(nib.load(src / "images" / f"{case}.nii.gz").dataobj, dtype=float)
        img /= img.max()
        lab = np.asarray(nib.load(src / "labels" / f"{case}.nii.gz").dataobj).astype(np.uint8)
        for k in range(img.shape[2]):
            if not lab[:, :, k].any():
                continue
            name = f"{case}_{k:02d}"
            s = np.ascontiguousarray(img[:, :, k])
            if n % 3 == 0:
                Image.fromarray(np.round(s * 65535).astype(np.uint16)).save(
                    root / "images" / f"{name}.tif")
            else:
                Image.fromarray(np.round(s * 255).astype(np.uint8)).save(
                    root / "images" / f"{name}.png")
            Image.fromarray(np.ascontiguousarray(lab[:, :, k])).save(root / "masks" /
                                                                     f"{name}.png")
            n += 1
    return n


def test_hippocampus_slices_as_image_mask_pairs(data_dir: Path, tmp_path: Path) -> None:
    n = _write_slices(data_dir, tmp_path, ["hippocampus_001", "hippocampus_003"])
    with Image.open(next((tmp_path / "images").glob("*.png"))) as im:
        assert im.size == (51, 35) != SLICES.input_shape[::-1]  # (w, h): resized to 48x64
    imgs = sorted((tmp_path / "images").iterdir())
    masks = sorted((tmp_path / "masks").iterdir())
    # bad input: a mask of another size, a mask with a value past the classes, a colour
    # mask, an image without a mask, a corrupt image
    _load(masks[0]).resize((20, 20)).save(masks[0])
    bad = np.asarray(_load(masks[1])).copy()
    bad[0, 0] = 7
    Image.fromarray(bad).save(masks[1])
    _load(masks[2]).convert("RGB").save(masks[2])
    masks[3].unlink()
    imgs[4].write_bytes(b"II*\x00garbage")
    site = load_partition(DataSpec("image-masks", tmp_path, holdout_fraction=0.0,
                                   val_fraction=0.0), SLICES)
    assert _reasons(site.skipped) == {masks[0].name: "mask-size", masks[1].name: "mask-values",
                                      masks[2].name: "unsupported-image",
                                      imgs[3].name: "no-mask",
                                      imgs[4].name: "unreadable-image"}
    x, y = site.train.tensors
    assert len(site.train) == n - 5 and x.shape == (n - 5, 1, 48, 64)
    assert y.shape == (n - 5, 1, 48, 64) and y.dtype == torch.long
    assert set(torch.unique(y).tolist()) == {0, 1, 2}  # nearest: no label between classes
    assert bool((y > 0).any(dim=(1, 2, 3)).all())  # every slice kept its foreground


# --------------------------------------------------------------------------- config
def _site_toml(tmp_path: Path, task: str, fmt: str, root: Path) -> Path:
    p = tmp_path / f"site-{task}-{fmt}.toml"
    p.write_text(f'[site]\nname = "h"\ntask = "{task}"\n[data]\nformat = "{fmt}"\n'
                 f'root = "{root}"\n')
    return p


def test_a_format_of_the_other_task_kind_is_refused_before_anything_starts(
        breast: dict[str, np.ndarray], data_dir: Path, tmp_path: Path) -> None:
    from fedpacs.client.config import load_site_config

    classes, pairs = tmp_path / "classes", tmp_path / "pairs"
    _write_classes(classes, breast["val_images"][:4], breast["val_labels"][:4])
    _write_slices(data_dir, pairs, ["hippocampus_001"])
    assert load_site_config(_site_toml(tmp_path, "breastmnist", "images", classes)).data.format \
        == "images"
    assert load_site_config(_site_toml(tmp_path, "hippocampus-slices", "image-masks", pairs)
                            ).data.root == pairs
    for task, fmt, root, want in (("hippocampus-slices", "images", classes, "image-masks"),
                                  ("breastmnist", "image-masks", pairs, "images")):
        with pytest.raises(ConfigError) as err:
            load_site_config(_site_toml(tmp_path, task, fmt, root))
        (e,) = [e for e in err.value.errors if e.field == "data.format"]
        assert f'set data.format = "{want}"' in e.fix and fmt in e.got
    with pytest.raises(ConfigError) as err:  # a 3D task on 2D images; a root without masks/
        load_site_config(_site_toml(tmp_path, "hippocampus", "image-masks", classes))
    assert {e.field for e in err.value.errors} == {"data.format", "data.root"}
    # the server's held-out set: the run is refused before anything starts
    errs = RunConfig(task="hippocampus-slices", eval_format="images",
                     eval_root=str(classes)).validate()
    assert [e.field for e in errs if "image" in e.got] == ["eval-format"]
    assert not [e for e in RunConfig(task="breastmnist", eval_format="images",
                                     eval_root=str(classes)).validate()
                if e.field.startswith("eval")]
    assert format_task_problems("nifti", SLICES, "x") == []
    assert format_task_problems("images", RGB_BREAST, "x") == []


def test_the_eval_format_is_inferred_from_the_folder(breast: dict[str, np.ndarray],
                                                      data_dir: Path, tmp_path: Path) -> None:
    _write_classes(tmp_path / "classes", breast["val_images"][:4], breast["val_labels"][:4])
    _write_slices(data_dir, tmp_path / "pairs", ["hippocampus_001"])
    assert infer_eval_format(str(tmp_path / "classes")) == "images"
    assert infer_eval_format(str(tmp_path / "pairs")) == "image-masks"
    assert infer_eval_format(str(data_dir / "msd_hippocampus_udacity")) == "nifti"
    assert infer_eval_format(str(tmp_path / "held.npz")) == "medmnist"
    assert infer_eval_format(str(tmp_path / "missing")) == "nifti"


# --------------------------------------------------------------------------- federated run
@pytest.mark.usefixtures("task_identity")
def test_a_federated_run_on_an_image_folder(breast: dict[str, np.ndarray],
                                            tmp_path: Path) -> None:
    """3 sites each train on their partition of one BreastMNIST image folder (all 780
    images; a few of them colour, one larger); the server evaluates on the folder's
    held-out split (156 images, never in any site's partition)."""
    from fedpacs.client.app import app as client_app
    from fedpacs.server.app import run_federation
    from fedpacs.server.rundir import read_rounds
    from tests.loopback import LoopbackGrid

    root = tmp_path / "breast"
    for split in ("train", "val", "test"):
        _write_classes(root, breast[f"{split}_images"], breast[f"{split}_labels"],
                       prefix=f"{split}-")
    for p in sorted(root.glob("*/val-000*.png")):  # a grey/colour and size mix
        _load(p).convert("RGB").resize((42, 42)).save(p)
    sites = {}
    for i in range(3):
        site = tmp_path / f"site{i}.toml"
        site.write_text(f'[site]\nname = "site-{i}"\ntask = "breastmnist"\n[data]\n'
                        f'format = "images"\nroot = "{root}"\npartition = {i}\n'
                        "num_partitions = 3\n[compute]\nthreads = 1\n"
                        "[security]\nrequire_secagg = false\n")
        sites[i + 1] = site
    cfg = RunConfig(task="breastmnist", rounds=3, local_epochs=2, batch_size=32,
                    min_sites=3, round_timeout_s=120.0, cross_site=False, secagg=False,
                    lr=0.001, run_dir=str(tmp_path / "run"), run_name="run",
                    eval_root=str(root), eval_format=infer_eval_format(str(root)))
    assert cfg.eval_format == "images" and not cfg.validate()
    run_federation(LoopbackGrid(client_app, sites), cfg, Context(1, 0, {}, RecordDict(), {}))
    rounds = read_rounds(tmp_path / "run")
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds[1:]:
        assert sorted(r["train_sites"]) == ["site-0", "site-1", "site-2"]
        assert all(math.isfinite(v) for v in r["train"].values())
    for r in rounds:
        assert r["heldout"]["num-examples"] == 156
        assert all(math.isfinite(v) for v in r["heldout"].values())
    # it learns (seeded: AUC 0.580 at round 0, then 0.599, 0.653, 0.633; loss 0.736, 0.614)
    auc = [r["heldout"]["auc"] for r in rounds]
    loss = [r["heldout"]["loss"] for r in rounds]
    assert max(auc[1:]) > auc[0] + 0.05 and min(loss[1:]) < loss[0] - 0.05, (auc, loss)
