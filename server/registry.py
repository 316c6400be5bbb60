"""The model registry: every run's checkpoints and final model with its model card,
served to researchers over an authenticated HTTPS API.

Researchers authenticate with a per-researcher bearer token; the server keeps only the
SHA-256 of each token. Only registered run folders and a fixed set of files are served
(the final model, its card, the metrics and the run's signed manifest with its signature):
anything else, including paths that try to leave the registry, is 404.

The server speaks TLS (``TlsFiles``) and refuses to listen beyond loopback without it. Each
connection has a deadline: the TLS handshake and the whole request must arrive within
``ServeLimits.timeout_s`` and within ``max_request_bytes``, and every write must progress
within ``timeout_s``; at most ``max_connections`` are served at once. Files are streamed in
chunks, never read whole.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fedpacs.common.artifacts import clean_json, write_json
from fedpacs.common.errors import AuthError, ConfigError, FieldError
from fedpacs.common.registry_api import MODEL_ID_RE, is_loopback
from fedpacs.common.signing import MANIFEST, SIGNATURE, write_private

log = logging.getLogger("fedpacs.registry")

# served name -> path in the run directory (the manifest layout of common/signing.py)
SERVED_FILES = {"model.pt": "final/model.pt", "model_card.json": "final/model_card.json",
                "metrics.json": "metrics.json", "MANIFEST.json": MANIFEST,
                "MANIFEST.sig": SIGNATURE}
CHUNK_BYTES = 256 * 1024  # one read from disk, one bounded write to the socket


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenStore:
    """Researcher name -> SHA-256 of their token, in a JSON file (mode 600)."""

    path: Path

    def load(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AuthError(f"{self.path}: unreadable token file ({exc}). Fix: recreate it "
                            "with `fedpacs registry add-token`") from exc

    def add(self, researcher: str) -> str:
        """Create (or replace) a researcher's token; returns it (shown once, not stored)."""
        if not re.match(r"^[A-Za-z0-9._@-]{1,64}$", researcher):
            raise AuthError(f"researcher name {researcher!r}: expected letters, digits, "
                            "'.', '_', '@' or '-' (max 64)")
        token = secrets.token_urlsafe(32)
        tokens = self.load() | {researcher: _hash(token)}
        write_private(self.path, json.dumps(tokens, indent=2, sort_keys=True).encode())
        return token

    def who(self, token: str) -> str | None:
        digest = _hash(token)
        for name, stored in self.load().items():
            if hmac.compare_digest(stored, digest):
                return name
        return None


@dataclass(frozen=True)
class Registry:
    """A folder of run directories (``<root>/<model id>/final/model.pt`` ...)."""

    root: Path

    def model_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if MODEL_ID_RE.match(p.name) and (p / "final" / "model_card.json").is_file())

    def card(self, model_id: str) -> dict[str, Any] | None:
        path = self.file(model_id, "model_card.json")
        return dict(json.loads(path.read_text())) if path else None

    def summary(self, model_id: str) -> dict[str, Any]:
        card = self.card(model_id) or {}
        rounds = card.get("rounds") or [{}]
        return clean_json({
            "id": model_id, "task": card.get("task", {}).get("name"),
            "network": card.get("task", {}).get("network"), "strategy": card.get("strategy"),
            "rounds": card.get("num_rounds"), "sites": card.get("sites"),
            "created": card.get("created"), "heldout": rounds[-1].get("heldout"),
            "sha256": card.get("files", {}).get("model.pt", {}).get("sha256"),
        })

    def file(self, model_id: str, name: str) -> Path | None:
        """The file to serve, or None (unknown id or name, or a path outside the root)."""
        if not MODEL_ID_RE.match(model_id) or name not in SERVED_FILES:
            return None
        entry = self.root / model_id  # a run folder, or a link to one made by publish()
        if not entry.is_dir():
            return None
        run_dir = entry.resolve()
        path = (run_dir / SERVED_FILES[name]).resolve()
        if not path.is_relative_to(run_dir) or not path.is_file():
            return None
        return path

    def publish(self, run_dir: Path, model_id: str, *, allow_unsigned: bool = False) -> Path:
        """Record a finished, signed run under ``model_id`` (a link to its run directory);
        researchers' pulls check its signed manifest."""
        errs = []
        if not MODEL_ID_RE.match(model_id):
            errs.append(FieldError("--id", f"a model id matching {MODEL_ID_RE.pattern}",
                                   repr(model_id), "use letters, digits, '.', '_' and '-', "
                                   "e.g. hippo-2026-11"))
        if not (run_dir / "final" / "model_card.json").is_file():
            errs.append(FieldError("run_dir", "a finished run (final/model_card.json)",
                                   str(run_dir), "wait for the run to finish or pick its run "
                                   "directory"))
        elif not allow_unsigned and not ((run_dir / MANIFEST).is_file()
                                         and (run_dir / SIGNATURE).is_file()):
            errs.append(FieldError("run_dir", f"a signed run ({MANIFEST} and {SIGNATURE})",
                                   f"{run_dir} (not signed)", "sign it with the coordinator's "
                                   "artifact key (runs started by `fedpacs run start` are); "
                                   "researchers' `models pull` refuses unsigned models. "
                                   "--allow-unsigned publishes it anyway (development)"))
        dest = self.root / model_id
        if not errs and (dest.exists() or dest.is_symlink()) \
                and dest.resolve() != run_dir.resolve():
            errs.append(FieldError("--id", "an id not yet in the registry",
                                   f"{model_id!r} (already {dest.resolve().name})",
                                   "choose another --id; published models are never replaced"))
        if errs:
            raise ConfigError("registry publish", errs)
        self.root.mkdir(parents=True, exist_ok=True)
        if not dest.is_symlink() and not dest.exists():
            dest.symlink_to(run_dir.resolve(), target_is_directory=True)
        write_json(self.root / "index.json", {"models": self.model_ids()})
        return dest


