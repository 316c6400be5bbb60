"""Prometheus metrics of a site. ClientApp processes are short-lived, so with
``PROMETHEUS_MULTIPROC_DIR`` set (the site daemon sets it) every process writes its values
to that folder and the daemon serves their combination.

The daemon's own series (:class:`SiteProcessCollector`: its processes, restarts and up)
are read from its supervisor at each scrape and served beside that folder: no file, and
no dependence on the environment the daemon's ``prometheus_client`` was imported with.
"""

from __future__ import annotations

import functools
import resource
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

PROCESS_RESTARTS = "fedpacs_site_process_restarts"  # exposed as ..._total
PROCESS_UP = "fedpacs_site_process_up"


@dataclass(frozen=True)
class SiteMetrics:
    train_seconds: Gauge
    train_samples: Gauge
    val_samples: Gauge
    last_round: Gauge
    peak_memory: Gauge
    gpu_peak_memory: Gauge
    rounds: Counter
    errors: Counter

    def record_memory(self) -> None:
        # ru_maxrss is in KiB on Linux
        self.peak_memory.set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


@functools.cache
def site_metrics() -> SiteMetrics:
    """The site's series, created on first use (after the daemon set the env)."""
    return SiteMetrics(
        train_seconds=Gauge("fedpacs_site_train_seconds", "Local training time of the last "
                            "round", multiprocess_mode="mostrecent"),
        train_samples=Gauge("fedpacs_site_train_samples", "Samples trained on in the last "
                            "round", multiprocess_mode="mostrecent"),
        val_samples=Gauge("fedpacs_site_val_samples", "Samples evaluated in the last round",
                          multiprocess_mode="mostrecent"),
        last_round=Gauge("fedpacs_site_last_round", "Last server round this site trained in",
                         multiprocess_mode="mostrecent"),
        peak_memory=Gauge("fedpacs_site_peak_memory_bytes", "Peak resident memory of a "
                          "ClientApp process", multiprocess_mode="max"),
        gpu_peak_memory=Gauge("fedpacs_site_gpu_peak_memory_bytes", "Peak GPU memory a "
                              "round's local training allocated (CUDA sites only)",
                              multiprocess_mode="mostrecent"),
        rounds=Counter("fedpacs_site_rounds", "Training rounds completed by this site"),
        errors=Counter("fedpacs_site_errors", "Messages refused by this site, by code",
                       ["code"]),
    )


@dataclass(frozen=True)
class ProcessState:
    """One process the site daemon supervises, as its metrics show it."""

    process: str  # "supernode" | "superexec" | "warm"
    restarts: int  # starts after the first
    up: bool  # running now (as the daemon last looked, every POLL_S)


class SiteProcessCollector(Collector):
    """``fedpacs_site_process_restarts_total{process}`` and ``fedpacs_site_process_up
    {process}`` of the site daemon, from ``states`` (called at each scrape)."""

    def __init__(self, states: Callable[[], Sequence[ProcessState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(PROCESS_RESTARTS, "Times the site daemon restarted "
                                       "this process after it exited", labels=["process"])
        up = GaugeMetricFamily(PROCESS_UP, "1 while this site process runs, 0 while the "
                               "daemon waits to restart it", labels=["process"])
        for state in self._states():
            restarts.add_metric([state.process], state.restarts)
            up.add_metric([state.process], 1.0 if state.up else 0.0)
        yield restarts
        yield up
