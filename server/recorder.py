"""What the ServerApp learns in one round, as a typed record, and the recorder that
builds it while a strategy aggregates.

The recorder is the only writer of a round's record: the strategy's metric hooks give it
each phase's replies (:meth:`RoundRecorder.aggregate_train`/``aggregate_evaluate``), the
update screen its rejections, SecAgg+ its count, and :meth:`RoundRecorder.close` hands the
finished :class:`RoundRecord` to the run. ``RoundRecord.to_json`` is the layout of
``metrics.json`` (read back with ``from_json`` by the report, the demo and the coordinator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedpacs.common import wire
from fedpacs.common.contract import SHARE_LOCAL_MODEL_KEY


def site_name(record: RecordDict, index: int) -> str:
    site = record.get(wire.SITE_KEY)
    name = site.get("name") if site is not None else None
    return str(name) if name else f"site-{index}"


def metric_dict(record: RecordDict) -> dict[str, float]:
    mr = next(iter(record.metric_records.values()), MetricRecord())
    return {k: v for k, v in mr.items() if isinstance(v, int | float)}


@dataclass(frozen=True)
class Phase:
    """One phase (train or evaluate) of a round: the aggregate and each site's metrics."""

    aggregate: dict[str, float]
    sites: dict[str, dict[str, float]]
    bytes_in: int = 0


@dataclass(frozen=True)
class SecAggCount:
    sites_summed: int
    sites_dropped: int


@dataclass
class RoundRecord:
    """One round as the server saw it (no site data: metrics, counts and reasons only)."""

    round: int
    train: Phase | None = None
    evaluate: Phase | None = None
    heldout: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # site (or "aggregate") -> why
    secagg: SecAggCount | None = None
    time: float = 0.0
    model_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round}
        for name, phase in (("train", self.train), ("evaluate", self.evaluate)):
            if phase is not None:
                out |= {name: phase.aggregate, f"{name}_sites": phase.sites,
                        f"{name}_bytes_in": phase.bytes_in}
        if self.heldout:
            out["heldout"] = self.heldout
        if self.rejected:
            out["rejected"] = self.rejected
        if self.secagg is not None:
            out["secagg"] = {"sites_summed": self.secagg.sites_summed,
                             "sites_dropped": self.secagg.sites_dropped}
        out["time"] = self.time
        if self.model_sha256:
            out["model_sha256"] = self.model_sha256
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RoundRecord:
        def phase(name: str) -> Phase | None:
            if name not in d:
                return None
            return Phase(dict(d[name]), dict(d.get(f"{name}_sites") or {}),
                         int(d.get(f"{name}_bytes_in", 0)))

        sec = d.get("secagg")
        return cls(round=int(d["round"]), train=phase("train"), evaluate=phase("evaluate"),
                   heldout=dict(d.get("heldout") or {}), rejected=dict(d.get("rejected") or {}),
                   secagg=SecAggCount(int(sec["sites_summed"]), int(sec["sites_dropped"]))
                   if sec else None, time=float(d.get("time", 0.0)),
                   model_sha256=str(d.get("model_sha256", "")))

    @property
    def participating(self) -> int:
        return len(self.train.sites) if self.train else 0


@dataclass
class RoundRecorder:
    """Builds each round's record and keeps what outlives a round: each site's training
    sample count and its latest local model (plain mode only, for cross-site validation)."""

    site_samples: dict[str, int] = field(default_factory=dict)
    local_models: dict[str, ArrayRecord] = field(default_factory=dict)
    # sites whose train reply consents to their local model going to the other sites
    shares_local_model: dict[str, bool] = field(default_factory=dict)
    _train: Phase | None = None
    _evaluate: Phase | None = None
    _rejected: dict[str, str] = field(default_factory=dict)
    _secagg: SecAggCount | None = None

    # hooks given to Flower's strategies (train_metrics_aggr_fn / evaluate_metrics_aggr_fn)
    def aggregate_train(self, records: list[RecordDict], key: str) -> MetricRecord:
        agg, self._train = self._phase(records, key)
        for i, name in enumerate(self._train.sites):
            self.site_samples[name] = int(self._train.sites[name].get(wire.NUM_EXAMPLES, 0))
            site = records[i].config_records.get(wire.SITE_KEY)
            self.shares_local_model[name] = bool(site.get(SHARE_LOCAL_MODEL_KEY, False)) \
                if site is not None else False
            local = next(iter(records[i].array_records.values()), None)
            if local is not None and len(local) > 0:  # (empty once a strategy popped it)
                self.local_models[name] = local
        return agg

    def aggregate_evaluate(self, records: list[RecordDict], key: str) -> MetricRecord:
        agg, self._evaluate = self._phase(records, key)
        return agg

    @staticmethod
    def _phase(records: list[RecordDict], key: str) -> tuple[MetricRecord, Phase]:
        sites = {site_name(r, i): metric_dict(r) for i, r in enumerate(records)}
        agg = aggregate_metricrecords(records, key)
        bytes_in = sum(ar.count_bytes() for r in records for ar in r.array_records.values())
        return agg, Phase({k: v for k, v in agg.items() if isinstance(v, int | float)}, sites,
                          bytes_in)

    def shared_local_models(self) -> dict[str, ArrayRecord]:
        """The local models whose sites consented to cross-site validation."""
        return {n: m for n, m in self.local_models.items() if self.shares_local_model.get(n)}

    def keep_local_model(self, site: str, arrays: ArrayRecord) -> None:
        """A copy of a site's update as it arrived (some strategies pop arrays as they go)."""
        self.local_models[site] = ArrayRecord({k: arrays[k] for k in arrays.keys()})

    def reject(self, rejected: dict[str, str]) -> None:
        self._rejected |= rejected

    def secagg_sum(self, summed: int, dropped: int, bytes_in: int) -> None:
        """SecAgg+: ``summed`` masked vectors (``bytes_in`` in all) were unmasked as one sum."""
        self._secagg = SecAggCount(summed, dropped)
        if self._train is not None:
            self._train = Phase(self._train.aggregate, self._train.sites, bytes_in)

    def close(self, server_round: int) -> RoundRecord:
        """The finished round's record; the recorder starts the next one empty."""
        rec = RoundRecord(round=server_round, train=self._train, evaluate=self._evaluate,
                          rejected=self._rejected, secagg=self._secagg)
        self._train, self._evaluate, self._rejected, self._secagg = None, None, {}, None
        return rec
