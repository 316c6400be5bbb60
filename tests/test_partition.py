"""Realistic splits (fedpacs.common.partition): the maths against hand-computed answers
and properties, the saved split read back by the readers, bad splits reported/refused, the
site config's [data] split, and the simulation's node -> site mapping as an attack."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from PIL import Image

from fedpacs.client.app import SIM_SITES_ENV, load_site, sim_site_file, simulated_site_config
from fedpacs.client.config import parse_site_config
from fedpacs.common.config import DataSpec
from fedpacs.common.datasets import load_partition, read_medmnist, site_train_val
from fedpacs.common.errors import ConfigError, DataError
from fedpacs.common.partition import (
    Pool,
    SiteSplit,
    SiteSummary,
    Split,
    check_sites,
    chunks,
    dirichlet_partition,
    iid_partition,
    largest_remainder,
    make_split,
    pool_cases,
    quantity_partition,
    source_partition,
    split_site_cases,
    summarize,
)
from fedpacs.common.tasks import TASK_PRESETS

BREAST = TASK_PRESETS["breastmnist"]


# --------------------------------------------------------------------------- pure maths
@pytest.mark.parametrize(("total", "weights", "want"), [
    (10, [0.5, 0.3, 0.2], [5, 3, 2]),
    (7, [0.5, 0.25, 0.25], [3, 2, 2]),  # 3.5/1.75/1.75: floors 3,1,1; 2 left, ties by index
    (5, [1, 1, 1], [2, 2, 1]),  # as numpy.array_split cuts 5 into 3
    (3, [0, 1, 1], [0, 2, 1]),  # 0/1.5/1.5: the 1 left goes to the lower index
    (0, [0.2, 0.8], [0, 0]),
])
def test_largest_remainder_hand_computed(total: int, weights: list[float],
                                         want: list[int]) -> None:
    w = list(weights)
    assert largest_remainder(total, w).tolist() == want
    assert w == weights  # inputs untouched


def test_chunks_hand_computed() -> None:
    assert [c.tolist() for c in chunks(np.array([7, 8, 9, 1, 2, 3]), [1, 2, 3])] == \
        [[7], [8, 9], [1, 2, 3]]
    with pytest.raises(ValueError):
        chunks(np.arange(3), [1, 1])


def test_iid_is_numpy_array_split_of_the_seeded_permutation() -> None:
    parts = iid_partition(10, 3, seed=4)
    ref = np.array_split(np.random.default_rng(4).permutation(10), 3)
    assert [p.tolist() for p in parts] == [sorted(r.tolist()) for r in ref]
    assert [len(p) for p in parts] == [4, 3, 3]


def test_source_partition_hand_computed() -> None:
    names, parts = source_partition(["b", "a", "b", "c"])
    assert names == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1], [0, 2], [3]]


def _disjoint_complete(parts: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(parts)
    assert len(flat) == n and sorted(flat.tolist()) == list(range(n))


def _labels(n: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n)


def test_dirichlet_disjoint_complete_deterministic() -> None:
    y = _labels()
    a = dirichlet_partition(y, 5, alpha=0.5, seed=3)
    b = dirichlet_partition(y, 5, alpha=0.5, seed=3)
    c = dirichlet_partition(y, 5, alpha=0.5, seed=4)
    _disjoint_complete(a, len(y))
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))
    assert y.tolist() == _labels().tolist()  # not mutated


def class_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of each site's class histogram from the pool's."""
    classes = np.unique(labels)
    pool = np.array([np.mean(labels == c) for c in classes])
    tv = [0.5 * np.abs(np.array([np.mean(labels[p] == c) for c in classes]) - pool).sum()
          for p in parts if len(p)]
    return float(np.mean(tv))


def test_dirichlet_small_alpha_skews_class_histograms() -> None:
    y = _labels()
    skew = {alpha: np.mean([class_skew(y, dirichlet_partition(y, 5, alpha=alpha, seed=s))
                            for s in range(5)]) for alpha in (0.1, 0.5, 100.0)}
    # measured (1000 cases, 2 balanced classes, 5 sites, 5 seeds): 0.50 / 0.30 / 0.02,
    # IID 0.03
    assert skew[0.1] > 0.3 > skew[0.5] > 0.1 > skew[100.0]
    iid = np.mean([class_skew(y, iid_partition(len(y), 5, seed=s)) for s in range(5)])
    assert iid < 0.05


def test_dirichlet_min_cases_redraws_then_refuses() -> None:
    y = _labels(200)
    parts = dirichlet_partition(y, 4, alpha=0.3, seed=0, min_cases=20)
    assert min(len(p) for p in parts) >= 20
    _disjoint_complete(parts, 200)
    with pytest.raises(ConfigError) as err:
        dirichlet_partition(y, 10, alpha=0.05, seed=0, min_cases=20, max_tries=5)
    assert "--alpha" in str(err.value) and "raise --alpha" in str(err.value)


