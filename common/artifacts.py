"""The global-model file format: one ``model.pt`` a researcher loads with one call.

The file is a plain ``torch.save`` of a dict of tensors and JSON-like values, so
``torch.load(weights_only=True)`` reads it without executing code.

Every file here is written crash-safe (:func:`atomic_write`): into a temp file of a
unique hidden name in the same folder, flushed and fsynced, renamed over the target,
then the folder fsynced. A kill at any moment leaves either the old file or the new one
under the target's name (and at worst a stray ``.NAME.*.tmp`` beside it).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from fedpacs.common.errors import DataError
from fedpacs.common.hashing import sha256_file
from fedpacs.common.models import build_model, pick_device
from fedpacs.common.tasks import TaskConfig

MODEL_FORMAT = "fedpacs-model/1"


def clean_json(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def temp_name(path: Path) -> Path:
    """A fresh temp file beside ``path``: hidden, unique, never ``path``'s own name."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def is_temp_of(candidate: Path, path: Path) -> bool:
    """Whether ``candidate`` is a temp file :func:`atomic_write` made for ``path``."""
    return candidate.parent == path.parent and candidate.name.startswith(f".{path.name}.") \
        and candidate.name.endswith(".tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (its directory entry reaches the disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` crash-safe: ``write`` fills a unique temp file in the same folder,
    which is flushed, fsynced and renamed over ``path``; then the folder is fsynced. A
    kill at any moment leaves the old file or the new one, never a part of either; a
    failed write removes its temp file and leaves the old file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # (umask applies)
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json(path: Path, value: Any) -> None:
    """Write JSON crash-safe (:func:`atomic_write`), so readers never see half a file."""
    text = json.dumps(clean_json(value), indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_tensors(path: Path, payload: dict[str, Any]) -> str:
    """``torch.save`` of ``payload`` (tensors and JSON-like values) crash-safe; returns
    the file's SHA-256."""
    atomic_write(path, lambda f: torch.save(payload, f))
    return sha256_file(path)


def save_model(path: Path, *, model: nn.Module, task: TaskConfig, card: dict[str, Any]) -> str:
    """Write a model file crash-safe (:func:`atomic_write`); returns its SHA-256."""
    payload = {
        "format": MODEL_FORMAT,
        "task": task.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "card": json.dumps(clean_json(card), sort_keys=True),
    }
    return save_tensors(path, payload)


def read_model_file(path: Path) -> dict[str, Any]:
    """A model file's payload (format checked; tensors on the CPU), or DataError naming
    the file: unreadable, truncated, or not a fedpacs model file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError,
            pickle.UnpicklingError) as exc:
        raise DataError(str(path), f"not a readable fedpacs model file ({type(exc).__name__})",
                        "pull the model again or check the path", kind="unreadable-model") \
            from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT \
            or not isinstance(payload.get("task"), dict) \
            or not isinstance(payload.get("state_dict"), dict) \
            or not isinstance(payload.get("card"), str):
        raise DataError(str(path), f"format is not {MODEL_FORMAT}",
                        "load files written by fedpacs (final/model.pt or rounds/NNN/model.pt)",
                        kind="not-a-model")
    return payload


def load_model(path: str | Path, *, device: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a fedpacs model file: (network with weights, in eval mode; model card)."""
    p = Path(path)
    payload = read_model_file(p)
    task = TaskConfig.from_dict(payload["task"], source=f"{p}:task")
    model = build_model(task)
    model.load_state_dict(payload["state_dict"])
    model.to(pick_device(device or "auto")).eval()
    card = json.loads(payload["card"])
    card.setdefault("task", task.to_dict())
    return model, card
