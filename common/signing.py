"""Signed model artifacts: an Ed25519 signature over a manifest of SHA-256 hashes.

``final/MANIFEST.json`` lists every artifact of a run (final model, card, metrics, every
round's checkpoint) with its hash; ``final/MANIFEST.sig`` is the coordinator's signature
of that manifest. Anyone with the public key can check that nothing was changed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import os
import tomllib
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpacs.common.errors import AuthError
from fedpacs.common.hashing import sha256_file

MANIFEST = "final/MANIFEST.json"
SIGNATURE = "final/MANIFEST.sig"
MANIFEST_FORMAT = "fedpacs-manifest/1"


def write_private(path: Path, data: bytes) -> None:
    """Write key material readable by the owner only (created with mode 600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_signing_key(private_path: Path) -> Path:
    """A new Ed25519 key: private PEM (mode 600) and ``<name>.pub`` PEM; returns the .pub."""
    key = Ed25519PrivateKey.generate()
    write_private(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pub = private_path.with_suffix(".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise AuthError(f"{path}: not a readable Ed25519 private key ({exc}). Fix: create one "
                        "with `fedpacs provision signing-key`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuthError(f"{path}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def _load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuthError(f"{path}: not a readable Ed25519 public key ({exc}). Fix: use the "
                        "coordinator's signing.pub") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuthError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def artifact_paths(run_dir: Path) -> list[str]:
    files = ["final/model.pt", "final/model_card.json", "metrics.json"]
    files += sorted(str(p.relative_to(run_dir)) for p in (run_dir / "rounds").glob("*/*")
                    if p.is_file())
    return [f for f in files if (run_dir / f).is_file()]


def _canonical(manifest: Mapping[str, object]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def sign_run(run_dir: Path, private_key: Path) -> Path:
    """Write the run's manifest of hashes and its signature; returns the manifest path."""
    key = _load_private(private_key)
    manifest = {"format": MANIFEST_FORMAT,
                "files": {f: sha256_file(run_dir / f) for f in artifact_paths(run_dir)}}
    (run_dir / MANIFEST).write_bytes(_canonical(manifest))
    (run_dir / SIGNATURE).write_text(base64.b64encode(key.sign(_canonical(manifest))).decode())
    return run_dir / MANIFEST


@dataclass(frozen=True)
class Verification:
    ok: bool
    problems: list[str]
    checked: int


def verify_run(run_dir: Path, public_key: Path) -> Verification:
    """Check the signature and every listed file's hash; names each problem."""
    key = _load_public(public_key)
    problems: list[str] = []
    try:
        raw = (run_dir / MANIFEST).read_bytes()
        sig = base64.b64decode((run_dir / SIGNATURE).read_text())
    except (OSError, ValueError) as exc:
        return Verification(False, [f"{MANIFEST}/{SIGNATURE}: missing or unreadable ({exc}); "
                                    "the run was not signed"], 0)
    try:
        key.verify(sig, raw)
    except InvalidSignature:
        problems.append(f"{SIGNATURE}: signature does not match the manifest for this key "
                        "(manifest changed, or signed by another key)")
    manifest = json.loads(raw)
    files: dict[str, str] = manifest.get("files", {})
    for rel, digest in sorted(files.items()):
        path = run_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: SHA-256 differs from the signed manifest (file changed)")
    return Verification(not problems, problems, len(files))


# --------------------------------------------------------------------------- signed apps
APP_SIGNATURE = "fedpacs-app.sig.json"  # inside the app folder, so it travels in the FAB
APP_SIGNATURE_FORMAT = "fedpacs-app-signature/1"
FAB_MANIFEST = ".info/CONTENT"  # written by `flwr build` itself


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: SHA-256 of its raw bytes, 16 hex digits."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_app(app_dir: Path, private_key: Path) -> Path:
    """Sign every file of a Flower app folder; writes ``fedpacs-app.sig.json`` there."""
    key = _load_private(private_key)
    _normalise_pyproject(app_dir / "pyproject.toml")
    files = {p.relative_to(app_dir).as_posix(): sha256_file(p)
             for p in sorted(app_dir.rglob("*")) if p.is_file() and p.name != APP_SIGNATURE}
    payload = {"format": APP_SIGNATURE_FORMAT, "files": files,
               "key_id": key_id(key.public_key()),
               "signed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    out = app_dir / APP_SIGNATURE
    out.write_text(json.dumps({**payload, "signature": base64.b64encode(
        key.sign(_canonical(payload))).decode()}, indent=1, sort_keys=True))
    return out


def _normalise_pyproject(path: Path) -> None:
    """Write pyproject.toml as ``flwr build`` puts it in the bundle (re-serialised, without
    [tool.flwr.federations]), so that the signed hash is the one the site sees."""
    if not path.is_file():
        return
    config = tomllib.loads(path.read_text(encoding="utf-8"))
    config.get("tool", {}).get("flwr", {}).pop("federations", None)
    path.write_bytes(tomli_w.dumps(config).encode("utf-8"))


def verify_app_files(files: Mapping[str, bytes], trusted: Sequence[Path]) -> str:
    """Check an app's files (path -> bytes) against its signature and this site's trusted
    keys; returns the signer's key id or raises AuthError saying what is wrong."""
    keys = {key_id(k): k for k in (_load_public(p) for p in trusted)}
    if APP_SIGNATURE not in files:
        raise AuthError(f"the app is not signed (no {APP_SIGNATURE}). Fix: start runs with "
                        "`fedpacs run start`, which signs the app with the coordinator's key")
    try:
        doc = json.loads(files[APP_SIGNATURE])
        sig = base64.b64decode(doc.pop("signature"))
    except (ValueError, KeyError, AttributeError) as exc:
        raise AuthError(f"{APP_SIGNATURE}: unreadable ({exc}); the app was not signed by "
                        "fedpacs") from exc
    signer = str(doc.get("key_id", ""))
    if signer not in keys:
        raise AuthError(f"the app is signed by key {signer!r}, which this site does not trust "
                        f"(trusted: {', '.join(sorted(keys)) or 'none'}). Fix: add the "
                        "coordinator's signing.pub to security.trusted_app_keys, if you trust it")
    try:
        keys[signer].verify(sig, _canonical(doc))
    except InvalidSignature as exc:
        raise AuthError(f"{APP_SIGNATURE}: the signature does not match its file list "
                        "(the signature file was edited)") from exc
    signed: dict[str, str] = dict(doc.get("files", {}))
    present = {k: v for k, v in files.items() if k not in (APP_SIGNATURE, FAB_MANIFEST)}
    problems = [f"{k}: not in the signed app (added after signing)"
                for k in sorted(set(present) - set(signed))]
    problems += [f"{k}: signed but missing" for k in sorted(set(signed) - set(present))]
    problems += [f"{k}: changed after signing (SHA-256 differs)" for k in sorted(present)
                 if k in signed and hashlib.sha256(present[k]).hexdigest() != signed[k]]
    if problems:
        raise AuthError("the app differs from what the coordinator signed: "
                        + "; ".join(problems))
    return signer


def verify_fab(fab: bytes, trusted: Sequence[Path]) -> str:
    """:func:`verify_app_files` over a Flower App Bundle (a zip)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            files = {n: z.read(n) for n in z.namelist() if not n.endswith("/")}
    except zipfile.BadZipFile as exc:
        raise AuthError(f"the app bundle is not a zip file ({exc})") from exc
    return verify_app_files(files, trusted)
