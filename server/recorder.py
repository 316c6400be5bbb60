"""Collects per-site and aggregated metrics of each round as the strategy aggregates them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedpacs.common import wire


def site_name(record: RecordDict, index: int) -> str:
    site = record.get(wire.SITE_KEY)
    name = site.get("name") if site is not None else None
    return str(name) if name else f"site-{index}"


def metric_dict(record: RecordDict) -> dict[str, float]:
    mr = next(iter(record.metric_records.values()), MetricRecord())
    return {k: v for k, v in mr.items() if isinstance(v, int | float)}


@dataclass
class RoundRecorder:
    """Aggregation hooks for FedAvg-family strategies that also keep per-site metrics.

    The strategy calls :meth:`aggregate_train` / :meth:`aggregate_evaluate` during round r;
    :meth:`flush` (called from the end-of-round evaluation) returns and clears them.
    """

    pending: dict[str, Any] = field(default_factory=dict)
    site_samples: dict[str, int] = field(default_factory=dict)
    # each site's latest local model (its last train reply), for cross-site validation
    local_models: dict[str, ArrayRecord] = field(default_factory=dict)

    def _collect(self, phase: str, records: list[RecordDict], key: str) -> MetricRecord:
        sites = {site_name(r, i): metric_dict(r) for i, r in enumerate(records)}
        agg = aggregate_metricrecords(records, key)
        self.pending[phase] = dict(agg.items())
        self.pending[f"{phase}_sites"] = sites
        self.pending[f"{phase}_bytes_in"] = sum(ar.count_bytes() for r in records
                                                for ar in r.array_records.values())
        if phase == "train":
            for i, (name, m) in enumerate(sites.items()):
                self.site_samples[name] = int(m.get(wire.NUM_EXAMPLES, 0))
                local = next(iter(records[i].array_records.values()), None)
                if local is not None and len(local) > 0:
                    self.local_models[name] = local
        return agg

    def aggregate_train(self, records: list[RecordDict], key: str) -> MetricRecord:
        return self._collect("train", records, key)

    def aggregate_evaluate(self, records: list[RecordDict], key: str) -> MetricRecord:
        return self._collect("evaluate", records, key)

    def flush(self) -> dict[str, Any]:
        out, self.pending = self.pending, {}
        return out
