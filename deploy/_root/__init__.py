"""fedpacs: federated multi-site training for medical imaging.

Researchers load a downloaded global model with one call::

    import fedpacs
    model, card = fedpacs.load_model("runs/demo/final/model.pt")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def load_model(path: str, *, device: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a global model saved by a fedpacs server: returns (model in eval mode, card)."""
    from fedpacs.common.artifacts import load_model as _load

    return _load(path, device=device)


__all__ = ["__version__", "load_model"]