@dataclass(frozen=True)
class ServeLimits:
    """What one connection may cost the server."""

    timeout_s: float = 30.0  # TLS handshake + whole request; also each write's progress
    max_request_bytes: int = 32 * 1024  # request line and headers (GET only, no body)
    max_connections: int = 64  # served at once; more are closed at once

    def check(self) -> list[FieldError]:
        errs = []
        if not self.timeout_s > 0:
            errs.append(FieldError("--timeout", "seconds > 0", repr(self.timeout_s),
                                   "use e.g. 30"))
        if self.max_request_bytes < 1024:
            errs.append(FieldError("max_request_bytes", "at least 1024",
                                   repr(self.max_request_bytes), "use e.g. 32768"))
        if self.max_connections < 1:
            errs.append(FieldError("max_connections", "at least 1",
                                   repr(self.max_connections), "use e.g. 64"))
        return errs


@dataclass(frozen=True)
class TlsFiles:
    """The registry's TLS certificate (PEM, chain allowed) and its private key."""

    cert: Path
    key: Path

    def check(self) -> list[FieldError]:
        return [FieldError(flag, "a readable PEM file", f"{path} (missing)",
                           "issue one from the federation CA (server.coordinator.pki."
                           "issue_tls_cert) or your organisation's CA")
                for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key))
                if not path.is_file()]

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise AuthError(f"--tls-cert {self.cert} / --tls-key {self.key}: expected a PEM "
                            f"certificate and its matching private key, got "
                            f"{type(exc).__name__}: {exc}. Fix: pass the .pem and .key issued "
                            "together (unencrypted key)") from exc
        return ctx


class _RequestTooLarge(Exception):
    """The request line and headers went past ``ServeLimits.max_request_bytes``."""


class _RequestReader(io.RawIOBase):
    """The handler's input: every receive waits at most until the request's deadline, and
    the connection may send at most ``max_bytes`` in all."""

    def __init__(self, sock: socket.socket, *, deadline: float, max_bytes: int) -> None:
        super().__init__()
        self.sock, self.deadline, self.max_bytes, self.received = sock, deadline, max_bytes, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive before its deadline")
        self.sock.settimeout(remaining)
        n = self.sock.recv_into(buffer, min(len(buffer), self.max_bytes - self.received + 1))
        self.received += n
        if self.received > self.max_bytes:
            raise _RequestTooLarge(f"request larger than {self.max_bytes} bytes")
        return n


