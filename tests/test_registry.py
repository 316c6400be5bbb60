"""The registry's HTTP API with a real server and client: tokens, 401, 404, signed pulls,
tampering on the registry side, TLS, connection limits, bundle."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
import tracemalloc
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fedpacs
from fedpacs.common.errors import AuthError, ConfigError, ExitCode
from fedpacs.common.hashing import sha256_file
from fedpacs.common.models import build_model
from fedpacs.common.registry_api import RegistryClient, RegistryError, export_bundle
from fedpacs.common.signing import generate_signing_key, sign_run
from fedpacs.common.tasks import TASK_PRESETS
from fedpacs.deploy.cli import main
from fedpacs.server.coordinator.pki import Pki, issue_tls_cert, provision
from fedpacs.server.recorder import RoundRecord
from fedpacs.server.registry import (
    Registry,
    RegistryServer,
    ServeLimits,
    TlsFiles,
    TokenStore,
)
from fedpacs.server.rundir import RunDirectory


@dataclass(frozen=True)
class Published:
    registry: Registry
    tokens: TokenStore
    token: str
    public_key: Path  # the coordinator's artifact-signing.pub, as the researcher pinned it
    run_dir: Path


def _run(root: Path, *, seed: int, sites: dict[str, int]) -> RunDirectory:
    task = TASK_PRESETS["breastmnist"]
    run = RunDirectory(root, task=task, config={"task": "breastmnist"})
    model = build_model(task, seed=seed)
    run.save_round(model, RoundRecord(0, heldout={"accuracy": 0.5}))
    run.save_final(model, {"sites": sites, "num_rounds": 1, "strategy": "fedavg"})
    return run


@pytest.fixture()
def published(tmp_path: Path) -> Published:
    run = _run(tmp_path / "runs" / "r1", seed=5, sites={"a": 10})
    key = tmp_path / "pki" / "artifact-signing.key"
    pub = generate_signing_key(key)
    sign_run(run.root, key)
    reg = Registry(tmp_path / "registry")
    reg.publish(run.root, "breast-v1")
    (tmp_path / "secret.txt").write_text("do not serve")
    tokens = TokenStore(tmp_path / "tokens.json")
    token = tokens.add("alice")
    return Published(reg, tokens, token, pub, run.root)


def _status(url: str, token: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() \
        else []


def test_tokens_are_stored_hashed(published: Published) -> None:
    tokens, token = published.tokens, published.token
    assert token not in tokens.path.read_text()
    assert tokens.who(token) == "alice" and tokens.who(token + "x") is None
    assert tokens.path.stat().st_mode & 0o077 == 0


def test_token_file_is_written_0600_atomically(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{}")
    path.chmod(0o644)  # an older file, world-readable
    tokens = TokenStore(path)
    token = tokens.add("bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tokens.who(token) == "bob"
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.json"]  # no temp file left


def test_api_auth_and_paths(published: Published, tmp_path: Path) -> None:
    p = published
    with RegistryServer(p.registry, p.tokens) as srv:
        base = f"{srv.url}/v1/models"
        token = p.token
        assert _status(base, token) == 200
        assert _status(base, "wrong") == 401 and _status(base, "") == 401
        for name in ("model.pt", "model_card.json", "metrics.json", "MANIFEST.json",
                     "MANIFEST.sig"):
            assert _status(f"{base}/breast-v1/files/{name}", token) == 200, name
            assert _status(f"{base}/breast-v1/files/{name}", "wrong") == 401, name
        for bad in ("/nope", "/breast-v1/files/secret.txt", "/..%2F..%2Fsecret.txt",
                    "/breast-v1/files/..%2F..%2F..%2Fsecret.txt", "/../../secret.txt",
                    "/breast-v1/files/model.pt/x", "/breast-v1/files/MANIFEST",
                    "/breast-v1/files/final%2FMANIFEST.json", "/nope/files/MANIFEST.json",
                    "/breast-v1/files/..%2F..%2Ftokens.json"):
            assert _status(base + bad, token) == 404, bad
        client = RegistryClient(srv.url, token)
        [summary] = client.list()
        assert summary["id"] == "breast-v1" and summary["network"] == "resnet18"
        path = client.pull("breast-v1", tmp_path / "pulled", public_key=p.public_key)
        model, card = fedpacs.load_model(str(path))
        ref = build_model(TASK_PRESETS["breastmnist"], seed=5)
        for k, v in ref.state_dict().items():
            assert torch.equal(v, model.state_dict()[k])
        assert card["sites"] == {"a": 10}
        assert _all_files(tmp_path / "pulled") == [
            "MANIFEST.json", "MANIFEST.sig", "metrics.json", "model.pt", "model_card.json"]
        for name, rel in (("model.pt", "final/model.pt"), ("metrics.json", "metrics.json"),
                          ("model_card.json", "final/model_card.json")):
            assert sha256_file(tmp_path / "pulled" / name) == sha256_file(p.run_dir / rel)
        with pytest.raises(AuthError):
            RegistryClient(srv.url, "wrong").list()
        with pytest.raises(RegistryError):
            client.show("missing")
        with pytest.raises(RegistryError):
            client.pull("missing", tmp_path / "m", public_key=p.public_key)
        with pytest.raises(ConfigError, match="public-key"):  # no pinned key, no opt-out
            client.pull("breast-v1", tmp_path / "nokey")
        with pytest.raises(ConfigError, match="model_id"):
            client.pull("../../etc", tmp_path / "x", public_key=p.public_key)
    assert not (tmp_path / "nokey").exists() and not (tmp_path / "x").exists()


def test_cli_pull_with_bundle(published: Published, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    p = published
    with RegistryServer(p.registry, p.tokens) as srv:
        auth = ["--url", srv.url, "--token", p.token]
        assert main(["models", "list", *auth]) == 0
        assert "breast-v1" in capsys.readouterr().out
        assert main(["models", "list", "--url", srv.url, "--token", "bad"]) == ExitCode.AUTH
        assert main(["models", "pull", "breast-v1", "--out", str(tmp_path / "m"), "--bundle",
                     "--public-key", str(p.public_key), *auth]) == 0
        assert "signature valid" in capsys.readouterr().out
        assert (tmp_path / "m" / "breast-v1" / "bundle" / "configs" / "inference.json").is_file()
        # no pinned key: refused, naming the flag and the variable
        assert main(["models", "pull", "breast-v1", "--out", str(tmp_path / "n"), *auth]) \
            == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert "--public-key" in err and "FEDPACS_REGISTRY_KEY" in err
        assert not (tmp_path / "n").exists()
        # the key from the environment; the explicit opt-out still works (with a warning)
        monkeypatch.setenv("FEDPACS_REGISTRY_KEY", str(p.public_key))
        assert main(["models", "pull", "breast-v1", "--out", str(tmp_path / "e"), *auth]) == 0
        monkeypatch.delenv("FEDPACS_REGISTRY_KEY")
        assert main(["models", "pull", "breast-v1", "--out", str(tmp_path / "i"),
                     "--insecure-no-signature", *auth]) == 0
        assert "not signature-checked" in capsys.readouterr().err
    assert main(["models", "list"]) == ExitCode.CONFIG  # no url/token: names both


def _replace_on_registry(published: Published, tmp_path: Path) -> None:
    """The attacker owns the registry host: a different model, and its card with the
    matching SHA-256, where the published ones were (manifest and signature untouched)."""
    evil = _run(tmp_path / "evil", seed=99, sites={"a": 10, "b": 5000})
    for rel in ("final/model.pt", "final/model_card.json"):
        shutil.copyfile(evil.root / rel, published.run_dir / rel)


def test_model_and_card_replaced_on_the_registry_are_refused(
        published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = published
    out = tmp_path / "models"
    with RegistryServer(p.registry, p.tokens) as srv:
        auth = ["--url", srv.url, "--token", p.token, "--public-key", str(p.public_key)]
        assert main(["models", "pull", "breast-v1", "--out", str(out), *auth]) == 0
        before = {f: sha256_file(out / "breast-v1" / f) for f in _all_files(out / "breast-v1")}
        _replace_on_registry(p, tmp_path)
        # a card-only check is fooled: the replaced card names the replaced model's hash
        client = RegistryClient(srv.url, p.token)
        fooled = client.pull("breast-v1", tmp_path / "fooled", insecure_no_signature=True)
        assert fedpacs.load_model(str(fooled))[1]["sites"] == {"a": 10, "b": 5000}
        # the signed manifest is not: refused, each replaced file named, nothing written
        capsys.readouterr()
        assert main(["models", "pull", "breast-v1", "--out", str(out), *auth]) \
            == ExitCode.AUTH
        err = capsys.readouterr().err
        assert "breast-v1/model.pt: expected SHA-256" in err
        assert "breast-v1/model_card.json: expected SHA-256" in err
        assert "tampered" in err
        assert main(["models", "pull", "breast-v1", "--out", str(tmp_path / "new"), *auth]) \
            == ExitCode.AUTH
        with pytest.raises(AuthError, match="model.pt"):
            client.pull("breast-v1", tmp_path / "lib", public_key=p.public_key)
    # the earlier good pull is untouched, no partial file or staging folder anywhere
    assert {f: sha256_file(out / "breast-v1" / f) for f in _all_files(out / "breast-v1")} \
        == before
    assert _all_files(out) == ["breast-v1", *[f"breast-v1/{f}" for f in sorted(before)]]
    assert _all_files(tmp_path / "new") == [] and not (tmp_path / "lib").exists()
    assert not [f for f in tmp_path.iterdir() if "partial" in f.name]


def test_manifest_resigned_or_removed_on_the_registry_is_refused(
        published: Published, tmp_path: Path) -> None:
    p = published
    _replace_on_registry(p, tmp_path)
    attacker = tmp_path / "attacker" / "signing.key"
    generate_signing_key(attacker)
    sign_run(p.run_dir, attacker)  # a consistent manifest, signed with the wrong key
    with RegistryServer(p.registry, p.tokens) as srv:
        client = RegistryClient(srv.url, p.token)
        with pytest.raises(AuthError, match="MANIFEST.sig: the signature does not match"):
            client.pull("breast-v1", tmp_path / "a", public_key=p.public_key)
        (p.run_dir / "final" / "MANIFEST.sig").unlink()
        with pytest.raises(AuthError, match="expected the run's signed manifest, got none"):
            client.pull("breast-v1", tmp_path / "b", public_key=p.public_key)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pull_streams_files(published: Published, tmp_path: Path) -> None:
    """Neither side holds a whole model in memory: the peak of Python allocations during a
    pull (server thread included) stays far below the model's size."""
    p = published
    big = p.run_dir / "final" / "model.pt"  # 24 MiB, its card and manifest to match
    big.write_bytes(os.urandom(24 << 20))
    card_path = p.run_dir / "final" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["files"]["model.pt"]["sha256"] = sha256_file(big)
    card_path.write_text(json.dumps(card))
    sign_run(p.run_dir, p.public_key.with_suffix(".key"))
    size = big.stat().st_size
    with RegistryServer(p.registry, p.tokens) as srv:
        client = RegistryClient(srv.url, p.token)
        tracemalloc.start()
        try:
            client.pull("breast-v1", tmp_path / "pulled", public_key=p.public_key)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < size // 4, (peak, size)


