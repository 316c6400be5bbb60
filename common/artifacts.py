"""The global-model file format: one ``model.pt`` a researcher loads with one call.

The file is a plain ``torch.save`` of a dict of tensors and JSON-like values, so
``torch.load(weights_only=True)`` reads it without executing code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean_json(value), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def save_model(path: Path, *, model: nn.Module, task: TaskConfig, card: dict[str, Any]) -> str:
    """Write a model file atomically; returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": MODEL_FORMAT,
        "task": task.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "card": json.dumps(clean_json(card), sort_keys=True),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return sha256_file(path)


def load_model(path: str | Path, *, device: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a fedpacs model file: (network with weights, in eval mode; model card)."""
    p = Path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise DataError(str(p), f"not a readable fedpacs model file ({type(exc).__name__})",
                        "pull the model again or check the path") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise DataError(str(p), f"format is not {MODEL_FORMAT}",
                        "load files written by fedpacs (final/model.pt or rounds/NNN/model.pt)")
    task = TaskConfig.from_dict(payload["task"], source=f"{p}:task")
    model = build_model(task)
    model.load_state_dict(payload["state_dict"])
    model.to(pick_device(device or "auto")).eval()
    card = json.loads(payload["card"])
    card.setdefault("task", task.to_dict())
    return model, card
