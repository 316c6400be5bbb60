"""The Grafana dashboard queries only series that fedpacs exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
