from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedpacs.common import wire
from fedpacs.common.errors import UpdateError
from fedpacs.common.models import build_model
from fedpacs.common.tasks import TASK_PRESETS


def _model() -> torch.nn.Module:
    return build_model(TASK_PRESETS["breastmnist"], seed=3)


def test_round_trip_is_exact() -> None:
    src, dst = _model(), build_model(TASK_PRESETS["breastmnist"], seed=4)
    wire.load_arrays(dst, wire.model_to_arrays(src))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_wrong_shape_names_the_key() -> None:
    m = _model()
    arrays = wire.arrays_to_numpy(wire.model_to_arrays(m))
    key = next(k for k, v in arrays.items() if v.ndim == 4)
    arrays[key] = np.zeros((1, 2, 3), dtype=np.float32)
    with pytest.raises(UpdateError) as exc:
        wire.load_arrays(m, ArrayRecord(torch_state_dict={k: torch.from_numpy(v)
                                                          for k, v in arrays.items()}))
    assert key in str(exc.value) and "(1, 2, 3)" in str(exc.value)


def test_nan_update_is_rejected() -> None:
    m = _model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("nan")
    with pytest.raises(UpdateError) as exc:
        wire.load_arrays(m, ArrayRecord(torch_state_dict=state))
    assert key in str(exc.value) and "NaN" in str(exc.value)


def test_missing_and_extra_keys() -> None:
    m = _model()
    state = dict(m.state_dict())
    dropped = next(iter(state))
    state.pop(dropped)
    state["bogus.weight"] = torch.zeros(1)
    errors = wire.check_state(m.state_dict(), {k: v.numpy() for k, v in state.items()})
    fields = {e.field for e in errors}
    assert f"arrays[{dropped!r}]" in fields and "arrays['bogus.weight']" in fields
