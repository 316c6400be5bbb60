"""The converted-volume format of a site's PACS cache, in one place.

``fedpacs site ingest`` writes ``volumes/<SeriesInstanceUID>.npz`` (array, spacing, origin,
direction and a JSON ``meta`` with UIDs, modality and the fingerprint of the instances it
was built from); the site's data loader reads it back. Writes are crash-safe (a temporary
``*.tmp.npz``, fsynced, renamed into place; removed when the write fails) and listings skip
temporaries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

VOLUMES_DIR = "volumes"
SUFFIX = ".npz"
TMP_SUFFIX = ".tmp.npz"


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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name[:-len(SUFFIX)]}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with tmp.open("wb") as f:
            np.savez(f, array=array, spacing=np.array(spacing), origin=np.array(origin),
                     direction=direction, meta=np.array(json.dumps(meta)))
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
