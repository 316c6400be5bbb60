"""Signed model artifacts: an Ed25519 signature over a manifest of SHA-256 hashes.

``final/MANIFEST.json`` lists every artifact of a run (final model, card, metrics, every
round's checkpoint) with its hash; ``final/MANIFEST.sig`` is the coordinator's signature
of that manifest. Anyone with the public key can check that nothing was changed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import tempfile
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
    """Write secrets readable by the owner only, atomically: a temp file created with mode
    600 next to ``path`` is renamed over it, so the result is 600 even when ``path`` already
    existed with a wider mode, and readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # mkstemp's 600, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
                        "with `fedpacs provision signing-keys`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuthError(f"{path}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def _load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuthError(f"{path}: not a readable Ed25519 public key ({exc}). Fix: use the "
                        "coordinator's app-signing.pub (apps) or artifact-signing.pub "
                        "(runs)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuthError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


HELDOUT_CASES_FILE = "final/heldout_cases.json"  # per-case held-out results (--uncertainty)


def artifact_paths(run_dir: Path) -> list[str]:
    files = ["final/model.pt", "final/model_card.json", "metrics.json", HELDOUT_CASES_FILE]
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


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def verify_manifest(raw: bytes, signature: bytes, public_key: Path) -> dict[str, str]:
    """Check a manifest received as bytes (e.g. from the registry) against its signature
    file's content and a pinned public key; returns its files (run-relative path -> SHA-256)
    or raises AuthError naming what is wrong."""
    key = _load_public(public_key)
    try:
        sig = base64.b64decode(signature.strip(), validate=True)
    except ValueError as exc:
        raise AuthError(f"{SIGNATURE}: expected a base64 Ed25519 signature, got unreadable "
                        f"content ({exc}). Fix: do not use this model; ask the coordinator to "
                        "re-sign the run") from exc
    try:
        key.verify(sig, raw)
    except InvalidSignature as exc:
        raise AuthError(f"{SIGNATURE}: the signature does not match {MANIFEST} for the "
                        f"pinned key {public_key} (the manifest was changed, or signed by "
                        "another key). Fix: do not use this model; check with the coordinator "
                        "that you pinned their artifact-signing.pub") from exc
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        fmt = manifest.get("format")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AuthError(f"{MANIFEST}: signed but not a fedpacs manifest ({exc}). Fix: ask the "
                        "coordinator to re-sign the run with this fedpacs version") from exc
    if fmt != MANIFEST_FORMAT or not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _SHA256_RE.match(v)
            for k, v in files.items()):
        raise AuthError(f"{MANIFEST}: expected format {MANIFEST_FORMAT!r} with a SHA-256 per "
                        f"file, got format {fmt!r}. Fix: ask the coordinator to re-sign the "
                        "run with this fedpacs version")
    return dict(files)


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
                        "coordinator's app-signing.pub to security.trusted_app_keys, if you "
                        "trust it")
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


# A fedpacs app is a pyproject.toml and its signature: a bundle far beyond these is refused
# before anything is decompressed (a zip bomb never gets inflated in the site's memory).
MAX_APP_FILES = 256
MAX_APP_BYTES = 16 * 2**20


def verify_fab(fab: bytes, trusted: Sequence[Path], *, max_files: int = MAX_APP_FILES,
               max_bytes: int = MAX_APP_BYTES) -> str:
    """:func:`verify_app_files` over a Flower App Bundle (a zip), read within bounds: at
    most ``max_files`` entries and ``max_bytes`` decompressed in all (checked while
    inflating, since a zip's declared sizes may lie)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            if len(names) > max_files:
                raise AuthError(f"the app bundle holds {len(names)} files, expected at most "
                                f"{max_files}. Fix: sign and send only the fedpacs app")
            files: dict[str, bytes] = {}
            budget = max_bytes
            for n in names:
                with z.open(n) as f:
                    data = f.read(budget + 1)
                if len(data) > budget:
                    raise AuthError(f"the app bundle inflates past {max_bytes} bytes (at "
                                    f"{n!r}). Fix: sign and send only the fedpacs app")
                budget -= len(data)
                files[n] = data
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError) as exc:
        raise AuthError(f"the app bundle is not a readable zip file ({exc})") from exc
    return verify_app_files(files, trusted)
