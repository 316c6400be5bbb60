"""The registry's HTTP API with a real server and client: tokens, 401, 404, pull, bundle."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import fedpacs
from fedpacs.common.errors import AuthError, ExitCode
from fedpacs.common.models import build_model
from fedpacs.common.registry_api import RegistryClient, RegistryError, export_bundle
from fedpacs.common.tasks import TASK_PRESETS
from fedpacs.deploy.cli import main
from fedpacs.server.recorder import RoundRecord
from fedpacs.server.registry import Registry, RegistryServer, TokenStore
from fedpacs.server.rundir import RunDirectory


@pytest.fixture()
def registry(tmp_path: Path) -> tuple[Registry, TokenStore, str]:
    task = TASK_PRESETS["breastmnist"]
    run = RunDirectory(tmp_path / "runs" / "r1", task=task, config={"task": "breastmnist"})
    model = build_model(task, seed=5)
    run.save_round(model, RoundRecord(0, heldout={"accuracy": 0.5}))
    run.save_final(model, {"sites": {"a": 10}, "num_rounds": 1, "strategy": "fedavg"})
    reg = Registry(tmp_path / "registry")
    reg.publish(run.root, "breast-v1")
    (tmp_path / "secret.txt").write_text("do not serve")
    tokens = TokenStore(tmp_path / "tokens.json")
    token = tokens.add("alice")
    return reg, tokens, token


def _status(url: str, token: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_tokens_are_stored_hashed(registry: tuple[Registry, TokenStore, str]) -> None:
    _, tokens, token = registry
    assert token not in tokens.path.read_text()
    assert tokens.who(token) == "alice" and tokens.who(token + "x") is None
    assert tokens.path.stat().st_mode & 0o077 == 0


def test_api_auth_and_paths(registry: tuple[Registry, TokenStore, str], tmp_path: Path) -> None:
    reg, tokens, token = registry
    with RegistryServer(reg, tokens) as srv:
        base = f"{srv.url}/v1/models"
        assert _status(base, token) == 200
        assert _status(base, "wrong") == 401 and _status(base, "") == 401
        assert _status(f"{base}/breast-v1/files/model.pt", token) == 200
        for bad in ("/nope", "/breast-v1/files/secret.txt", "/..%2F..%2Fsecret.txt",
                    "/breast-v1/files/..%2F..%2F..%2Fsecret.txt", "/../../secret.txt",
                    "/breast-v1/files/model.pt/x"):
            assert _status(base + bad, token) == 404, bad
        client = RegistryClient(srv.url, token)
        [summary] = client.list()
        assert summary["id"] == "breast-v1" and summary["network"] == "resnet18"
        path = client.pull("breast-v1", tmp_path / "pulled")
        model, card = fedpacs.load_model(str(path))
        ref = build_model(TASK_PRESETS["breastmnist"], seed=5)
        for k, v in ref.state_dict().items():
            assert torch.equal(v, model.state_dict()[k])
        assert card["sites"] == {"a": 10}
        with pytest.raises(AuthError):
            RegistryClient(srv.url, "wrong").list()
        with pytest.raises(RegistryError):
            client.show("missing")


def test_cli_pull_with_bundle(registry: tuple[Registry, TokenStore, str], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    reg, tokens, token = registry
    with RegistryServer(reg, tokens) as srv:
        assert main(["models", "list", "--url", srv.url, "--token", token]) == 0
        assert "breast-v1" in capsys.readouterr().out
        assert main(["models", "list", "--url", srv.url, "--token", "bad"]) == ExitCode.AUTH
        assert main(["models", "pull", "breast-v1", "--out", str(tmp_path / "m"), "--bundle",
                     "--url", srv.url, "--token", token]) == 0
    assert main(["models", "list"]) == ExitCode.CONFIG  # no url/token: names both


def test_monai_bundle_rebuilds_the_same_network(registry: tuple[Registry, TokenStore, str],
                                                tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    reg, _, _ = registry
    model_path = reg.file("breast-v1", "model.pt")
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
