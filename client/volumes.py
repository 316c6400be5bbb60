"""The converted-volume format of a site's PACS cache, in one place.

``fedpacs site ingest`` writes ``volumes/<SeriesInstanceUID>.npz`` (array, spacing, origin,
direction and a JSON ``meta`` with UIDs, modality and the fingerprint of the instances it
was built from); the site's data loader reads it back. Writes are crash-safe (a temporary
``*.tmp.npz``, fsynced, renamed into place; removed when the write fails) and listings skip
temporaries.

Patient keys: a volume's ``meta`` carries ``patient_key``, a keyed hash (HMAC-SHA256) of
its PatientID under the cache's own random salt (``patient-key.salt`` in the cache folder,
made once, readable by the site's user only), and ``patient_key_salt``, which salt made it.
The data loader groups a patient's series by that key, so no PatientID is in a file the
trainer reads, and the key means nothing outside this cache. A volume converted before
patient keys, or under another salt (the salt file was deleted), has no valid key;
``fedpacs site ingest`` converts it again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from fedpacs.common.errors import DataError

VOLUMES_DIR = "volumes"
SUFFIX = ".npz"
TMP_SUFFIX = ".tmp.npz"
SALT_FILE = "patient-key.salt"
SALT_BYTES = 32
PATIENT_KEY = "patient_key"
PATIENT_KEY_SALT = "patient_key_salt"


def volume_path(cache_root: Path, series_uid: str) -> Path:
    return cache_root / VOLUMES_DIR / f"{series_uid}{SUFFIX}"


def list_volumes(cache_root: Path) -> list[Path]:
    """Every converted volume of a cache, sorted; half-written temporaries are skipped."""
    return sorted(p for p in (cache_root / VOLUMES_DIR).glob(f"*{SUFFIX}")
                  if not p.name.endswith(TMP_SUFFIX))


def save_volume(dest: Path, *, array: np.ndarray, spacing: tuple[float, ...],
                origin: tuple[float, ...], direction: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write one volume crash-safe: a temporary, flushed and fsynced, renamed over ``dest``,
    then the folder fsynced. A reader never sees a half-written file; a write that fails
    (disk full, an error while saving) removes its temporary and leaves ``dest`` as it was;
    a killed writer leaves at most a temporary that :func:`list_volumes` skips."""
    return _write_npz(dest, array=array, spacing=np.array(spacing), origin=np.array(origin),
                      direction=direction, meta=np.array(json.dumps(meta)))


def _write_npz(dest: Path, **arrays: np.ndarray) -> Path:
    """``arrays`` as ``dest`` (.npz), crash-safe: a temporary, flushed and fsynced, renamed
    into place, then the folder fsynced; a failed write removes its temporary."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name[:-len(SUFFIX)]}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dest


def load_volume(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A converted volume and its geometry and UIDs (``meta`` plus spacing/origin/direction)."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        meta.update(spacing=tuple(z["spacing"].tolist()), origin=tuple(z["origin"].tolist()),
                    direction=z["direction"])
        return z["array"], meta


def volume_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` of a converted volume without reading its array ({} when absent)."""
    if not path.is_file():
        return {}
    with np.load(path) as z:
        return dict(json.loads(str(z["meta"])))


def cache_salt(cache_root: Path) -> bytes | None:
    """The cache's salt of patient keys, None when it has none yet."""
    path = cache_root / SALT_FILE
    return _read_salt(path) if path.is_file() else None


def make_salt(cache_root: Path) -> bytes:
    """The cache's salt of patient keys, made (random, mode 0600) when absent. Two
    processes that make it at once agree on one: each links its own temporary into place
    and the one that comes second reads the first one's."""
    path = cache_root / SALT_FILE
    if path.is_file():
        return _read_salt(path)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{SALT_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SALT_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a salt that is already there
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_salt(path)


def _read_salt(path: Path) -> bytes:
    salt = path.read_bytes()
    if len(salt) != SALT_BYTES:
        raise DataError(str(path), f"{len(salt)} bytes, expected {SALT_BYTES}", "delete it "
                        "and run `fedpacs site ingest` again (it makes a new salt and "
                        "converts every volume again)")
    return salt


def salt_id(salt: bytes) -> str:
    """Which salt made a key (a hash of the salt: says nothing about it)."""
    return hashlib.sha256(b"fedpacs salt id\0" + salt).hexdigest()[:16]


def patient_key(salt: bytes, patient_id: str) -> str:
    """The keyed hash of a PatientID ("" for none): equal for equal IDs in one cache."""
    pid = patient_id.strip()
    return hmac.new(salt, pid.encode("utf-8"), "sha256").hexdigest() if pid else ""


def patient_meta(salt: bytes, patient_id: str) -> dict[str, str]:
    """The patient-key fields of a volume's ``meta``."""
    return {PATIENT_KEY: patient_key(salt, patient_id), PATIENT_KEY_SALT: salt_id(salt)}


def stored_patient_key(meta: dict[str, Any], salt: bytes | None) -> str:
    """A volume's patient key when made under ``salt``, else "" (none, or another salt)."""
    if salt is None or meta.get(PATIENT_KEY_SALT) != salt_id(salt):
        return ""
    return str(meta.get(PATIENT_KEY) or "")


# --------------------------------------------------------------------------- label maps
# ``fedpacs site ingest`` turns a DICOM SEG or RTSTRUCT of a cohort series into a label map
# on that series' grid: ``labels/<image SeriesInstanceUID>.npz`` (``mask``: int16 (slice,
# row, column), 0 = background, class i where segment/ROI i of ``meta["classes"]`` is; and a
# JSON ``meta`` with the source SOP class, the label series' UID and its fingerprint). The
# site's data loader takes it as the series' mask when its label manifest gives none.
LABELS_DIR = "labels"


def label_path(cache_root: Path, image_series_uid: str) -> Path:
    return cache_root / LABELS_DIR / f"{image_series_uid}{SUFFIX}"


def save_label(dest: Path, *, mask: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write one label map crash-safe (as :func:`save_volume`)."""
    return _write_npz(dest, mask=mask.astype(np.int16), meta=np.array(json.dumps(meta)))


def load_label(cache_root: Path, image_series_uid: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The label map of an image series (int64, (slice, row, column)) and its meta; None
    when the cache has none."""
    path = label_path(cache_root, image_series_uid)
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["mask"].astype(np.int64), dict(json.loads(str(z["meta"])))
