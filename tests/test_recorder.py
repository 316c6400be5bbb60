"""The server's per-site recorder uses FedAvg's weighted mean: check it by hand; a train
reply's folded evaluation and timing stay out of the training aggregate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedpacs.common.contract import TIMING_KEYS, fold_evaluation, split_metrics
from fedpacs.server.grid import Exchange
from fedpacs.server.recorder import (
    Phase,
    RoundRecord,
    RoundRecorder,
    Timing,
    unanswered,
    unchanged_rounds,
)


def _reply(name: str, n: int, loss: float, **extra: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": n, "train-loss": loss, **extra}),
                       "site": ConfigRecord({"name": name})})


def test_weighted_mean_and_per_site_values() -> None:
    rec = RoundRecorder()
    agg = rec.aggregate_train([_reply("a", 10, 1.0), _reply("b", 30, 3.0)], "num-examples")
    # (10*1 + 30*3) / 40 = 2.5
    assert agg["train-loss"] == pytest.approx(2.5)
    assert agg["train-loss"] == pytest.approx(np.average([1.0, 3.0], weights=[10, 30]))
    closed = rec.close(1)
    out = closed.record
    assert out.train is not None and out.train.sites == {
        "a": {"num-examples": 10, "train-loss": 1.0}, "b": {"num-examples": 30, "train-loss": 3.0}}
    assert closed.evaluated_before is None and closed.site_phases == {}
    assert rec.site_samples == {"a": 10, "b": 30}
    # the next round starts empty, and the record survives metrics.json's JSON round trip
    assert rec.close(2).record.to_json() == {"round": 2, "time": 0.0}
    assert RoundRecord.from_json(out.to_json()) == out


def _folded(name: str, n: int, loss: float, val_n: int, acc: float, t_train: float
            ) -> RecordDict:
    evaluation = fold_evaluation({"num-examples": val_n, "fedbn-restored": 0,
                                  "val-accuracy": acc, "val-loss": 1 - acc})
    timing = {k: 0.0 for k in TIMING_KEYS} | {"t-train": t_train, "t-site": t_train + 1}
    return _reply(name, n, loss, **evaluation, **timing)


def test_a_folded_evaluation_is_weighted_by_its_own_sample_count() -> None:
    rec = RoundRecorder()
    # a: 10 train / 90 validation samples, b: 30 train / 10 validation samples
    agg = rec.aggregate_train([_folded("a", 10, 1.0, 90, 0.5, 4.0),
                               _folded("b", 30, 3.0, 10, 0.9, 7.0)], "num-examples")
    # the training aggregate is the training metrics alone, weighted by num-examples
    assert dict(agg) == pytest.approx({"train-loss": 2.5})
    closed = rec.close(2)
    assert closed.record.train is not None
    assert closed.record.train.sites["b"] == {"num-examples": 30, "train-loss": 3.0}
    assert closed.record.evaluate is None  # this round's model is evaluated next round
    before = closed.evaluated_before
    assert before is not None
    # (90*0.5 + 10*0.9) / 100 = 0.54, not the train-weighted (10*0.5 + 30*0.9) / 40 = 0.8
    assert before.aggregate["val-accuracy"] == pytest.approx(0.54)
    assert before.aggregate["val-accuracy"] == pytest.approx(
        np.average([0.5, 0.9], weights=[90, 10]))
    # in an evaluate reply's layout, as the evaluate exchange records it
    assert before.sites["a"] == {"num-examples": 90, "fedbn-restored": 0,
                                 "val-accuracy": 0.5, "val-loss": 0.5}
    assert closed.site_phases["b"]["t-train"] == 7.0 and "t-train" not in before.sites["b"]


def test_split_metrics_tells_the_three_kinds_apart() -> None:
    metrics = {"num-examples": 5, "train-loss": 0.1, "val-num-examples": 3, "val-auc": 0.7,
               "val-fedbn-restored": 2, "t-train": 1.5}
    split = split_metrics(metrics, folded=True)
    assert split.own == {"num-examples": 5, "train-loss": 0.1}
    assert split.evaluation == {"num-examples": 3, "val-auc": 0.7, "fedbn-restored": 2}
    assert split.timing == {"t-train": 1.5}
    # an evaluate reply's val-* are its own metrics
    plain = split_metrics({"num-examples": 3, "val-auc": 0.7, "t-data": 0.2}, folded=False)
    assert plain.own == {"num-examples": 3, "val-auc": 0.7} and plain.evaluation == {}
    # a folded evaluation without its weight is none
    assert split_metrics({"num-examples": 1, "val-auc": 0.7}, folded=True).evaluation == {}


def test_a_site_without_validation_samples_carries_no_weight() -> None:
    rec = RoundRecorder()
    rec.aggregate_evaluate([_reply("a", 0, 9.0), _reply("b", 4, 1.0)], "num-examples")
    ev = rec.close(1).record.evaluate
    assert ev is not None and ev.aggregate == {"train-loss": 1.0} and set(ev.sites) == {"a", "b"}


def test_timing_overhead_and_json() -> None:
    exchanges = [Exchange("train", "setup", 3, 3, 0.5), Exchange("train", "", 3, 2, 6.0)]
    timing = Timing.build(round_s=10.0, exchanges=exchanges, sites={
        "a": {"t-train": 4.0, "t-data": 1.0, "train-seconds": 3.9},
        "b": {"t-train": 0.0, "t-data": 2.0, "train-seconds": 6.5}},  # b: no t-train mark
        aggregate_s=1.0, heldout_s=0.5, checkpoint_s=0.25)
    assert timing.slowest_site == "b" and timing.slowest_train_s == 6.5
    assert timing.site_max == {"t-train": 4.0, "t-data": 2.0}
    assert timing.overhead_s == pytest.approx(3.5)
    assert timing.overhead_fraction == pytest.approx(0.35)
    assert Timing.build(round_s=1.0, exchanges=[], sites={"a": {"t-train": 2.0}}).overhead_s == 0
    record = RoundRecord(round=3, timing=timing)
    j = record.to_json()
    assert j["timing"]["overhead_s"] == 3.5 and j["timing"]["overhead_fraction"] == 0.35
    assert [e["stage"] for e in j["timing"]["exchanges"]] == ["setup", ""]
    assert j["timing"]["sites"]["b"] == {"t-data": 2.0, "t-train": 0.0}
    assert RoundRecord.from_json(j) == record


def test_a_round_is_amended_with_its_evaluation(tmp_path: Path) -> None:
    import json

    from fedpacs.common.models import build_model
    from fedpacs.common.tasks import TASK_PRESETS
    from fedpacs.server.rundir import RunDirectory

    task = TASK_PRESETS["breastmnist"]
    run = RunDirectory(tmp_path / "run", task=task, config={})
    model = build_model(task)
    first = RoundRecord(0, heldout={"accuracy": 0.5}, timing=Timing(round_s=1.0))
    run.save_round(model, first)
    run.save_round(model, RoundRecord(1))
    ev = Phase({"val-accuracy": 0.7}, {"a": {"num-examples": 3, "val-accuracy": 0.7}})
    run.amend_round(0, evaluate=ev)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in on_disk] == [0, 1]
    again = RoundRecord.from_json(on_disk[0])
    assert again.evaluate == ev and again.heldout == {"accuracy": 0.5}
    assert again.model_sha256 == first.model_sha256 and again.timing == first.timing
    one = json.loads((tmp_path / "run" / "rounds" / "round-000" / "metrics.json").read_text())
    assert one == on_disk[0] and "evaluate" not in on_disk[1]
    with pytest.raises(LookupError):
        run.amend_round(7, evaluate=ev)


def test_keeps_each_sites_last_local_model() -> None:
    from flwr.app import ArrayRecord

    rec = RoundRecorder()
    with_arrays = _reply("a", 10, 1.0)
    with_arrays["arrays"] = ArrayRecord(numpy_ndarrays=[np.ones(2, dtype=np.float32)])
    rec.aggregate_train([with_arrays, _reply("b", 30, 3.0)], "num-examples")
    assert set(rec.local_models) == {"a"}
    assert rec.local_models["a"].to_numpy_ndarrays()[0].tolist() == [1.0, 1.0]


def test_a_plain_round_counts_the_sites_that_did_not_answer() -> None:
    # one site's link was cut: 4 train messages, 3 replies by the deadline; SecAgg+
    # stages and evaluate exchanges are not counted here
    exchanges = [Exchange("train", "", 4, 3, 40.0, 40.0),
                 Exchange("train", "setup", 4, 2, 1.0, 41.0),
                 Exchange("evaluate", "", 4, 1, 1.0, 42.0)]
    assert unanswered(exchanges) == 1
    assert unanswered([Exchange("train", "", 4, 4, 5.0, 5.0)]) == 0
    record = RoundRecord(round=2, dropped=1)
    assert RoundRecord.from_json(record.to_json()).dropped == 1
    assert "dropped" not in RoundRecord(round=3).to_json()


def test_a_round_whose_weights_are_those_of_the_round_before_is_unchanged() -> None:
    rounds = [{"round": 0, "weights_sha256": "a"}, {"round": 1, "weights_sha256": "b"},
              {"round": 2, "weights_sha256": "b"}, {"round": 3, "weights_sha256": "c"},
              {"round": 4, "weights_sha256": "c"}]
    assert unchanged_rounds(rounds) == [2, 4]
    assert unchanged_rounds(rounds[:2]) == [] and unchanged_rounds([]) == []
    # a record without the hash (written before it existed) says nothing either way
    assert unchanged_rounds([{"round": 0}, {"round": 1}]) == []
