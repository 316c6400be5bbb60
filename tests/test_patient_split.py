"""Patient-level splits of a PACS site (fedpacs.client.data): a cache ingested from the
fake PACS (tests/fakepacs.py) with several patients of 2-3 series each (some in two
studies); every series of a patient lands in one partition and one of train/validation,
for several seeds and partition counts; the manifest's ``group``/``PatientID`` columns
override the grouping; volumes without a patient key fall back to their study and are
counted; the stored key is a salted hash, never the PatientID."""

from __future__ import annotations

import csv
import hashlib
import shutil
import stat
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from fedpacs.client import volumes
from fedpacs.client.data import (
    PacsSiteData,
    load_site_data,
    pacs_split,
    split_groups,
    volume_groups,
)
from fedpacs.client.ingest import ingest
from fedpacs.client.pacs import CohortQuery, PacsConfig
from fedpacs.common.config import DataSpec
from fedpacs.common.datasets import partition_ids, split_ids
from fedpacs.common.tasks import TaskConfig
from tests.fakepacs import FakePacs, ct_series

PACS = PacsConfig(port=1)  # never dialled: the fake transport is injected
# patient -> series per study: P0's three series are in two studies, so a study is no patient
PATIENTS = {"P0": (2, 1), "P1": (2,), "P2": (3,), "P3": (1, 1), "P4": (2,), "P5": (1, 2),
            "P6": (2,), "P7": (1, 1, 1)}
TASK = TaskConfig(name="t", kind="classification", network="resnet18", spatial_dims=2,
                  in_channels=1, num_classes=2, input_shape=(8, 8))
SEEDS = (0, 1, 2, 3, 4)


def patient_series() -> tuple[list[Dataset], dict[str, str]]:
    """One-slice CT series of every patient, and SeriesInstanceUID -> PatientID."""
    datasets: list[Dataset] = []
    owner: dict[str, str] = {}
    for pid, studies in PATIENTS.items():
        for n_series in studies:
            study = ""
            for _ in range(n_series):
                series = ct_series(1, study_uid=study)
                study = str(series[0].StudyInstanceUID)
                for ds in series:
                    ds.PatientID = pid
                owner[str(series[0].SeriesInstanceUID)] = pid
                datasets += series
    return datasets, owner


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("cache")
    datasets, owner = patient_series()
    summary = ingest(PACS, CohortQuery(), root, transport=FakePacs(datasets))
    assert summary.skipped == [] and summary.converted == len(owner)
    return root, owner