def test_quantity_skew_floor_and_spread() -> None:
    parts = quantity_partition(600, 10, alpha=0.3, seed=1, min_cases=8)
    sizes = [len(p) for p in parts]
    _disjoint_complete(parts, 600)
    assert min(sizes) >= 8
    assert max(sizes) > 4 * min(sizes)  # skewed: a few large sites, many small
    near = [len(p) for p in quantity_partition(600, 10, alpha=1000.0, seed=1)]
    assert max(near) - min(near) < 15
    with pytest.raises(ConfigError, match="--sites"):
        quantity_partition(50, 10, alpha=1.0, seed=0, min_cases=8)


def test_bad_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--sites"):
        iid_partition(3, 5, seed=0)
    with pytest.raises(ConfigError, match="--alpha"):
        dirichlet_partition([0, 1, 0, 1], 2, alpha=0.0, seed=0)


# --------------------------------------------------------------------------- the record
def _toy_pool() -> Pool:
    return Pool(ids=("a", "b", "c", "d", "e", "f"), labels=(0, 0, 1, 1, 1, 0))


def test_summarize_and_check_hand_computed(tmp_path: Path) -> None:
    # val_fraction 0.5: 2 cases -> 1 validation (round(1.0)), 3 cases -> 2 (round(1.5));
    # each site's cases share a class, so its counts do not depend on which are held back
    pool = _toy_pool()
    split = Split("source", {}, 0, "images", str(tmp_path), 0.0, 0, (
        SiteSplit("s0", ("a", "b")), SiteSplit("s1", ("c", "d", "e"))))
    spec = DataSpec(format="images", root=tmp_path, val_fraction=0.5)
    got = summarize(split, pool, spec, num_classes=2)
    assert got == [SiteSummary("s0", 1, 1, {0: 1, 1: 0}), SiteSummary("s1", 1, 2, {0: 0, 1: 1})]
    errs, warns = check_sites(got, batch_size=2, num_classes=2, class_names=("neg", "pos"),
                              classification=True)
    assert [e.field for e in errs] == ["site s0", "site s1"]
    assert "2 training cases" in errs[0].expected and errs[0].got == "1"
    assert warns == ["site s0 has no training case of class 1 (pos)",
                     "site s1 has no training case of class 0 (neg)"]
    strict, _ = check_sites(got, batch_size=1, num_classes=2, class_names=("neg", "pos"),
                            classification=True, require_all_classes=True)
    assert [e.field for e in strict] == ["site s0 class 1 (pos)", "site s1 class 0 (neg)"]
    empty, _ = check_sites([SiteSummary("s2", 0, 0, {0: 0, 1: 0})], batch_size=1,
                           num_classes=2, classification=True)
    assert [(e.field, e.got) for e in empty] == [("site s2", "none"), ("site s2", "none")]
    assert "validation" in empty[0].expected and "training" in empty[1].expected


