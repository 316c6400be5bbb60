"""The model registry: every run's checkpoints and final model with its model card,
served to researchers over an authenticated HTTP API.

Researchers authenticate with a per-researcher bearer token; the server keeps only the
SHA-256 of each token. Only registered run folders and a fixed set of files are served:
anything else, including paths that try to leave the registry, is 404.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fedpacs.common.artifacts import clean_json, write_json
from fedpacs.common.errors import AuthError, ConfigError, FieldError

log = logging.getLogger("fedpacs.registry")

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SERVED_FILES = {"model.pt": "final/model.pt", "model_card.json": "final/model_card.json",
                "metrics.json": "metrics.json"}


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(tokens, indent=2, sort_keys=True))
        self.path.chmod(0o600)
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

    def publish(self, run_dir: Path, model_id: str) -> Path:
        """Record a finished run under ``model_id`` (a link to its run directory)."""
        errs = []
        if not MODEL_ID_RE.match(model_id):
            errs.append(FieldError("--id", f"a model id matching {MODEL_ID_RE.pattern}",
                                   repr(model_id), "use letters, digits, '.', '_' and '-', "
                                   "e.g. hippo-2026-11"))
        if not (run_dir / "final" / "model_card.json").is_file():
            errs.append(FieldError("run_dir", "a finished run (final/model_card.json)",
                                   str(run_dir), "wait for the run to finish or pick its run "
                                   "directory"))
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


def make_handler(registry: Registry, tokens: TokenStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedpacs-registry/1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, status: HTTPStatus, body: bytes, ctype: str = "application/json",
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, value: Any) -> None:
            self._send(status, json.dumps(clean_json(value), indent=2).encode())

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
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
            data = path.read_bytes()
            self._send(HTTPStatus.OK, data, "application/octet-stream",
                       {"X-Content-SHA256": hashlib.sha256(data).hexdigest()})

    return Handler


@dataclass
class RegistryServer:
    """The registry's HTTP API on ``host:port`` (0: a free port), in a background thread."""

    registry: Registry
    tokens: TokenStore
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self.httpd = ThreadingHTTPServer((self.host, self.port),
                                         make_handler(self.registry, self.tokens))
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
