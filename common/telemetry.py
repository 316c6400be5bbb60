"""Prometheus export for processes that come and go (ServerApp, ClientApp): they write
their values to ``PROMETHEUS_MULTIPROC_DIR``; a long-lived exporter serves the folder."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, multiprocess, start_http_server
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    d = os.environ.get(MULTIPROC_ENV)
    return Path(d) if d else None


def fresh_dir(directory: Path) -> Path:
    """An empty metrics folder (files of earlier processes would be stale)."""
    if directory.is_dir():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def serve_multiprocess(directory: Path, port: int, host: str = "127.0.0.1", *,
                       collectors: Sequence[Collector] = ()
                       ) -> tuple[WSGIServer, threading.Thread]:
    """Serve the combined values in ``directory`` on ``host:port`` (background thread),
    beside the series of ``collectors`` (the serving process's own live values, e.g. the
    site daemon's processes: read at each scrape, no file and no env needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    for collector in collectors:
        registry.register(collector)
    return start_http_server(port, addr=host, registry=registry)