def test_split_round_trip_and_bad_files(tmp_path: Path) -> None:
    split = make_split(_toy_pool(), DataSpec(format="images", root=tmp_path),
                       partitioner="dirichlet", sites=2, alpha=1.0, seed=5)
    path = split.save(tmp_path / "split.json")
    again = Split.load(path)
    assert again == split and again.params == {"sites": 2, "alpha": 1.0, "min_cases": 0}
    assert sorted(c for s in again.sites for c in s.cases) == list(_toy_pool().ids)
    raw = json.loads(path.read_text())
    raw["sites"][1]["cases"].append(raw["sites"][0]["cases"][0])
    (tmp_path / "overlap.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="disjoint"):
        Split.load(tmp_path / "overlap.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ConfigError, match="fedpacs-split/1"):
        Split.load(tmp_path / "other.json")
    with pytest.raises(DataError, match="not a site of the split"):
        split_site_cases(path, 2, list(_toy_pool().ids))
    with pytest.raises(DataError, match="not in this data set's pool") as err:
        split_site_cases(path, 0, ["zzz"])
    assert err.value.kind == "split-mismatch"


def test_segmentation_pool_refuses_label_skew(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="segmentation"):
        make_split(Pool(("a", "b"), None), DataSpec(format="nifti", root=tmp_path),
                   partitioner="dirichlet", sites=2, alpha=0.5, seed=0)
    with pytest.raises(ConfigError, match="--sources"):
        make_split(Pool(("a", "b"), None), DataSpec(format="nifti", root=tmp_path),
                   partitioner="source", sites=0, alpha=0.5, seed=0)


# --------------------------------------------------------------------------- the readers
def test_medmnist_split_saved_and_reloaded_gives_the_sites_data(tmp_path: Path,
                                                                 data_dir: Path) -> None:
    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    spec = DataSpec(format="medmnist", root=npz)
    pool = pool_cases(spec, BREAST)
    assert len(pool.ids) == 546 + 78 and pool.ids[0] == "train/000000"
    split = make_split(pool, spec, partitioner="dirichlet", sites=3, alpha=0.3, seed=2,
                       min_cases=32)
    path = split.save(tmp_path / "split.json")
    raw = read_medmnist(npz)
    labels = {f"{s}/{i:06d}": int(v) for s in ("train", "val")
              for i, v in enumerate(raw[f"{s}_labels"].reshape(-1))}
    spec3 = DataSpec(format="medmnist", root=npz, num_partitions=3, split=path)
    for i, site in enumerate(Split.load(path).sites):
        got = load_partition(replace(spec3, partition=i), BREAST)
        train, val = site_train_val(list(site.cases), spec3)
        # train rows of the train array first, then those of the val array (each sorted)
        order = sorted(train, key=lambda c: (not c.startswith("train/"), c))
        assert got.train.tensors[1].tolist() == [labels[c] for c in order]
        assert len(got.val) == len(val) > 0
        again = load_partition(replace(spec3, partition=i), BREAST)
        assert torch.equal(got.train.tensors[0], again.train.tensors[0])
    # no split: today's shards, unchanged (not the split's sites)
    plain = load_partition(DataSpec(format="medmnist", root=npz, num_partitions=3), BREAST)
    assert len(plain.train) == 182


def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, name in enumerate(("malignant", "normal_benign")):
        (root / name).mkdir(parents=True)
        for k in range(12):
            arr = rng.integers(0, 255, (28, 28), dtype=np.uint8) // (cls + 1)
            Image.fromarray(arr).save(root / name / f"img{k:02d}.png")


def test_image_folder_split_selects_the_sites_cases(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image_folder(root)
    spec = DataSpec(format="images", root=root, holdout_fraction=0.25, val_fraction=0.0)
    pool = pool_cases(spec, BREAST)
    assert len(pool.ids) == 18 and pool.labels is not None
    split = make_split(pool, spec, partitioner="iid", sites=2, alpha=0.5, seed=0)
    path = split.save(tmp_path / "split.json")
    for i, site in enumerate(split.sites):
        got = load_partition(DataSpec(format="images", root=root, holdout_fraction=0.25,
                                      val_fraction=0.0, partition=i, num_partitions=2,
                                      split=path), BREAST)
        want = [pool.labels[pool.ids.index(c)] for c in site.cases]
        assert got.train.tensors[1].tolist() == want
    # a split made with another holdout setting would train on held-out cases: refused
    with pytest.raises(DataError, match="not in this data set's pool"):
        load_partition(DataSpec(format="images", root=root, holdout_fraction=0.5,
                                partition=0, num_partitions=2, split=path), BREAST)


# --------------------------------------------------------------------------- site config
def _site_toml(data_line: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(f'[site]\nname = "a"\ntask = "breastmnist"\n[data]\n{data_line}\n')


def test_site_config_split_key(tmp_path: Path, data_dir: Path) -> None:
    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    (tmp_path / "split.json").write_text("{}")
    cfg = parse_site_config(_site_toml(f'format = "medmnist"\nroot = "{npz}"\n'
                                       'split = "split.json"'), source="t", base_dir=tmp_path)
    assert cfg.data.split == tmp_path / "split.json"
    plain = parse_site_config(_site_toml(f'format = "medmnist"\nroot = "{npz}"'), source="t",
                              base_dir=tmp_path)
    assert plain.data.split is None
    with pytest.raises(ConfigError) as err:
        parse_site_config(_site_toml(f'format = "medmnist"\nroot = "{npz}"\n'
                                     'split = "nope.json"'), source="t", base_dir=tmp_path)
    assert "data.split" in str(err.value) and "nope.json" in str(err.value)


# --------------------------------------------------------------------------- node mapping
def test_simulated_site_config_only_from_the_sites_own_side(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert simulated_site_config({"partition-id": 1}) is None  # no env: a deployed site
    monkeypatch.setenv(SIM_SITES_ENV, str(tmp_path))
    assert simulated_site_config({"partition-id": 7}) == str(tmp_path / "site-007.toml")
    for bad in ("../../etc/passwd", -1, True, None):
        with pytest.raises(ConfigError, match="partition-id"):
            simulated_site_config({"partition-id": bad})


def test_a_server_cannot_choose_a_virtual_sites_data(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     data_dir: Path) -> None:
    """Attack: the run config (the server's) names another site's file; the node reads
    the file of its own partition-id, and a deployed node's site-config always wins."""
    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    for i, name in enumerate(("mine", "victim")):
        sim_site_file(tmp_path, i).write_text(
            f'[site]\nname = "{name}"\ntask = "breastmnist"\n[data]\nformat = "medmnist"\n'
            f'root = "{npz}"\n')
    monkeypatch.setenv(SIM_SITES_ENV, str(tmp_path))
    evil = {"site-config": str(sim_site_file(tmp_path, 1)), "partition-id": 1}
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config=evil)
    assert load_site(ctx).name == "mine"
    deployed = Context(run_id=1, node_id=5, state=RecordDict(), run_config=evil,
                       node_config={"site-config": str(sim_site_file(tmp_path, 0)),
                                    "partition-id": 1})
    assert load_site(deployed).name == "mine"
