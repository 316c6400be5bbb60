"""Prometheus metrics of the aggregation server (the ServerApp process of a run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


@dataclass
class ServerMetrics:
    """One run's series; served on 127.0.0.1:``port`` when :meth:`serve` is called."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        mode: Literal["mostrecent"] = "mostrecent"  # multiprocess: the latest value wins
        self.round = Gauge("fedpacs_round", "Last completed federated round", registry=r,
                           multiprocess_mode=mode)
        self.rounds_total = Gauge("fedpacs_rounds_total", "Rounds in this run", registry=r,
                                  multiprocess_mode=mode)
        self.round_seconds = Gauge("fedpacs_round_duration_seconds",
                                   "Wall time of the last round", registry=r,
                                   multiprocess_mode=mode)
        self.participating = Gauge("fedpacs_sites_participating",
                                   "Sites whose update was aggregated in the last round",
                                   registry=r, multiprocess_mode=mode)
        self.dropped = Gauge("fedpacs_sites_dropped",
                             "Connected sites without an update in the last round", registry=r,
                             multiprocess_mode=mode)
        self.bytes_in = Counter("fedpacs_update_bytes_in", "Bytes of model updates received",
                                registry=r)
        self.bytes_out = Counter("fedpacs_model_bytes_out",
                                 "Bytes of global model sent to sites", registry=r)
        self.train_loss = Gauge("fedpacs_aggregate_train_loss",
                                "Sample-weighted mean training loss of the last round",
                                registry=r, multiprocess_mode=mode)
        self.heldout = Gauge("fedpacs_heldout_metric", "Global model on the held-out split",
                             ["metric"], registry=r, multiprocess_mode=mode)
        self.federated = Gauge("fedpacs_federated_eval_metric",
                               "Sample-weighted mean of the sites' validation metrics",
                               ["metric"], registry=r, multiprocess_mode=mode)
        self.phase_seconds = Gauge(
            "fedpacs_round_phase_seconds",
            "Seconds of the last round per phase: round, exchange:<kind>[/<stage>], "
            "aggregate, heldout, checkpoint, overhead, and site:<t-phase> (slowest site)",
            ["phase"], registry=r, multiprocess_mode=mode)
        self.overhead_ratio = Gauge("fedpacs_round_overhead_ratio",
                                    "Share of the last round that was not the slowest "
                                    "site's training", registry=r, multiprocess_mode=mode)
        self.exchanges = Gauge("fedpacs_round_exchanges",
                               "Message exchanges with the sites in the last round",
                               registry=r, multiprocess_mode=mode)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
