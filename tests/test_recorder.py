"""The server's per-site recorder uses FedAvg's weighted mean: check it by hand."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedpacs.server.recorder import RoundRecord, RoundRecorder


def _reply(name: str, n: int, loss: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
                       "site": ConfigRecord({"name": name})})


def test_weighted_mean_and_per_site_values() -> None:
    rec = RoundRecorder()
    agg = rec.aggregate_train([_reply("a", 10, 1.0), _reply("b", 30, 3.0)], "num-examples")
    # (10*1 + 30*3) / 40 = 2.5
    assert agg["train-loss"] == pytest.approx(2.5)
    assert agg["train-loss"] == pytest.approx(np.average([1.0, 3.0], weights=[10, 30]))
    out = rec.close(1)
    assert out.train is not None and out.train.sites == {
        "a": {"num-examples": 10, "train-loss": 1.0}, "b": {"num-examples": 30, "train-loss": 3.0}}
    assert rec.site_samples == {"a": 10, "b": 30}
    # the next round starts empty, and the record survives metrics.json's JSON round trip
    assert rec.close(2).to_json() == {"round": 2, "time": 0.0}
    assert RoundRecord.from_json(out.to_json()) == out


def test_keeps_each_sites_last_local_model() -> None:
    from flwr.app import ArrayRecord

    rec = RoundRecorder()
    with_arrays = _reply("a", 10, 1.0)
    with_arrays["arrays"] = ArrayRecord(numpy_ndarrays=[np.ones(2, dtype=np.float32)])
    rec.aggregate_train([with_arrays, _reply("b", 30, 3.0)], "num-examples")
    assert set(rec.local_models) == {"a"}
    assert rec.local_models["a"].to_numpy_ndarrays()[0].tolist() == [1.0, 1.0]
