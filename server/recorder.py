"""What the ServerApp learns in one round, as a typed record, and the recorder that
builds it while a strategy aggregates.

The recorder is the only writer of a round's record: the strategy's metric hooks give it
each phase's replies (:meth:`RoundRecorder.aggregate_train`/``aggregate_evaluate``), the
update screen its rejections, SecAgg+ its count, and :meth:`RoundRecorder.close` hands the
finished :class:`RoundRecord` to the run. ``RoundRecord.to_json`` is the layout of
``metrics.json`` (read back with ``from_json`` by the report, the demo and the coordinator).

A train reply also carries the site's evaluation of the global model it started from
(``val-*``, fedpacs.common.contract.split_metrics): that is the evaluation of the previous
round's model, so :meth:`RoundRecorder.close` hands it over separately
(:attr:`ClosedRound.evaluated_before`) for the run to add to the previous round's record.
Each reply's ``t-*`` seconds go to the round's :class:`Timing`, never into an aggregate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedpacs.common import wire
from fedpacs.common.contract import SHARE_LOCAL_MODEL_KEY, TIMING_PREFIX, split_metrics
from fedpacs.server.grid import Exchange


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


TRAIN_SECONDS = "t-train"  # a site's training seconds (timing.phases) ...
TRAIN_SECONDS_FALLBACK = "train-seconds"  # ... or the trainer's own count when absent


@dataclass(frozen=True)
class Timing:
    """Where one round's wall time went (seconds): the exchanges with the sites (from
    FastGrid's log), what each site reported (``t-*``: the slowest over sites per phase,
    and each site's own), and the server's own work: aggregation (from the round's last
    reply to its end, SecAgg+ unmasking included), the held-out evaluation and the
    checkpoint. ``overhead_s`` is what is not the slowest site's training."""

    round_s: float
    exchanges: tuple[Exchange, ...] = ()
    site_max: dict[str, float] = field(default_factory=dict)
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    slowest_site: str = ""
    slowest_train_s: float = 0.0
    aggregate_s: float = 0.0
    heldout_s: float = 0.0
    checkpoint_s: float = 0.0

    @classmethod
    def build(cls, *, round_s: float, exchanges: Sequence[Exchange],
              sites: dict[str, dict[str, float]], aggregate_s: float = 0.0,
              heldout_s: float = 0.0, checkpoint_s: float = 0.0) -> Timing:
        """The round's timing from its parts (``sites``: each site's ``t-*`` and, where it
        trained, its ``train-seconds``); the slowest site is the one that trained longest
        (``t-train``, else ``train-seconds``)."""
        own = {n: {k: v for k, v in p.items() if k.startswith(TIMING_PREFIX)}
               for n, p in sites.items()}
        site_max: dict[str, float] = {}
        for phases in own.values():
            for k, v in phases.items():
                site_max[k] = max(site_max.get(k, 0.0), v)
        trained = {name: phases.get(TRAIN_SECONDS) or phases.get(TRAIN_SECONDS_FALLBACK, 0.0)
                   for name, phases in sites.items()}
        slowest = max(sorted(trained), key=lambda n: trained[n], default="")
        return cls(round_s=round_s, exchanges=tuple(exchanges), site_max=site_max, sites=own,
                   slowest_site=slowest, slowest_train_s=trained.get(slowest, 0.0),
                   aggregate_s=aggregate_s, heldout_s=heldout_s, checkpoint_s=checkpoint_s)

    @property
    def overhead_s(self) -> float:
        return max(self.round_s - self.slowest_train_s, 0.0)

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_s / self.round_s if self.round_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        def r(v: float) -> float:
            return round(v, 4)

        return {"round_s": r(self.round_s), "exchanges": [e.to_json() for e in self.exchanges],
                "site_max": {k: r(v) for k, v in sorted(self.site_max.items())},
                "sites": {n: {k: r(v) for k, v in sorted(p.items())}
                          for n, p in sorted(self.sites.items())},
                "slowest_site": self.slowest_site, "slowest_train_s": r(self.slowest_train_s),
                "aggregate_s": r(self.aggregate_s), "heldout_s": r(self.heldout_s),
                "checkpoint_s": r(self.checkpoint_s), "overhead_s": r(self.overhead_s),
                "overhead_fraction": r(self.overhead_fraction)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Timing:
        """(``overhead_s`` and ``overhead_fraction`` are derived, not read back.)"""
        return cls(round_s=float(d["round_s"]),
                   exchanges=tuple(Exchange.from_json(e) for e in d.get("exchanges") or []),
                   site_max={k: float(v) for k, v in (d.get("site_max") or {}).items()},
                   sites={n: {k: float(v) for k, v in p.items()}
                          for n, p in (d.get("sites") or {}).items()},
                   slowest_site=str(d.get("slowest_site", "")),
                   slowest_train_s=float(d.get("slowest_train_s", 0.0)),
                   aggregate_s=float(d.get("aggregate_s", 0.0)),
                   heldout_s=float(d.get("heldout_s", 0.0)),
                   checkpoint_s=float(d.get("checkpoint_s", 0.0)))


@dataclass
class RoundRecord:
    """One round as the server saw it (no site data: metrics, counts and reasons only).
    ``evaluate`` is the sites' evaluation of this round's global model, which arrives
    with the next round's train replies (the last round's from one final exchange)."""

    round: int
    train: Phase | None = None
    evaluate: Phase | None = None
    heldout: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # site (or "aggregate") -> why
    secagg: SecAggCount | None = None
    # plain rounds: sites sent the round's train message that sent no reply before the
    # round's deadline (a cut link, a crashed SuperNode, a slow site); SecAgg+ counts its
    # own in ``secagg``
    dropped: int = 0
    # error replies to the round's train messages by code and type (site_errors)
    site_errors: dict[str, int] = field(default_factory=dict)
    time: float = 0.0
    model_sha256: str = ""
    timing: Timing | None = None
    # the strategy's state after this round (rounds/round-NNN/strategy.pt), for resuming
    strategy_sha256: str = ""
    # the global model's weights (fedpacs.common.transfer.weights_sha256: keys, shapes and
    # values, whatever the file); round 0 of a run with --init-model: the source's
    weights_sha256: str = ""
    lr: float = 0.0  # the learning rate the round's sites trained with (its schedule)
    init_model: str = ""  # round 0: where its weights came from (kind: name), "" seeded

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
        if self.dropped:
            out["dropped"] = self.dropped
        if self.site_errors:
            out["site_errors"] = self.site_errors
        out["time"] = self.time
        if self.model_sha256:
            out["model_sha256"] = self.model_sha256
        if self.strategy_sha256:
            out["strategy_sha256"] = self.strategy_sha256
        if self.weights_sha256:
            out["weights_sha256"] = self.weights_sha256
        if self.lr:
            out["lr"] = self.lr
        if self.init_model:
            out["init_model"] = self.init_model
        if self.timing is not None:
            out["timing"] = self.timing.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RoundRecord:
        def phase(name: str) -> Phase | None:
            if name not in d:
                return None
            return Phase(dict(d[name]), dict(d.get(f"{name}_sites") or {}),
                         int(d.get(f"{name}_bytes_in", 0)))

        sec, timing = d.get("secagg"), d.get("timing")
        return cls(round=int(d["round"]), train=phase("train"), evaluate=phase("evaluate"),
                   heldout=dict(d.get("heldout") or {}), rejected=dict(d.get("rejected") or {}),
                   secagg=SecAggCount(int(sec["sites_summed"]), int(sec["sites_dropped"]))
                   if sec else None, dropped=int(d.get("dropped", 0)),
                   site_errors={str(k): int(v) for k, v in (d.get("site_errors") or {}).items()},
                   time=float(d.get("time", 0.0)),
                   model_sha256=str(d.get("model_sha256", "")),
                   timing=Timing.from_json(timing) if timing else None,
                   strategy_sha256=str(d.get("strategy_sha256", "")),
                   weights_sha256=str(d.get("weights_sha256", "")),
                   lr=float(d.get("lr", 0.0)), init_model=str(d.get("init_model", "")))

    @property
    def participating(self) -> int:
        return len(self.train.sites) if self.train else 0


def unchanged_rounds(rounds: Sequence[dict[str, Any]]) -> list[int]:
    """The rounds (of metrics.json's records, in order) whose global model has the weights
    of the round before: no site's update reached the aggregate (every site refused,
    failed, was screened out or did not answer in time, or SecAgg+ refused the sum)."""
    out = []
    for before, after in zip(rounds, rounds[1:], strict=False):
        same = before.get("weights_sha256") and \
            before.get("weights_sha256") == after.get("weights_sha256")
        if same:
            out.append(int(after["round"]))
    return out


def site_errors(exchanges: Sequence[Exchange]) -> dict[str, int]:
    """The error replies to a round's train messages (every SecAgg+ stage), counted by
    :func:`fedpacs.server.grid.error_label`: the round's ``site_errors``."""
    return dict(sorted(Counter(label for e in exchanges if e.kind == "train"
                               for label in e.errors).items()))


def unanswered(exchanges: Sequence[Exchange]) -> int:
    """Plain train messages of a round's exchanges that got no reply (errors are replies)
    by the deadline: the round's ``dropped`` sites."""
    return sum(e.sent - e.replies for e in exchanges if e.kind == "train" and not e.stage)


@dataclass(frozen=True)
class ClosedRound:
    """What :meth:`RoundRecorder.close` hands over: the round's record, the sites'
    evaluation of the previous round's global model (folded into this round's train
    replies; None when none came) and each site's ``t-*`` seconds."""

    record: RoundRecord
    evaluated_before: Phase | None
    site_phases: dict[str, dict[str, float]]


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
    _evaluated_before: Phase | None = None
    _site_phases: dict[str, dict[str, float]] = field(default_factory=dict)
    _rejected: dict[str, str] = field(default_factory=dict)
    _secagg: SecAggCount | None = None
    # hooks given to Flower's strategies (train_metrics_aggr_fn / evaluate_metrics_aggr_fn)
    def aggregate_train(self, records: list[RecordDict], key: str) -> MetricRecord:
        """The training metrics' weighted mean (by ``key``); the folded evaluation is kept
        apart (weighted by its own sample count) and so are the sites' seconds."""
        agg, self._train, self._evaluated_before = self._phase(records, key, folded=True)
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
        agg, self._evaluate, _ = self._phase(records, key, folded=False)
        return agg

    def _phase(self, records: list[RecordDict], key: str, *, folded: bool
               ) -> tuple[MetricRecord, Phase, Phase | None]:
        """(aggregate, phase, folded evaluation) of one exchange's replies; the sites'
        ``t-*`` seconds are kept for the round's timing."""
        own, evaluations = [], []
        for i, r in enumerate(records):
            name = site_name(r, i)
            split = split_metrics(metric_dict(r), folded=folded)
            if split.timing:
                seen = self._site_phases.get(name, {})
                self._site_phases[name] = seen | {
                    k: max(v, seen.get(k, 0.0)) for k, v in split.timing.items()}
            own.append(_metrics_only(r, split.own))
            if split.evaluation:
                evaluations.append(_metrics_only(r, split.evaluation))
        agg, phase = evaluation_phase(own, key)
        bytes_in = sum(ar.count_bytes() for r in records for ar in r.array_records.values())
        phase = Phase(phase.aggregate, phase.sites, bytes_in)
        before = evaluation_phase(evaluations, wire.NUM_EXAMPLES)[1] if evaluations else None
        return agg, phase, before

    @classmethod
    def resumed(cls, records: Sequence[RoundRecord]) -> RoundRecorder:
        """The recorder of a run resumed after ``records`` (its rounds so far, in order):
        each site's training sample count as the last round it trained in left it. The
        sites' local models are not checkpointed (they are the sites' own updates): the
        rounds after the resume bring them again."""
        rec = cls()
        for record in records:
            for name, metrics in (record.train.sites if record.train else {}).items():
                rec.site_samples[name] = int(metrics.get(wire.NUM_EXAMPLES, 0))
        return rec

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

    def close(self, server_round: int) -> ClosedRound:
        """The finished round; the recorder starts the next one empty."""
        rec = RoundRecord(round=server_round, train=self._train, evaluate=self._evaluate,
                          rejected=self._rejected, secagg=self._secagg)
        closed = ClosedRound(rec, self._evaluated_before, self._site_phases)
        self._train, self._evaluate, self._rejected, self._secagg = None, None, {}, None
        self._sent = self._answered = 0
        self._evaluated_before, self._site_phases = None, {}
        return closed


def _metrics_only(record: RecordDict, metrics: dict[str, float]) -> RecordDict:
    """``metrics`` with the reply's site record (its name), as a reply of its own."""
    out = RecordDict({wire.METRICS_KEY: MetricRecord(metrics)})  # type: ignore[arg-type]
    site = record.config_records.get(wire.SITE_KEY)
    if site is not None:
        out[wire.SITE_KEY] = ConfigRecord(dict(site))
    return out


def evaluation_phase(records: list[RecordDict], key: str) -> tuple[MetricRecord, Phase]:
    """Each site's metrics (``t-*`` left out) and their mean weighted by ``key``; a site
    whose weight is 0 (no samples) is listed but carries no weight."""
    stripped = [_metrics_only(r, split_metrics(metric_dict(r), folded=False).own)
                for r in records]
    sites = {site_name(r, i): metric_dict(r) for i, r in enumerate(stripped)}
    weighted = [r for r in stripped if metric_dict(r).get(key, 0) > 0]
    agg = aggregate_metricrecords(weighted, key) if weighted else MetricRecord()
    return agg, Phase({k: v for k, v in agg.items() if isinstance(v, int | float)}, sites)
