"""Each strategy's aggregate of three hand-made updates, against answers computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedpacs.common import wire
from fedpacs.common.config import RunConfig
from fedpacs.common.errors import ConfigError
from fedpacs.common.models import build_model
from fedpacs.common.strategies import SECAGG_STRATEGIES, STRATEGY_NAMES
from fedpacs.server.recorder import RoundRecorder
from fedpacs.server.strategies import STRATEGIES, make_strategy

pytestmark = pytest.mark.usefixtures("task_identity")

UPDATES = [(np.array([1.0, 2.0, 3.0]), 1), (np.array([2.0, 4.0, 6.0]), 1),
           (np.array([10.0, 20.0, 30.0]), 2)]




def _replies() -> list[Message]:
    out = []
    for i, (w, n) in enumerate(UPDATES):
        content = RecordDict({"arrays": ArrayRecord(numpy_ndarrays=[w.astype(np.float32)]),
                              "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0}),
                              "site": ConfigRecord({"name": f"s{i}"})})
        out.append(Message(content=content, dst_node_id=i + 1, message_type=MessageType.TRAIN))
    return out


def _aggregate(name: str, **kw: object) -> np.ndarray:
    cfg = RunConfig(strategy=name, min_sites=3, **kw)  # type: ignore[arg-type,unused-ignore]
    strategy = make_strategy(cfg, RoundRecorder())
    arrays, _ = strategy.aggregate_train(1, _replies())
    assert arrays is not None
    return arrays.to_numpy_ndarrays()[0]


def test_fedavg_weighted_mean() -> None:
    # (1*[1,2,3] + 1*[2,4,6] + 2*[10,20,30]) / 4 = [23/4, 46/4, 69/4]
    assert _aggregate("fedavg") == pytest.approx([5.75, 11.5, 17.25])


def test_fedprox_aggregates_like_fedavg() -> None:
    assert _aggregate("fedprox", proximal_mu=0.1) == pytest.approx([5.75, 11.5, 17.25])


def test_fedmedian_is_elementwise_median() -> None:
    assert _aggregate("fedmedian") == pytest.approx([2.0, 4.0, 6.0])


def test_fedtrimmedavg_cuts_the_extremes() -> None:
    # beta 0.34 of 3 updates cuts 1 at each end per element: only the middle one is left
    assert _aggregate("fedtrimmedavg", trimmed_beta=0.34) == pytest.approx([2.0, 4.0, 6.0])


def test_krum_picks_a_central_update_not_the_outlier() -> None:
    # n=3, f=0: score = squared distance to the n-f-2 = 1 nearest other update.
    # [1,2,3] and [2,4,6] are 14 apart; [10,20,30] is 14*64=896 from [2,4,6]: Krum keeps
    # one of the first two (the first on a tie).
    assert _aggregate("krum", krum_malicious=0) == pytest.approx([1.0, 2.0, 3.0])


def test_fedadam_moves_from_the_current_model() -> None:
    cfg = RunConfig(strategy="fedadam", min_sites=3, server_lr=0.1)
    strategy = make_strategy(cfg, RoundRecorder())
    # FedOpt needs the current global model before aggregating
    keys = list(_replies()[0].content["arrays"].keys())
    strategy.current_arrays = {keys[0]: np.zeros(3, dtype=np.float32)}  # type: ignore[attr-defined,unused-ignore]
    arrays, _ = strategy.aggregate_train(1, _replies())
    assert arrays is not None
    step = arrays.to_numpy_ndarrays()[0]
    # first Adam step from 0 towards the positive mean delta: positive, bounded by eta/(1-b1)
    assert np.all(step > 0) and np.all(step <= 1.0 + 1e-6)


def test_no_strategy_sends_evaluate_messages_during_the_rounds() -> None:
    """The sites' evaluation rides in their train replies: a round is one exchange."""
    from flwr.clientapp import ClientApp

    from tests.loopback import LoopbackGrid

    grid = LoopbackGrid(ClientApp(), {1: Path("a.toml"), 2: Path("b.toml"), 3: Path("c.toml")})
    for name in STRATEGIES:
        cfg = RunConfig(strategy=name, min_sites=3,
                        proximal_mu=0.1 if name == "fedprox" else 0.0)
        for strategy in (make_strategy(cfg, RoundRecorder()),
                         make_strategy(cfg, RoundRecorder(), build_model(cfg.task_config()))):
            assert list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)) == []
            assert len(list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(),
                                                     grid))) == 3