@pytest.fixture()
def cache(built: tuple[Path, dict[str, str]], tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the built cache this test may change."""
    root, owner = built
    shutil.copytree(root, tmp_path / "cache")
    return tmp_path / "cache", owner


def write_manifest(path: Path, owner: dict[str, str],
                   extra: dict[str, dict[str, str]] | None = None) -> Path:
    """A label manifest (every series labelled 1) with optional extra columns per series."""
    extra = extra or {}
    columns = sorted({c for row in extra.values() for c in row})
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["SeriesInstanceUID", "label", *columns])
        for uid in sorted(owner):
            w.writerow([uid, 1, *(extra.get(uid, {}).get(c, "") for c in columns)])
    return path


def spec(root: Path, labels: Path | None, *, seed: int = 0, partition: int = 0,
         num_partitions: int = 1) -> DataSpec:
    return DataSpec("pacs", root, partition=partition, num_partitions=num_partitions,
                    val_fraction=0.3, seed=seed, labels=labels)


def patients(uids: list[str], owner: dict[str, str]) -> set[str]:
    return {owner[u] for u in uids}


def series_level_leaks(owner: dict[str, str]) -> bool:
    """Whether the old split (partition and split the series themselves) puts a patient
    on both sides for some seed and partition count of this test."""
    for seed in SEEDS:
        for num in (1, 2, 3):
            for part in range(num):
                mine = partition_ids(list(owner), partition=part, num_partitions=num, seed=seed)
                train, val = split_ids(mine, holdout_fraction=0.3, seed=seed + 7)
                if patients(train, owner) & patients(val, owner):
                    return True
    return False


def test_no_patient_in_both_splits(built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, owner = built
    labels = write_manifest(tmp_path / "labels.csv", owner)
    assert series_level_leaks(owner)  # what this test would catch
    for seed in SEEDS:
        for num in (1, 2, 3):
            seen: dict[str, int] = {}  # patient -> its partition
            covered: list[str] = []
            for part in range(num):
                s = pacs_split(spec(root, labels, seed=seed, partition=part, num_partitions=num))
                train, val = patients(s.train, owner), patients(s.val, owner)
                assert not train & val, (seed, num, part)
                for pid in train | val:
                    assert seen.setdefault(pid, part) == part  # one partition per patient
                covered += s.train + s.val
                assert s.no_patient_key == 0
            assert sorted(covered) == sorted(owner)  # every series, once
        one = pacs_split(spec(root, labels, seed=seed))
        assert one.train and one.val


def test_split_is_deterministic_independent_of_order_and_salt() -> None:
    groups = {f"1.2.{i}": f"patient:{i % 5}" for i in range(17)}
    backwards = dict(reversed(list(groups.items())))
    for seed in SEEDS:
        assert split_groups(groups, partition=1, num_partitions=2, val_fraction=0.4,
                            seed=seed) == split_groups(backwards, partition=1,
                                                       num_partitions=2, val_fraction=0.4,
                                                       seed=seed)
    outcomes = {tuple(split_groups(groups, partition=0, num_partitions=1, val_fraction=0.4,
                                   seed=s)[1]) for s in SEEDS}
    assert len(outcomes) > 1  # the seed does choose
    renamed = {v: hashlib.sha256(g.encode()).hexdigest() for v, g in groups.items()}  # salt
    assert split_groups(renamed, partition=0, num_partitions=1, val_fraction=0.4,
                        seed=0) == split_groups(groups, partition=0, num_partitions=1,
                                                val_fraction=0.4, seed=0)
    singles = {v: v for v in groups}  # one series per patient: the series-level split
    mine = partition_ids(list(groups), partition=1, num_partitions=2, seed=4)
    assert split_groups(singles, partition=1, num_partitions=2, val_fraction=0.4, seed=4) == \
        split_ids(mine, holdout_fraction=0.4, seed=4 + 7)


def test_load_site_data_trains_on_patient_groups(
        cache: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, owner = cache
    labels = write_manifest(tmp_path / "labels.csv", owner)
    data = load_site_data(spec(root, labels, seed=3), TASK)
    split = pacs_split(spec(root, labels, seed=3))
    assert isinstance(data, PacsSiteData) and data.skipped == [] and data.notes == []
    assert (len(data.train), len(data.val)) == (len(split.train), len(split.val))  # 1 slice


def test_group_column_overrides_the_patient(built: tuple[Path, dict[str, str]],
                                            tmp_path: Path) -> None:
    root, owner = built
    family = {"P0", "P1", "P2"}  # one group in the manifest: never split apart
    extra = {u: {"group": "family"} for u, p in owner.items() if p in family}
    labels = write_manifest(tmp_path / "labels.csv", owner, extra)
    plain = write_manifest(tmp_path / "plain.csv", owner)
    apart = 0
    for seed in SEEDS:
        s = pacs_split(spec(root, labels, seed=seed))
        assert patients(s.train, owner) & family in (set(), family)
        assert patients(s.val, owner) & family in (set(), family)
        assert {s.groups[u] for u in extra} == {"group:family"}
        p = pacs_split(spec(root, plain, seed=seed))
        apart += bool(patients(p.train, owner) & family and patients(p.val, owner) & family)
    assert apart  # without the column, the three patients do fall on both sides


def test_patient_id_column_joins_a_patients_keyed_series(
        cache: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, owner = cache
    [loose, *rest] = sorted(u for u, p in owner.items() if p == "P2")
    strip_keys(root, [loose])
    labels = write_manifest(tmp_path / "labels.csv", owner, {loose: {"PatientID": "P2"}})
    s = pacs_split(spec(root, labels))
    assert s.groups[loose] == s.groups[rest[0]] == s.groups[rest[1]]
    assert s.no_patient_key == 0  # the manifest grouped it
    assert "P2" not in s.groups[loose]  # hashed like a stored key


def strip_keys(root: Path, uids: list[str]) -> None:
    """Rewrite volumes as converted before patient keys (no key fields in their meta)."""
    for uid in uids:
        path = volumes.volume_path(root, uid)
        arr, meta = volumes.load_volume(path)
        geometry = {k: meta.pop(k) for k in ("spacing", "origin", "direction")}
        meta.pop(volumes.PATIENT_KEY)
        meta.pop(volumes.PATIENT_KEY_SALT)
        volumes.save_volume(path, array=arr, meta=meta, **geometry)


def test_volumes_without_a_key_fall_back_to_their_study(
        cache: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, owner = cache
    p0 = sorted(u for u, p in owner.items() if p == "P0")  # 2 series in one study, 1 in another
    strip_keys(root, p0)
    studies = {u: str(volumes.volume_meta(volumes.volume_path(root, u))["study_uid"])
               for u in p0}
    labels = write_manifest(tmp_path / "labels.csv", owner)
    s = pacs_split(spec(root, labels))
    assert s.no_patient_key == 3
    assert {s.groups[u] for u in p0} == {f"study:{studies[u]}" for u in p0}  # two groups
    for seed in SEEDS:  # each study still whole on one side
        t = pacs_split(spec(root, labels, seed=seed))
        for study in set(studies.values()):
            mine = {u for u in p0 if studies[u] == study}
            assert mine <= set(t.train) or mine <= set(t.val)

    data = load_site_data(spec(root, labels), TASK)
    assert isinstance(data, PacsSiteData)
    [note] = data.notes
    assert note.startswith(f"3 of {len(owner)} volumes have no patient key")


def test_reingest_adds_the_key_to_old_volumes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    datasets, owner = patient_series()
    ingest(PACS, CohortQuery(), root, transport=FakePacs(datasets))
    p3 = sorted(u for u, p in owner.items() if p == "P3")  # two studies
    strip_keys(root, p3)
    labels = write_manifest(tmp_path / "labels.csv", owner)
    assert pacs_split(spec(root, labels)).no_patient_key == 2
    again = ingest(PACS, CohortQuery(), root, transport=FakePacs(datasets))
    assert again.skipped == [] and again.retrieved == 0  # converted from the cache
    s = pacs_split(spec(root, labels))
    assert s.no_patient_key == 0 and s.groups[p3[0]] == s.groups[p3[1]]


def test_stored_key_is_a_salted_hash_not_the_patient_id(
        built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, owner = built
    metas = {u: volumes.volume_meta(volumes.volume_path(root, u)) for u in owner}
    keys = {u: m[volumes.PATIENT_KEY] for u, m in metas.items()}
    for u, key in keys.items():
        assert len(key) == 64 and owner[u] not in key
        assert {k for v, k in keys.items() if owner[v] == owner[u]} == {key}  # one per patient
    assert len(set(keys.values())) == len(PATIENTS)
    for path in volumes.list_volumes(root):  # no PatientID in any file the trainer reads
        raw = path.read_bytes()
        assert not any(f'"{pid}"'.encode() in raw for pid in PATIENTS)
    salt_file = root / volumes.SALT_FILE
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = volumes.cache_salt(root)
    assert salt is not None and keys[next(iter(owner))] == volumes.patient_key(
        salt, owner[next(iter(owner))])
    other = volumes.make_salt(tmp_path / "other-cache")  # another site's cache: other keys
    assert other != salt and volumes.patient_key(other, "P0") != volumes.patient_key(salt, "P0")
    assert volumes.make_salt(tmp_path / "other-cache") == other  # made once
    assert volumes.stored_patient_key(metas[next(iter(owner))], other) == ""  # wrong salt


def test_no_patient_id_means_no_key(tmp_path: Path) -> None:
    series = ct_series(1)
    for ds in series:
        ds.PatientID = ""
    ingest(PACS, CohortQuery(), tmp_path, transport=FakePacs(series))
    [path] = volumes.list_volumes(tmp_path)
    groups, fallback = volume_groups([path], {}, volumes.cache_salt(tmp_path))
    assert fallback == 1 and groups[path.stem] == f"study:{series[0].StudyInstanceUID}"
    assert volumes.volume_meta(path)[volumes.PATIENT_KEY] == ""



def test_site_check_prints_the_note(cache: tuple[Path, dict[str, str]],
                                    tmp_path: Path) -> None:
    """`fedpacs site check` says how many volumes had no patient key, and the fix."""
    from typer.testing import CliRunner

    from fedpacs.deploy.cli import cli

    root, owner = cache
    strip_keys(root, sorted(owner)[:2])
    labels = write_manifest(tmp_path / "labels.csv", owner)
    site = tmp_path / "site.toml"
    site.write_text(f'[site]\nname = "h-a"\ntask = "t"\n[data]\nformat = "pacs"\n'
                    f'root = "{root}"\nlabels = "{labels}"\nval_fraction = 0.3\n'
                    '[task]\nname = "t"\nkind = "classification"\nnetwork = "resnet18"\n'
                    'spatial_dims = 2\nin_channels = 1\nnum_classes = 2\n'
                    'input_shape = [8, 8]\n')
    res = CliRunner().invoke(cli, ["site", "check", "--config", str(site)])
    assert res.exit_code == 0, res.output
    assert f"note: 2 of {len(owner)} volumes have no patient key" in res.output
