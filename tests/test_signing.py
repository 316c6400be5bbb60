"""Signed artifacts and signed apps: a tampered file or a foreign key fails verification."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from fedpacs.client.gate import AppRefused, checked
from fedpacs.common.errors import AuthError, ExitCode
from fedpacs.common.models import build_model
from fedpacs.common.signing import (
    APP_SIGNATURE,
    FAB_MANIFEST,
    generate_signing_key,
    sign_app,
    sign_run,
    verify_app_files,
    verify_run,
)
from fedpacs.common.tasks import TASK_PRESETS
from fedpacs.deploy.cli import main
from fedpacs.server.recorder import RoundRecord
from fedpacs.server.rundir import RunDirectory


@pytest.fixture()
def signed_run(tmp_path: Path) -> tuple[Path, Path]:
    task = TASK_PRESETS["breastmnist"]
    run = RunDirectory(tmp_path / "run", task=task, config={})
    model = build_model(task)
    run.save_round(model, RoundRecord(0))
    run.save_round(model, RoundRecord(1))
    run.save_final(model, {"sites": {}})
    pub = generate_signing_key(tmp_path / "pki" / "signing.key")
    sign_run(run.root, tmp_path / "pki" / "signing.key")
    return run.root, pub


def test_untouched_run_verifies(signed_run: tuple[Path, Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    run, pub = signed_run
    result = verify_run(run, pub)
    # final model + card, metrics.json, and model.pt + strategy.pt + metrics.json of
    # rounds 0 and 1
    assert result.ok and result.checked == 9
    assert main(["models", "verify", str(run), "--public-key", str(pub)]) == 0
    assert "9 artifacts" in capsys.readouterr().out


def test_tampered_model_fails_naming_the_file(signed_run: tuple[Path, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run, pub = signed_run
    model = run / "final" / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    result = verify_run(run, pub)
    assert not result.ok and result.problems == [
        "final/model.pt: SHA-256 differs from the signed manifest (file changed)"]
    assert main(["models", "verify", str(run), "--public-key", str(pub)]) == ExitCode.AUTH
    assert "final/model.pt" in capsys.readouterr().err


def test_foreign_key_and_edited_manifest_fail(signed_run: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    run, _ = signed_run
    other = generate_signing_key(tmp_path / "other" / "signing.key")
    assert not verify_run(run, other).ok
    manifest = run / "final" / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace('"files"', '"files" ', 1))
    _, pub = signed_run
    assert any("signature" in p for p in verify_run(run, pub).problems)


def _app(tmp_path: Path) -> tuple[Path, Path, Path]:
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pyproject.toml").write_text('[project]\nname = "x"\n')
    (app / "pkg" / "code.py").write_text("print('hello')\n")
    key = tmp_path / "coord" / "signing.key"
    pub = generate_signing_key(key)
    return app, key, pub


def _files(app: Path) -> dict[str, bytes]:
    return {p.relative_to(app).as_posix(): p.read_bytes() for p in app.rglob("*") if p.is_file()}


def test_signed_app_verifies_and_any_change_is_named(tmp_path: Path) -> None:
    app, key, pub = _app(tmp_path)
    with pytest.raises(AuthError, match="not signed"):
        verify_app_files(_files(app), [pub])
    sign_app(app, key)
    files = _files(app)
    assert verify_app_files(files | {FAB_MANIFEST: b"flwr's own"}, [pub])  # key id
    changed = files | {"pkg/code.py": b"import os; os.system('rm -rf /')\n"}
    with pytest.raises(AuthError, match="pkg/code.py: changed after signing"):
        verify_app_files(changed, [pub])
    with pytest.raises(AuthError, match="evil.py: not in the signed app"):
        verify_app_files(files | {"evil.py": b""}, [pub])
    with pytest.raises(AuthError, match="pkg/code.py: signed but missing"):
        verify_app_files({k: v for k, v in files.items() if k != "pkg/code.py"}, [pub])
    doc = json.loads(files[APP_SIGNATURE])
    doc["files"]["pkg/code.py"] = hashlib.sha256(changed["pkg/code.py"]).hexdigest()
    with pytest.raises(AuthError, match="signature does not match"):
        verify_app_files(changed | {APP_SIGNATURE: json.dumps(doc).encode()}, [pub])
    other = generate_signing_key(tmp_path / "other" / "signing.key")
    with pytest.raises(AuthError, match="does not trust"):
        verify_app_files(files, [other])


def test_gate_refuses_before_installing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    app, key, pub = _app(tmp_path)
    sign_app(app, key)
    installed: list[bytes] = []

    def fab(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
        return buf.getvalue()

    install = checked(lambda content, **kw: installed.append(content), [pub])
    good = fab(_files(app))
    install(good, skip_prompt=True)
    assert installed == [good]
    assert "signed by trusted key" in capsys.readouterr().err
    with pytest.raises(AppRefused):
        install(fab(_files(app) | {"pyproject.toml": b"[project]\nname = 'y'\n"}))
    assert installed == [good]  # nothing of the tampered app was installed
    assert "REFUSED app" in capsys.readouterr().err


def test_write_private_ends_0600_even_over_a_world_readable_file(tmp_path: Path) -> None:
    import stat

    from fedpacs.common.signing import write_private

    path = tmp_path / "keys" / "site.key"
    path.parent.mkdir()
    path.write_bytes(b"old")
    path.chmod(0o644)  # e.g. `provision --force` over a key someone made readable
    write_private(path, b"new secret")
    assert path.read_bytes() == b"new secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_private(tmp_path / "keys" / "fresh.key", b"x")
    assert stat.S_IMODE((tmp_path / "keys" / "fresh.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["fresh.key", "site.key"]


def test_verify_manifest_from_bytes(signed_run: tuple[Path, Path], tmp_path: Path) -> None:
    from fedpacs.common.signing import MANIFEST, SIGNATURE, verify_manifest

    run, pub = signed_run
    raw, sig = (run / MANIFEST).read_bytes(), (run / SIGNATURE).read_bytes()
    files = verify_manifest(raw, sig, pub)
    assert files["final/model.pt"] == hashlib.sha256(
        (run / "final" / "model.pt").read_bytes()).hexdigest()
    assert len(files) == 9
    assert verify_manifest(raw, sig + b"\n", pub) == files  # a trailing newline is fine
    edited = raw.replace(b'"files"', b'"files" ', 1)
    with pytest.raises(AuthError, match="signature does not match"):
        verify_manifest(edited, sig, pub)
    other = generate_signing_key(tmp_path / "other" / "signing.key")
    with pytest.raises(AuthError, match="signature does not match"):
        verify_manifest(raw, sig, other)
    with pytest.raises(AuthError, match="base64"):
        verify_manifest(raw, b"not base64!", pub)
    with pytest.raises(AuthError, match="not a readable Ed25519 public key"):
        verify_manifest(raw, sig, tmp_path / "missing.pub")
    # signed by the right key, but not a manifest: refused, not half-read
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(
        (run.parent / "pki" / "signing.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    odd = b'{"format":"other/1","files":{"final/model.pt":"not-a-hash"}}'
    odd_sig = base64.b64encode(key.sign(odd))
    with pytest.raises(AuthError, match="expected format 'fedpacs-manifest/1'"):
        verify_manifest(odd, odd_sig, pub)
