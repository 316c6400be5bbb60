"""The Grafana dashboard queries only series that fedpacs exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from fedpacs.server.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[1]


def exported_names() -> set[str]:
    names: set[str] = set()
    registry = CollectorRegistry()
    ServerMetrics(registry=registry)
    for family in registry.collect():
        names |= {s.name for s in family.samples} | {family.name}
    from fedpacs.client.metrics import site_metrics

    m = site_metrics()
    for metric in (m.train_seconds, m.train_samples, m.val_samples, m.last_round, m.peak_memory,
                   m.rounds, m.errors):
        for family in metric.collect():
            names |= {family.name, f"{family.name}_total"}
    return names


def test_dashboard_series_exist() -> None:
    dash = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(fedpacs_[a-z_]+)", e)}
    assert len(used) >= 14
    missing = used - exported_names()
    assert not missing, f"dashboard queries series fedpacs does not export: {missing}"


def test_round_timing_is_published() -> None:
    from flwr.app import ArrayRecord

    from fedpacs.server.app import update_metrics
    from fedpacs.server.grid import Exchange
    from fedpacs.server.recorder import Phase, RoundRecord, Timing

    m = ServerMetrics(registry=CollectorRegistry())
    timing = Timing.build(round_s=10.0, exchanges=[Exchange("train", "setup", 3, 3, 0.5),
                                                   Exchange("train", "unmask", 3, 3, 0.25)],
                          sites={"a": {"t-train": 6.0, "t-data": 0.5}}, aggregate_s=1.5)
    record = RoundRecord(round=2, train=Phase({"train-loss": 0.3}, {"a": {}}), timing=timing)
    update_metrics(m, record, ArrayRecord(), connected=1,
                   evaluated=Phase({"val-accuracy": 0.75}, {"a": {}}))

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert value("fedpacs_round_phase_seconds", phase="round") == 10.0
    assert value("fedpacs_round_phase_seconds", phase="overhead") == 4.0
    assert value("fedpacs_round_phase_seconds", phase="aggregate") == 1.5
    assert value("fedpacs_round_phase_seconds", phase="exchange:train/unmask") == 0.25
    assert value("fedpacs_round_phase_seconds", phase="site:t-train") == 6.0
    assert value("fedpacs_round_overhead_ratio") == pytest.approx(0.4)
    assert value("fedpacs_round_exchanges") == 2
    assert value("fedpacs_round_duration_seconds") == 10.0
    assert value("fedpacs_federated_eval_metric", metric="accuracy") == 0.75