def make_handler(registry: Registry, tokens: TokenStore,
                 limits: ServeLimits) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedpacs-registry/2"
        sys_version = ""  # no Python version in the Server header
        timeout = limits.timeout_s

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # replaced by one with a deadline and a byte budget
            self.rfile = io.BufferedReader(_RequestReader(
                self.connection, deadline=time.monotonic() + limits.timeout_s,
                max_bytes=limits.max_request_bytes))
            # what send_error/log_request read, should the request line itself be refused
            self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""

        def handle(self) -> None:
            try:
                super().handle()
            except _RequestTooLarge as exc:
                log.warning("%s: %s; connection closed", self.address_string(), exc)
                self.close_connection = True
                self.connection.settimeout(limits.timeout_s)
                self._json(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                           {"error": str(exc), "fix": "send only the Authorization header"})

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, status: HTTPStatus, body: bytes, ctype: str = "application/json"
                  ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, value: Any) -> None:
            self._send(status, json.dumps(clean_json(value), indent=2).encode())

        def _stream(self, path: Path) -> None:
            """Send one file in chunks (its size taken from the open file)."""
            with path.open("rb") as f:
                left = os.fstat(f.fileno()).st_size
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(left))
                self.end_headers()
                while left > 0:
                    chunk = f.read(min(CHUNK_BYTES, left))
                    if not chunk:  # shrank under us: the client sees a short body
                        self.close_connection = True
                        return
                    self.wfile.write(chunk)
                    left -= len(chunk)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self.connection.settimeout(limits.timeout_s)  # each write must progress
            auth = self.headers.get("Authorization", "")
            who = tokens.who(auth[7:]) if auth.startswith("Bearer ") else None
            if who is None:
                self._json(HTTPStatus.UNAUTHORIZED, {"error": "missing or invalid bearer token",
                                                     "fix": "ask the coordinator for a token"})
                return
            parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
            if parts[:2] != ["v1", "models"] or len(parts) > 5:
                self._json(HTTPStatus.NOT_FOUND, {"error": "no such endpoint"})
                return
            if len(parts) == 2:
                self._json(HTTPStatus.OK, {"models": [registry.summary(m)
                                                      for m in registry.model_ids()]})
                return
            model_id = parts[2]
            if len(parts) == 3:
                card = registry.card(model_id)
                if card is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no model {model_id!r}"})
                else:
                    self._json(HTTPStatus.OK, card)
                return
            path = registry.file(model_id, parts[4]) if parts[3] == "files" and len(parts) == 5 \
                else None
            if path is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": "no such file"})
                return
            log.info("researcher %s pulled %s/%s", who, model_id, parts[4])
            self._stream(path)

    return Handler


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once; the TLS handshake
    happens in that thread under the connection's timeout, never in the accept loop."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 tls: ssl.SSLContext | None, limits: ServeLimits) -> None:
        self.tls, self.limits = tls, limits
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.warning("%s: refused, %d connections already open", client_address[0],
                        self.limits.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.limits.timeout_s)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:  # the handshake as a whole is bounded by the socket timeout
            conn = self.tls.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError, TimeoutError, resets
            log.info("%s: TLS handshake failed (%s: %s)", client_address[0],
                     type(exc).__name__, exc)
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.info("%s: connection dropped", client_address[0], exc_info=True)


@dataclass
class RegistryServer:
    """The registry's API on ``host:port`` (0: a free port), in a background thread: HTTPS
    with ``tls``; plain HTTP only on a loopback address."""

    registry: Registry
    tokens: TokenStore
    host: str = "127.0.0.1"
    port: int = 0
    tls: TlsFiles | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self) -> None:
        errs = self.limits.check()
        if self.tls is None and not is_loopback(self.host):
            errs.append(FieldError(
                "--host", "a loopback address (127.0.0.1, localhost) when serving without TLS",
                repr(self.host), "pass --tls-cert FILE and --tls-key FILE to serve HTTPS, or "
                "bind --host 127.0.0.1"))
        if self.tls is not None:
            errs += self.tls.check()
        if errs:
            raise ConfigError("registry serve", errs)
        context = self.tls.context() if self.tls is not None else None
        self.httpd = _Server((self.host, self.port),
                             make_handler(self.registry, self.tokens, self.limits),
                             tls=context, limits=self.limits)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> RegistryServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
