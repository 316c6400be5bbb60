"""Signed artifacts: a tampered model file or a foreign key fails verification."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpacs.common.errors import ExitCode
from fedpacs.common.models import build_model
from fedpacs.common.signing import generate_signing_key, sign_run, verify_run
from fedpacs.common.tasks import TASK_PRESETS
from fedpacs.deploy.cli import main
from fedpacs.server.rundir import RunDirectory


@pytest.fixture()
def signed_run(tmp_path: Path) -> tuple[Path, Path]:
    task = TASK_PRESETS["breastmnist"]
    run = RunDirectory(tmp_path / "run", task=task, config={})
    model = build_model(task)
    run.save_round(0, model, {})
    run.save_round(1, model, {})
    run.save_final(model, {"sites": {}})
    pub = generate_signing_key(tmp_path / "pki" / "signing.key")
    sign_run(run.root, tmp_path / "pki" / "signing.key")
    return run.root, pub


def test_untouched_run_verifies(signed_run: tuple[Path, Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    run, pub = signed_run
    result = verify_run(run, pub)
    # final model + card, metrics.json, and model.pt + metrics.json of rounds 0 and 1
    assert result.ok and result.checked == 7
    assert main(["models", "verify", str(run), "--public-key", str(pub)]) == 0
    assert "7 artifacts" in capsys.readouterr().out


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
