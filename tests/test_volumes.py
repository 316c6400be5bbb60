"""The converted-volume format (fedpacs.client.volumes): one writer, one reader, and
listings that never hand a half-written temporary to the data loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpacs.client.volumes import (
    TMP_SUFFIX,
    list_volumes,
    load_volume,
    save_volume,
    volume_meta,
    volume_path,
)


def write(root: Path, uid: str) -> Path:
    return save_volume(volume_path(root, uid), array=np.arange(24, dtype=np.float32)
                       .reshape(2, 3, 4), spacing=(2.0, 0.5, 0.5), origin=(1.0, 2.0, 3.0),
                       direction=np.eye(3), meta={"series_uid": uid, "fingerprint": "f1"})


def test_round_trip(tmp_path: Path) -> None:
    p = write(tmp_path, "1.2.3")
    assert p == tmp_path / "volumes" / "1.2.3.npz"
    arr, meta = load_volume(p)
    assert arr.shape == (2, 3, 4) and arr.dtype == np.float32 and arr[1, 2, 3] == 23
    assert meta["spacing"] == (2.0, 0.5, 0.5) and meta["origin"] == (1.0, 2.0, 3.0)
    assert np.array_equal(meta["direction"], np.eye(3)) and meta["series_uid"] == "1.2.3"
    assert volume_meta(p) == {"series_uid": "1.2.3", "fingerprint": "f1"}
    assert volume_meta(tmp_path / "volumes" / "absent.npz") == {}


def test_list_volumes_skips_temporaries(tmp_path: Path) -> None:
    a, b = write(tmp_path, "1.2.3"), write(tmp_path, "1.2.10")
    # a writer killed mid-save leaves its temporary behind (save_volume's naming)
    (tmp_path / "volumes" / f"1.2.4.{12345}{TMP_SUFFIX}").write_bytes(b"half")
    (tmp_path / "volumes" / f"1.2.5{TMP_SUFFIX}").write_bytes(b"half")
    (tmp_path / "volumes" / "notes.txt").write_text("not a volume")
    assert list_volumes(tmp_path) == sorted([a, b])
    assert [p.stem for p in list_volumes(tmp_path)] == ["1.2.10", "1.2.3"]  # = series UIDs
    assert not list((tmp_path / "volumes").glob(f"1.2.3*{TMP_SUFFIX}"))  # writes renamed


def test_list_volumes_of_an_empty_cache(tmp_path: Path) -> None:
    assert list_volumes(tmp_path) == []


def test_save_replaces_atomically(tmp_path: Path) -> None:
    p = write(tmp_path, "1.2.3")
    save_volume(p, array=np.zeros((1, 2, 2), np.float32), spacing=(1.0, 1.0, 1.0),
                origin=(0.0, 0.0, 0.0), direction=np.eye(3), meta={"fingerprint": "f2"})
    assert volume_meta(p)["fingerprint"] == "f2" and load_volume(p)[0].shape == (1, 2, 2)
    assert list_volumes(tmp_path) == [p]


@pytest.mark.parametrize("uid", ["1.2.840.113619.2.55.3", "9"])
def test_path_is_uid_named(tmp_path: Path, uid: str) -> None:
    assert volume_path(tmp_path, uid).name == f"{uid}.npz"
