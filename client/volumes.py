"""The converted-volume format of a site's PACS cache, in one place.

``fedpacs site ingest`` writes ``volumes/<SeriesInstanceUID>.npz`` (array, spacing, origin,
direction and a JSON ``meta`` with UIDs, modality and the fingerprint of the instances it
was built from); the site's data loader reads it back. Writes are atomic (a temporary
``*.tmp.npz`` renamed into place) and listings skip temporaries.
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
    """Write one volume atomically (a reader never sees a half-written file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name[:-len(SUFFIX)]}.{os.getpid()}{TMP_SUFFIX}")
    with tmp.open("wb") as f:
        np.savez(f, array=array, spacing=np.array(spacing), origin=np.array(origin),
                 direction=direction, meta=np.array(json.dumps(meta)))
    tmp.replace(dest)
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
