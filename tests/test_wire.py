from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedpacs.common import wire
from fedpacs.common.errors import UpdateError
from fedpacs.common.models import build_model
from fedpacs.common.tasks import TASK_PRESETS, get_task


def _model() -> torch.nn.Module:
    return build_model(TASK_PRESETS["breastmnist"], seed=3)


def test_round_trip_is_exact() -> None:
    src, dst = _model(), build_model(TASK_PRESETS["breastmnist"], seed=4)
    wire.load_arrays(dst, wire.model_to_arrays(src))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_wrong_shape_names_the_key() -> None:
    m = _model()
    arrays = wire.arrays_to_numpy(wire.model_to_arrays(m), m.state_dict())
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


# ------------------------------------------------------------------ the packed layout
def _packed(flat: np.ndarray) -> ArrayRecord:
    return ArrayRecord({wire.PACKED_KEY: Array(flat)})


def _offsets(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Where each entry starts in the packed vector (state_dict order)."""
    out, start = {}, 0
    for k, v in state.items():
        out[k] = start
        start += v.numel()
    return out


def test_a_resnet18_travels_as_one_array() -> None:
    model = build_model(get_task("breastmnist"))
    state = model.state_dict()
    assert len(state) == 125
    arrays = wire.model_to_arrays(model)
    assert list(arrays.keys()) == [wire.PACKED_KEY] and wire.is_packed(arrays)
    flat = arrays[wire.PACKED_KEY].numpy()
    assert flat.dtype == np.float32 and flat.shape == (sum(v.numel() for v in state.values()),)
    with pytest.raises(ValueError, match="state_dict"):  # the layout comes from the model
        wire.arrays_to_numpy(arrays)


def test_pack_unpack_round_trip_keeps_every_entry_and_integer_buffers() -> None:
    model = _model()
    counters = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    assert counters and all(k.endswith("num_batches_tracked") for k in counters)
    with torch.no_grad():
        for i, k in enumerate(counters):
            model.state_dict()[k].fill_(1000 + i)
    state = model.state_dict()
    back = wire.unpack(wire.pack(state), state)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].shape == tuple(v.shape) and back[k].dtype == np.float32, k
        assert np.array_equal(back[k], v.numpy().astype(np.float32)), k
    # an averaged counter arrives as a float; from_numpy_list makes it a whole number again
    averaged = wire.pack(state)
    averaged[_offsets(state)[counters[0]]] += 0.4  # a weighted mean of the sites' counts
    for record in (wire.from_numpy_list(model, [averaged]),
                   wire.from_numpy_list(model, list(wire.unpack(averaged, state).values()))):
        assert wire.is_packed(record)
        dst = build_model(TASK_PRESETS["breastmnist"], seed=4)
        wire.load_arrays(dst, record)
        for i, k in enumerate(counters):
            got = dst.state_dict()[k]
            assert got.dtype == torch.int64 and int(got) == 1000 + i, k
        for k, v in state.items():
            if v.is_floating_point():
                assert torch.equal(dst.state_dict()[k], v), k


def test_a_legacy_positional_record_of_one_vector_is_the_packed_state() -> None:
    """SecAgg+ hands the site the model as the legacy Parameters: entries "0", "1", ..."""
    src, dst = _model(), build_model(TASK_PRESETS["breastmnist"], seed=4)
    legacy = ArrayRecord(numpy_ndarrays=wire.to_numpy_list(wire.model_to_arrays(src)))
    assert list(legacy.keys()) == ["0"]
    named = wire.named_arrays(dst, legacy)
    assert wire.is_packed(named)
    wire.load_arrays(dst, named)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


@pytest.mark.parametrize("flat", [
    pytest.param(lambda n: np.zeros(n - 1, np.float32), id="one-short"),
    pytest.param(lambda n: np.zeros(n + 1, np.float32), id="one-long"),
    pytest.param(lambda n: np.zeros((1, n), np.float32), id="not-a-vector"),
    pytest.param(lambda n: np.zeros(n, np.int64), id="integer"),
    pytest.param(lambda n: np.zeros(n, np.int32), id="int32"),
])
def test_a_packed_vector_that_is_not_the_models_is_refused(
        flat: Callable[[int], np.ndarray]) -> None:
    model = _model()
    total = sum(v.numel() for v in model.state_dict().values())
    bad = flat(total)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UpdateError) as exc:
        wire.load_arrays(model, _packed(bad))
    assert [e.field for e in exc.value.errors] == ["arrays"]
    assert f"{total} values" in str(exc.value)
    assert f"{bad.dtype} of shape {bad.shape}" in str(exc.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    with pytest.raises(UpdateError):  # the SecAgg+ aggregate path refuses it the same way
        wire.from_numpy_list(model, [bad])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_nan_inside_the_packed_vector_names_its_key(bad_value: float) -> None:
    model = _model()
    state = model.state_dict()
    floats = [k for k, v in state.items() if v.is_floating_point()]
    key = floats[len(floats) // 2]  # an entry in the middle of the vector, not the first
    flat = wire.pack(state)
    flat[_offsets(state)[key] + state[key].numel() - 1] = bad_value  # its last value
    with pytest.raises(UpdateError) as exc:
        wire.check_arrays(model, _packed(flat))
    assert [e.field for e in exc.value.errors] == [f"arrays[{key!r}]"]
    assert "1 NaN/Inf value(s)" in str(exc.value)
    with pytest.raises(UpdateError) as exc:
        wire.from_numpy_list(model, [flat])
    assert [e.field for e in exc.value.errors] == [f"arrays[{key!r}]"]


def test_batch_counters_can_travel_as_zero_so_that_secagg_can_carry_an_update() -> None:
    from fedpacs.client.secure import check_maskable

    model = build_model(get_task("pneumoniamnist"))
    with torch.no_grad():  # after 3 rounds of PneumoniaMNIST (measured: 84 batches)
        for v in model.state_dict().values():
            if not v.is_floating_point():
                v.fill_(84)
    state = model.state_dict()
    sent = wire.unpack(wire.model_to_arrays(model, counters=False)[wire.PACKED_KEY].numpy(),
                       state)
    for k, v in state.items():
        want = v.numpy() if v.is_floating_point() else np.zeros(tuple(v.shape))
        assert np.array_equal(sent[k], want), k
    assert int(state["bn1.num_batches_tracked"]) == 84  # (the site's own model keeps them)
    # a site of 1146 cases under the default clip 8: the counters alone would not fit
    full = wire.to_numpy_list(wire.model_to_arrays(model))
    with pytest.raises(UpdateError, match="secagg-clip"):
        check_maskable(full, 1146, clip=8.0, max_weight=10000.0)
    check_maskable(wire.to_numpy_list(wire.model_to_arrays(model, counters=False)), 1146,
                   clip=8.0, max_weight=10000.0)
