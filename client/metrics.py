"""Prometheus metrics of a site. ClientApp processes are short-lived, so with
``PROMETHEUS_MULTIPROC_DIR`` set (the site daemon sets it) every process writes its values
to that folder and the daemon serves their combination."""

from __future__ import annotations

import functools
import resource
from dataclasses import dataclass

from prometheus_client import Counter, Gauge


@dataclass(frozen=True)
class SiteMetrics:
    train_seconds: Gauge
    train_samples: Gauge
    val_samples: Gauge
    last_round: Gauge
    peak_memory: Gauge
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
        rounds=Counter("fedpacs_site_rounds", "Training rounds completed by this site"),
        errors=Counter("fedpacs_site_errors", "Messages refused by this site, by code",
                       ["code"]),
    )
