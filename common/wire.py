"""The wire format: model state <-> Flower ArrayRecord, in one place.

Every array that leaves a site or the server goes through :func:`model_to_arrays`, and
every array that is loaded into a model goes through :func:`check_arrays` first, so a
wrong-shaped, wrong-typed or non-finite update is refused with the offending key named.

A model travels *packed*: its whole state (parameters and buffers, in ``state_dict``
order) as one float32 vector under :data:`PACKED_KEY`. Flower 1.41 sends every Array of
a message as objects of their own, each pulled with its own request at every hop
(SuperLink, SuperNode, ClientApp, ServerApp): a ResNet-18 is 125 arrays, one packed
vector is one array. Both sides build the same model, whose state gives the layout back
(:func:`unpack`); aggregation is element-wise, so every strategy averages a packed vector
exactly as it averaged the arrays (integer buffers come back rounded, as before).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedpacs.common.contract import (  # the message's record keys, re-exported
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SITE_KEY,
    XVAL_MODEL_KEY,
)
from fedpacs.common.errors import FieldError, UpdateError

__all__ = ["ARRAYS_KEY", "CONFIG_KEY", "METRICS_KEY", "NUM_EXAMPLES", "SITE_KEY",
           "XVAL_MODEL_KEY"]

PACKED_KEY = "fedpacs-state"  # the one entry of a packed ArrayRecord
PACKED_DTYPE = np.float32

State = Mapping[str, torch.Tensor]


def pack(state: Mapping[str, torch.Tensor | np.ndarray]) -> np.ndarray:
    """A state's entries, flattened into one float32 vector in their order."""
    parts = [np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v,
                        dtype=PACKED_DTYPE).reshape(-1) for v in state.values()]
    return np.concatenate(parts) if parts else np.zeros(0, PACKED_DTYPE)


def unpack(flat: np.ndarray, reference: State) -> dict[str, np.ndarray]:
    """A packed vector split back into ``reference``'s entries (their shapes, float32);
    UpdateError when its size or type is not that of the reference's state."""
    total = sum(int(v.numel()) for v in reference.values())
    if flat.ndim != 1 or flat.size != total or not np.issubdtype(flat.dtype, np.floating):
        raise UpdateError([FieldError(
            "arrays", f"one floating vector of {total} values (the model's state, packed)",
            f"{flat.dtype} of shape {tuple(flat.shape)}",
            "build the model from the same task/network on both sides")])
    out, start = {}, 0
    for k, ref in reference.items():
        n = int(ref.numel())
        out[k] = flat[start:start + n].reshape(tuple(ref.shape))
        start += n
    return out


def is_packed(arrays: ArrayRecord) -> bool:
    return list(arrays.keys()) == [PACKED_KEY]


def model_to_arrays(model: nn.Module, *, counters: bool = True) -> ArrayRecord:
    """The model's full state (parameters and buffers), packed, as an ArrayRecord.

    ``counters=False`` sends the integer buffers (BatchNorm's ``num_batches_tracked``) as
    0: they count training batches, so they grow every round (84 after 3 PneumoniaMNIST
    rounds) and soon leave any SecAgg+ clip range; they are no weights, and a BatchNorm
    with a momentum (every network here) never reads them."""
    state = model.state_dict()
    if not counters:
        state = {k: v if v.is_floating_point() else torch.zeros_like(v)
                 for k, v in state.items()}
    return ArrayRecord({PACKED_KEY: Array(pack(state))})


def arrays_to_numpy(arrays: ArrayRecord, reference: State | None = None
                    ) -> dict[str, np.ndarray]:
    """Name -> numpy array for every entry of an ArrayRecord; a packed record is split by
    ``reference`` (the model's state_dict), which it then needs."""
    if is_packed(arrays):
        if reference is None:
            raise ValueError("a packed ArrayRecord is read with the model's state_dict")
        return unpack(arrays[PACKED_KEY].numpy(), reference)
    return {k: arrays[k].numpy() for k in arrays.keys()}


