"""Prometheus export for processes that come and go (ServerApp, ClientApp): they write
their values to ``PROMETHEUS_MULTIPROC_DIR``; a long-lived exporter serves the folder."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

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


def serve_multiprocess(directory: Path, port: int, host: str = "127.0.0.1"
                       ) -> tuple[WSGIServer, threading.Thread]:
    """Serve the combined values in ``directory`` on ``host:port`` (background thread)."""
    directory.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return start_http_server(port, addr=host, registry=registry)
