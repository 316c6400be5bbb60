"""Signed model artifacts: an Ed25519 signature over a manifest of SHA-256 hashes.

``final/MANIFEST.json`` lists every artifact of a run (final model, card, metrics, every
round's checkpoint) with its hash; ``final/MANIFEST.sig`` is the coordinator's signature
of that manifest. Anyone with the public key can check that nothing was changed.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpacs.common.artifacts import sha256_file
from fedpacs.common.errors import AuthError

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