def check_state(reference: dict[str, torch.Tensor], update: dict[str, np.ndarray]
                ) -> list[FieldError]:
    """Compare an update with a model's state; returns every problem (empty when fine).

    Floating-point entries must match key, shape and be finite; integer buffers (such as
    BatchNorm's ``num_batches_tracked``) must match key and shape and may arrive as floats
    after averaging.
    """
    errors: list[FieldError] = []
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    for k in missing:
        errors.append(FieldError(f"arrays[{k!r}]", "present", "missing",
                                 "send the full model state_dict"))
    for k in extra:
        errors.append(FieldError(f"arrays[{k!r}]", "no such key", "an extra array",
                                 "build the model from the same task/network on both sides"))
    for k, ref in reference.items():
        if k not in update:
            continue
        arr = update[k]
        if tuple(arr.shape) != tuple(ref.shape):
            errors.append(FieldError(f"arrays[{k!r}].shape", str(tuple(ref.shape)),
                                     str(tuple(arr.shape)),
                                     "build the model from the same task/network on both sides"))
            continue
        if ref.is_floating_point():
            if not np.issubdtype(arr.dtype, np.floating):
                errors.append(FieldError(f"arrays[{k!r}].dtype", "a floating dtype",
                                         str(arr.dtype), "send float weights"))
                continue
            if not np.all(np.isfinite(arr)):
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                errors.append(FieldError(f"arrays[{k!r}]", "finite values",
                                         f"{bad} NaN/Inf value(s)",
                                         "lower the learning rate or check the site's data"))
        elif not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            errors.append(FieldError(f"arrays[{k!r}].dtype", "a numeric dtype", str(arr.dtype),
                                     "send numeric buffers"))
    return errors


def check_arrays(model: nn.Module, arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Validate an ArrayRecord against ``model``; returns it as numpy or raises UpdateError."""
    reference = model.state_dict()
    update = arrays_to_numpy(arrays, reference)
    errors = check_state(reference, update)
    if errors:
        raise UpdateError(errors)
    return update


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Check ``arrays`` against ``model`` and copy them in (dtype-cast per entry)."""
    update = check_arrays(model, arrays)
    state = model.state_dict()
    with torch.no_grad():
        for k, ref in state.items():
            ref.copy_(torch.from_numpy(np.asarray(update[k])).to(dtype=ref.dtype))


def positional(arrays: ArrayRecord) -> bool:
    """True for a SecAgg+ (legacy) record: entries named "0", "1", ... in state_dict order."""
    return list(arrays.keys()) == [str(i) for i in range(len(arrays))]


def named_arrays(model: nn.Module, arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` keyed by the model's state_dict names (or packed); a positional
    (legacy) record is renamed in order after its length is checked (one entry for a
    model of more: the packed state)."""
    if not positional(arrays) or len(arrays) == 0:
        return arrays
    names = list(model.state_dict())
    if len(arrays) == 1 and len(names) > 1:
        return ArrayRecord({PACKED_KEY: arrays["0"]})
    if len(names) != len(arrays):
        raise UpdateError([FieldError("arrays", f"{len(names)} arrays (one per state entry)",
                                      f"{len(arrays)}", "build the model from the same "
                                      "task/network on both sides")])
    return ArrayRecord({n: arrays[str(i)] for i, n in enumerate(names)})


def to_numpy_list(arrays: ArrayRecord) -> list[np.ndarray]:
    """The record's arrays in order (the legacy Parameters layout)."""
    return [arrays[k].numpy() for k in arrays.keys()]


def from_numpy_list(model: nn.Module, values: list[np.ndarray]) -> ArrayRecord:
    """A packed ArrayRecord from arrays in state_dict order, or from one packed vector
    (e.g. a SecAgg+ aggregate), checked against the model, integer buffers rounded."""
    names = list(model.state_dict())
    if len(values) == 1 and len(names) > 1:
        values = list(unpack(np.asarray(values[0]), model.state_dict()).values())
    if len(names) != len(values):
        raise UpdateError([FieldError("aggregate", f"{len(names)} arrays", str(len(values)),
                                      "build the model from the same task/network")])
    errors = check_state(model.state_dict(), dict(zip(names, values, strict=True)))
    if errors:
        raise UpdateError(errors)
    out = {}
    for (name, ref), v in zip(model.state_dict().items(), values, strict=True):
        t = torch.from_numpy(np.asarray(v))
        out[name] = (t.round() if not ref.is_floating_point() else t).to(dtype=ref.dtype)
    return ArrayRecord({PACKED_KEY: Array(pack(out))})


def update_norm(update: dict[str, np.ndarray], reference: dict[str, torch.Tensor]) -> float:
    """L2 distance between an update and the reference state over floating-point entries."""
    total = 0.0
    for k, ref in reference.items():
        if ref.is_floating_point() and k in update:
            d = np.asarray(update[k], dtype=np.float64) - ref.detach().cpu().double().numpy()
            total += float(np.sum(d * d))
    return float(np.sqrt(total))