def test_a_folded_evaluation_stays_out_of_the_training_aggregate() -> None:
    replies = _replies()
    for i, msg in enumerate(replies):  # site i: 10*(i+1) validation samples, accuracy i/10
        metrics = msg.content.metric_records["metrics"]
        msg.content["metrics"] = MetricRecord(dict(metrics) | {
            "val-num-examples": 10 * (i + 1), "val-accuracy": i / 10, "t-train": 1.0 + i})
    recorder = RoundRecorder()
    strategy = make_strategy(RunConfig(strategy="fedavg", min_sites=3), recorder)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and arrays.to_numpy_ndarrays()[0] == pytest.approx(
        [5.75, 11.5, 17.25])  # the weights' mean is untouched
    assert metrics is not None and dict(metrics) == pytest.approx({"train-loss": 1.0})
    before = recorder.close(1).evaluated_before
    assert before is not None  # (10*0 + 20*0.1 + 30*0.2) / 60
    assert before.aggregate["val-accuracy"] == pytest.approx(8 / 60)


def test_every_strategy_is_registered_and_validated() -> None:
    # the ServerApp's table and the names a run config accepts are the same
    assert tuple(STRATEGIES) == STRATEGY_NAMES == ("fedavg", "fedprox", "fedadam", "fedmedian",
                                                   "fedtrimmedavg", "krum")
    assert set(SECAGG_STRATEGIES) == {"fedavg", "fedprox"}
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"strategy": "fedsgd", "secagg": False})
    assert "fedtrimmedavg" in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # a near miss names the intended strategy
        RunConfig.from_flat({"strategy": "FedAvgg"})
    assert "did you mean 'fedavg'" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"strategy": "fedprox", "secagg": False})
    assert {e.field for e in exc.value.errors} == {"proximal-mu"}
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"strategy": "krum", "krum-malicious": 1, "min-sites": 3,
                             "secagg": False})
    assert {e.field for e in exc.value.errors} == {"min-sites"}
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"task": "hippocampus", "network": "resnet18"})
    assert {e.field for e in exc.value.errors} == {"network"}
    assert RunConfig(task="hippocampus", network="segresnet").task_config().network == \
        "segresnet"


def _site_reply(name: str, arrays: ArrayRecord, n: int) -> Message:
    content = RecordDict({wire.ARRAYS_KEY: arrays,
                          wire.METRICS_KEY: MetricRecord({wire.NUM_EXAMPLES: n,
                                                          "train-loss": 1.0}),
                          wire.SITE_KEY: ConfigRecord({"name": name})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_a_reply_not_in_the_packed_layout_is_dropped_and_the_round_goes_on() -> None:
    """The screen in front of the strategy: a site answering with the named (unpacked)
    layout, or with a packed vector of the wrong size, is dropped with its reason; the
    others are averaged."""
    cfg = RunConfig(strategy="fedavg", min_sites=2)
    model = build_model(cfg.task_config())
    state = model.state_dict()
    flat = wire.pack(state)
    named = ArrayRecord({k: Array(v) for k, v in wire.unpack(flat, state).items()})
    assert wire.check_arrays(model, named)  # a well-formed update, only not packed
    replies = [_site_reply("a", wire.model_to_arrays(model), 1),
               _site_reply("old", named, 5),
               _site_reply("short", ArrayRecord({wire.PACKED_KEY: Array(flat[:-1])}), 5),
               _site_reply("b", ArrayRecord({wire.PACKED_KEY: Array(flat + 0.01)}), 3)]
    recorder = RoundRecorder()
    strategy = make_strategy(cfg, recorder, model)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and wire.is_packed(arrays)
    expected = np.average([flat, flat + 0.01], axis=0, weights=[1, 3])
    assert arrays[wire.PACKED_KEY].numpy() == pytest.approx(expected, abs=1e-6)
    record = recorder.close(1).record
    assert record.train is not None and set(record.train.sites) == {"a", "b"}
    rejected = record.rejected
    assert set(rejected) == {"old", "short"}
    assert f"packed under {wire.PACKED_KEY!r}" in rejected["old"]
    assert f"got {len(state)} named arrays" in rejected["old"]
    assert f"one floating vector of {flat.size} values" in rejected["short"]
    assert f"float32 of shape ({flat.size - 1},)" in rejected["short"]
