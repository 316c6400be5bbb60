"""The researcher's side of the registry API: list, show and pull models by token, and
export a pulled model as a MONAI bundle.

A pull checks the coordinator's Ed25519 signature over the run's manifest with a public key
the researcher pinned, then streams each file to disk while hashing it and compares it with
the signed manifest; files land in the output folder only when all of them match."""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fedpacs.common.artifacts import write_json
from fedpacs.common.errors import AuthError, ConfigError, DataError, FedpacsError, FieldError

REGISTRY_URL_ENV = "FEDPACS_REGISTRY_URL"
REGISTRY_TOKEN_ENV = "FEDPACS_TOKEN"
REGISTRY_CA_ENV = "FEDPACS_REGISTRY_CA"  # the CA that issued the registry's TLS certificate
REGISTRY_KEY_ENV = "FEDPACS_REGISTRY_KEY"  # the coordinator's artifact-signing.pub, pinned

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# served name -> where it sits in the signed manifest (a run directory's layout)
SIGNED_FILES = {"model_card.json": "final/model_card.json", "metrics.json": "metrics.json",
                "model.pt": "final/model.pt"}
REQUIRED_FILES = ("model.pt", "model_card.json")
PULLED_FILES = (*SIGNED_FILES, "MANIFEST.json", "MANIFEST.sig")
CHUNK_BYTES = 256 * 1024
MAX_JSON_BYTES = 16 << 20  # listings, cards, manifests
MAX_SIGNATURE_BYTES = 4096
MAX_FILE_BYTES = 8 << 30


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs: the only places plain HTTP may be used."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RegistryError(FedpacsError):
    """The registry answered with an error (404: no such model or file) or broke off."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: the bearer token never follows one to another address."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass(frozen=True)
class RegistryClient:
    """The registry API by bearer token: HTTPS (server certificate checked against ``ca``, or
    the system's CAs without one); plain HTTP only to a loopback address."""

    url: str
    token: str
    ca: Path | None = None
    timeout_s: float = 60.0  # each connect/read
    max_file_bytes: int = MAX_FILE_BYTES

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        errs = []
        if parts.scheme not in ("http", "https") or not parts.hostname:
            errs.append(FieldError("url", "https://HOST:PORT", repr(self.url),
                                   f"pass --url or set ${REGISTRY_URL_ENV}"))
        elif parts.scheme == "http" and not is_loopback(parts.hostname):
            errs.append(FieldError("url", "an https:// URL (plain http only on loopback)",
                                   repr(self.url), "use https://; the token and the model "
                                   "would cross the network in clear"))
        if self.ca is not None and parts.scheme == "http":
            errs.append(FieldError("ca", "an https:// --url to check the certificate of",
                                   repr(self.url), "use the registry's https:// URL"))
        if self.ca is not None and not self.ca.is_file():
            errs.append(FieldError("ca", "the registry CA's certificate (PEM)",
                                   f"{self.ca} (missing)", f"pass --ca FILE or set "
                                   f"${REGISTRY_CA_ENV}; ask the coordinator for ca.pem"))
        if errs:
            raise ConfigError("registry client", errs)

    # ----------------------------------------------------------------------- transport
    def _opener(self) -> urllib.request.OpenerDirector:
        handlers: list[Any] = [_NoRedirect]
        if urlsplit(self.url).scheme == "https":
            try:
                ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
            except (OSError, ssl.SSLError) as exc:
                raise AuthError(f"ca: expected a PEM CA certificate, got {self.ca} "
                                f"({type(exc).__name__}: {exc}). Fix: pass the registry's "
                                f"ca.pem with --ca or ${REGISTRY_CA_ENV}") from exc
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        return urllib.request.build_opener(*handlers)

    def _open(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.url.rstrip('/')}/{path.lstrip('/')}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            return self._opener().open(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 401:
                raise AuthError(f"registry {self.url}: token refused (401). Fix: check "
                                f"--token / ${REGISTRY_TOKEN_ENV}") from exc
            raise RegistryError(f"registry {self.url}: GET {path} answered {exc.code}",
                                status=exc.code) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise AuthError(
                    f"registry {self.url}: expected a TLS certificate issued by "
                    f"{self.ca or 'a system CA'} for this host, got one that does not verify "
                    f"({exc.reason.verify_message}). Fix: pass the registry's CA with --ca / "
                    f"${REGISTRY_CA_ENV} and use the host name on its certificate; if both "
                    "are right, someone may be intercepting the connection") from exc
            raise RegistryError(f"registry {self.url} unreachable ({exc.reason}). Fix: check "
                                f"--url / ${REGISTRY_URL_ENV}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"registry {self.url} unreachable ({exc}). Fix: check --url / "
                                f"${REGISTRY_URL_ENV}") from exc

    def _get(self, path: str, *, limit: int = MAX_JSON_BYTES) -> bytes:
        """A small answer (JSON, a signature), read whole up to ``limit`` bytes."""
        try:
            with self._open(path) as resp:
                data = bytes(resp.read(limit + 1))
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"registry {self.url}: GET {path} broke off ({exc}). Fix: "
                                "try again") from exc
        if len(data) > limit:
            raise RegistryError(f"registry {self.url}: GET {path} answered more than {limit} "
                                "bytes; expected a small JSON document")
        return data

    def _download(self, path: str, dest: Path) -> str:
        """Stream one file to ``dest`` (a new file), hashing it; returns its SHA-256."""
        digest, size = hashlib.sha256(), 0
        try:
            with self._open(path) as resp, dest.open("xb") as f:
                length = getattr(resp, "length", None)
                if length is not None and length > self.max_file_bytes:
                    raise RegistryError(f"registry {self.url}: GET {path} announces {length} "
                                        f"bytes; expected at most {self.max_file_bytes}")
                while chunk := resp.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > self.max_file_bytes:
                        raise RegistryError(f"registry {self.url}: GET {path} sent more than "
                                            f"{self.max_file_bytes} bytes")
                    digest.update(chunk)
                    f.write(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"registry {self.url}: GET {path} broke off ({exc}). Fix: "
                                "pull again") from exc
        return digest.hexdigest()

    # ----------------------------------------------------------------------------- API
    def list(self) -> list[dict[str, Any]]:
        return list(json.loads(self._get("v1/models"))["models"])

    def show(self, model_id: str) -> dict[str, Any]:
        return dict(json.loads(self._get(f"v1/models/{quote(model_id, safe='')}")))

    def pull(self, model_id: str, out_dir: Path, *, public_key: Path | None = None,
             insecure_no_signature: bool = False) -> Path:
        """Download a model into ``out_dir``: model.pt, model_card.json and (when signed)
        metrics.json, MANIFEST.json and MANIFEST.sig. With ``public_key`` (the coordinator's
        artifact-signing.pub, pinned) the manifest's signature is checked first and every
        file against it; ``insecure_no_signature`` checks the model only against the card
        served with it. Nothing lands in ``out_dir`` unless every check passes."""
        errs = []
        if not MODEL_ID_RE.match(model_id):
            errs.append(FieldError("model_id", f"a model id matching {MODEL_ID_RE.pattern}",
                                   repr(model_id), "copy the id from `fedpacs models list`"))
        if public_key is None and not insecure_no_signature:
            errs.append(FieldError(
                "public-key", "the coordinator's artifact-signing.pub, pinned", "nothing",
                f"pass --public-key FILE or set ${REGISTRY_KEY_ENV} (get the key from the "
                "coordinator out of band); --insecure-no-signature skips the check"))
        if errs:
            raise ConfigError("models pull", errs)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
        stage.mkdir()
        try:
            if public_key is not None:
                self._pull_signed(model_id, stage, public_key)
            else:
                self._pull_unsigned(model_id, stage)
            _install(stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return out_dir / "model.pt"

    def _file_path(self, model_id: str, name: str) -> str:
        return f"v1/models/{quote(model_id, safe='')}/files/{name}"

    def _pull_signed(self, model_id: str, stage: Path, public_key: Path) -> None:
        from fedpacs.common.signing import MANIFEST, SIGNATURE, verify_manifest

        try:
            raw = self._get(self._file_path(model_id, "MANIFEST.json"))
            sig = self._get(self._file_path(model_id, "MANIFEST.sig"),
                            limit=MAX_SIGNATURE_BYTES)
        except RegistryError as exc:
            if exc.status != 404:
                raise
            self.show(model_id)  # an unknown model is a plain 404
            raise AuthError(f"{model_id}/{MANIFEST}, {SIGNATURE}: expected the run's signed "
                            "manifest, got none from the registry (the run was not signed, or "
                            "its signature was removed). Fix: ask the coordinator to sign the "
                            "run; only pull with --insecure-no-signature if you trust the "
                            "registry host") from exc
        signed = verify_manifest(raw, sig, public_key)
        missing = [f"{name} ({SIGNED_FILES[name]})" for name in REQUIRED_FILES
                   if SIGNED_FILES[name] not in signed]
        if missing:
            raise AuthError(f"{model_id}: expected {', '.join(missing)} in the signed "
                            "manifest, got a manifest without them. Fix: ask the coordinator "
                            "to re-sign the finished run")
        problems = []
        for name, rel in SIGNED_FILES.items():
            if rel not in signed:
                continue
            got = self._download(self._file_path(model_id, name), stage / name)
            if got != signed[rel]:
                problems.append(f"{model_id}/{name}: expected SHA-256 {signed[rel]} ({rel} "
                                f"in the signed manifest), got {got}")
        if problems:
            raise AuthError("the registry's copy is not what the coordinator signed:\n"
                            + "\n".join(f"  - {p}" for p in problems) + "\nFix: do not use "
                            "this model; tell the coordinator (the registry may have been "
                            "tampered with). Nothing was written")
        (stage / "MANIFEST.json").write_bytes(raw)
        (stage / "MANIFEST.sig").write_bytes(sig)
        _check_card(model_id, stage)

    def _pull_unsigned(self, model_id: str, stage: Path) -> None:
        for name in REQUIRED_FILES[::-1]:
            self._download(self._file_path(model_id, name), stage / name)
        _check_card(model_id, stage)


def _check_card(model_id: str, stage: Path) -> None:
    """The model's SHA-256 must be the one its card names."""
    from fedpacs.common.hashing import sha256_file

    try:
        card = json.loads((stage / "model_card.json").read_text(encoding="utf-8"))
        expected = card.get("files", {}).get("model.pt", {}).get("sha256")
    except (ValueError, AttributeError) as exc:
        raise DataError(f"{model_id}/model_card.json", f"expected a JSON model card, got "
                        f"unreadable content ({exc})", "pull again; report it if it "
                        "persists") from exc
    got = sha256_file(stage / "model.pt")
    if expected != got:
        raise DataError(f"{model_id}/model.pt", f"expected the model card's SHA-256 "
                        f"{expected}, got {got}", "pull again; report it if it persists")


def _install(stage: Path, out_dir: Path) -> None:
    """Move checked files into ``out_dir``: the whole folder at once when it is new, else
    file by file (each an atomic rename), dropping files of an earlier pull not replaced."""
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    for name in PULLED_FILES:
        if (stage / name).is_file():
            os.replace(stage / name, out_dir / name)
        elif (out_dir / name).is_file():
            (out_dir / name).unlink()


def export_bundle(model_path: Path, out_dir: Path) -> Path:
    """Write a MONAI bundle (configs/metadata.json, configs/inference.json, models/model.pt)
    whose ``network_def`` rebuilds the same network, and whose ``preprocessing`` (a MONAI
    ``Compose`` on ``{"image": x}``) applies the task's preprocessing steps exactly as the
    sites and the server did (fedpacs.common.preprocess.TaskPreprocessd, its ``steps`` the
    task's ``preprocess``; none: an empty Compose) to an image in the task's input
    convention, before the network; metadata.json records the steps under
    ``fedpacs.preprocess``."""
    import torch

    from fedpacs.common.artifacts import load_model
    from fedpacs.common.models import MODELS
    from fedpacs.common.preprocess import IMAGE_KEY, TaskPreprocessd
    from fedpacs.common.tasks import TaskConfig

    model, card = load_model(model_path, device="cpu")
    task = TaskConfig.from_dict(card["task"])
    spec = MODELS[task.network]
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "models" / "model.pt")
    import monai

    heldout = (card.get("rounds") or [{}])[-1].get("heldout")
    write_json(out_dir / "configs" / "metadata.json", {
        "version": "1.0.0", "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "name": f"fedpacs {task.name} ({task.network})",
        "task": f"{task.kind} of {task.name}", "description": "Global model of a fedpacs "
        "federated run; the model card is in docs/model_card.json.",
        "authors": "fedpacs", "copyright": "see the data sets' licences",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": task.in_channels,
                                 "spatial_shape": list(task.input_shape), "dtype": "float32"}},
            "outputs": {"pred": {"type": "image" if task.kind == "segmentation" else "probs",
                                 "num_channels": task.num_classes,
                                 "channel_def": dict(enumerate(task.class_names))}}},
        "fedpacs": {"heldout": heldout, "sites": card.get("sites"),
                    "preprocess": list(task.preprocess)},
    })
    steps = [{"_target_": f"{TaskPreprocessd.__module__}.{TaskPreprocessd.__qualname__}",
              "keys": IMAGE_KEY, "steps": list(task.preprocess)}] if task.preprocess else []
    write_json(out_dir / "configs" / "inference.json", {
        "image_key": IMAGE_KEY,
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "network_def": spec.network_def(task), "network": "$@network_def.to('cpu')"})
    (out_dir / "docs").mkdir(exist_ok=True)
    write_json(out_dir / "docs" / "model_card.json", card)
    return out_dir