@pytest.fixture()
def tls(tmp_path: Path) -> tuple[TlsFiles, Path]:
    pki = provision(tmp_path / "coordinator-pki", sites=[])
    cert, key = issue_tls_cert(pki, name="registry", hosts=["127.0.0.1", "localhost"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    return TlsFiles(cert, key), pki.ca_cert


def test_tls_server_and_pinned_ca(published: Published, tls: tuple[TlsFiles, Path],
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    p = published
    files, ca = tls
    other_ca = provision(tmp_path / "other-pki", sites=[]).ca_cert
    with RegistryServer(p.registry, p.tokens, tls=files) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        client = RegistryClient(srv.url, p.token, ca=ca)
        assert [m["id"] for m in client.list()] == ["breast-v1"]
        client.pull("breast-v1", tmp_path / "pulled", public_key=p.public_key)
        for wrong in (other_ca, None):  # another CA, or the system's CAs: not trusted
            with pytest.raises(AuthError, match="does not verify"):
                RegistryClient(srv.url, p.token, ca=wrong).list()
        with pytest.raises(RegistryError):  # plain HTTP to the TLS port
            RegistryClient(srv.url.replace("https", "http"), p.token).list()
        auth = ["--url", srv.url, "--token", p.token]
        assert main(["models", "list", "--ca", str(ca), *auth]) == 0
        assert main(["models", "list", *auth]) == ExitCode.AUTH
        assert "--ca" in capsys.readouterr().err
        monkeypatch.setenv("FEDPACS_REGISTRY_CA", str(ca))
        assert main(["models", "pull", "breast-v1", "--out", str(tmp_path / "m"),
                     "--public-key", str(p.public_key), *auth]) == 0
    # a certificate from the right CA, but for another host name
    elsewhere = TlsFiles(*issue_tls_cert(Pki(ca.parent), name="elsewhere",
                                         hosts=["registry.example.org"]))
    with RegistryServer(p.registry, p.tokens, tls=elsewhere) as srv:
        with pytest.raises(AuthError, match="does not verify"):
            RegistryClient(srv.url, p.token, ca=ca).list()


def test_plain_http_only_on_loopback(published: Published, tls: tuple[TlsFiles, Path],
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = published
    with pytest.raises(ConfigError, match="--tls-cert FILE and --tls-key FILE"):
        RegistryServer(p.registry, p.tokens, host="0.0.0.0")
    root, toks = str(p.registry.root), str(p.tokens.path)
    assert main(["registry", "serve", "--root", root, "--tokens", toks, "--host", "0.0.0.0",
                 "--port", "0"]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "--host" in err and "--tls-cert" in err and "--tls-key" in err
    assert main(["registry", "serve", "--root", root, "--tokens", toks, "--tls-cert",
                 str(tls[0].cert)]) == ExitCode.CONFIG
    assert "--tls-key: expected a PEM file" in capsys.readouterr().err
    assert main(["registry", "serve", "--root", root, "--tokens", toks, "--tls-cert",
                 str(tmp_path / "nope.pem"), "--tls-key", str(tls[0].key)]) == ExitCode.CONFIG
    assert "nope.pem (missing)" in capsys.readouterr().err
    with pytest.raises(AuthError, match="matching private key"):  # cert and key mismatch
        RegistryServer(p.registry, p.tokens, tls=TlsFiles(tls[0].cert, tls[1]))
    # the client does not send its token in clear beyond loopback either
    with pytest.raises(ConfigError, match="https://"):
        RegistryClient("http://10.1.2.3:8470", "t")
    with pytest.raises(ConfigError, match="ca"):
        RegistryClient("http://127.0.0.1:8470", "t", ca=tls[1])


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def test_idle_connection_is_dropped_and_others_are_served(
        published: Published, tls: tuple[TlsFiles, Path]) -> None:
    p = published
    files, ca = tls
    with RegistryServer(p.registry, p.tokens, tls=files,
                        limits=ServeLimits(timeout_s=1.0)) as srv:
        t0 = time.monotonic()
        idle = socket.create_connection(("127.0.0.1", srv.port))  # no TLS hello, nothing
        try:
            # the handshake waits in the connection's own thread: others are served
            assert RegistryClient(srv.url, p.token, ca=ca).list()
            assert _closed_within(idle, 5.0)
            assert time.monotonic() - t0 < 4.0
        finally:
            idle.close()
        assert RegistryClient(srv.url, p.token, ca=ca).list()


def test_slow_and_oversized_requests_are_cut_off(published: Published) -> None:
    p = published
    with RegistryServer(p.registry, p.tokens,
                        limits=ServeLimits(timeout_s=1.0, max_request_bytes=4096)) as srv:
        # slowloris: a header line every 0.2 s never finishes the request
        slow = socket.create_connection(("127.0.0.1", srv.port))
        t0, closed = time.monotonic(), False
        try:
            slow.sendall(b"GET /v1/models HTTP/1.0\r\n")
            while not closed and time.monotonic() - t0 < 5.0:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    closed = True
                    break
                closed = _closed_within(slow, 0.2)
        finally:
            slow.close()
        assert closed and time.monotonic() - t0 < 3.0
        # a request larger than the bound is refused (431, or a reset while still sending)
        big = socket.create_connection(("127.0.0.1", srv.port))
        try:
            big.settimeout(5.0)
            try:
                big.sendall(b"GET /v1/models HTTP/1.0\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n")
                answer = big.recv(64)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
            assert answer == b"" or answer.startswith(b"HTTP/1.0 431"), answer
        finally:
            big.close()
        assert _status(f"{srv.url}/v1/models", p.token) == 200


def test_connections_beyond_the_limit_are_closed(published: Published) -> None:
    p = published
    with RegistryServer(p.registry, p.tokens,
                        limits=ServeLimits(timeout_s=1.0, max_connections=1)) as srv:
        idle = socket.create_connection(("127.0.0.1", srv.port))
        try:
            time.sleep(0.2)  # accepted: it holds the only slot
            with pytest.raises(RegistryError):
                RegistryClient(srv.url, p.token, timeout_s=5).list()
            assert _closed_within(idle, 5.0)
        finally:
            idle.close()
        time.sleep(0.2)
        assert RegistryClient(srv.url, p.token).list()


def test_monai_bundle_rebuilds_the_same_network(published: Published, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    model_path = published.registry.file("breast-v1", "model.pt")
    assert model_path is not None
    out = export_bundle(model_path, tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    ours, _ = fedpacs.load_model(str(model_path))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), ours(x))
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [28, 28]


def test_registry_serves_nothing_outside_a_registered_run(published: Published) -> None:
    """A served name is looked up in a fixed table; a link out of the run is not followed."""
    p = published
    (p.run_dir / "final" / "model_card.json").unlink()
    os.symlink(p.tokens.path, p.run_dir / "final" / "model_card.json")
    assert p.registry.file("breast-v1", "model_card.json") is None
    assert p.registry.file("breast-v1", "MANIFEST.sig") is not None
    assert p.registry.file("breast-v1", "tokens.json") is None


def test_publish_refuses_an_unsigned_run(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "runs" / "unsigned", seed=1, sites={"a": 1})
    root = tmp_path / "registry"
    with pytest.raises(ConfigError, match="final/MANIFEST.json and final/MANIFEST.sig"):
        Registry(root).publish(run.root, "m1")
    assert main(["registry", "publish", str(run.root), "--id", "m1", "--root", str(root)]) \
        == ExitCode.CONFIG
    assert "--allow-unsigned" in capsys.readouterr().err
    assert main(["registry", "publish", str(run.root), "--id", "m1", "--root", str(root),
                 "--allow-unsigned"]) == 0
    assert Registry(root).model_ids() == ["m1"]
