"""End to end with real processes: SuperLink + SuperNodes over TLS with node auth."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import fedpacs
from fedpacs.common.artifacts import sha256_file
from fedpacs.common.datasets import DataSpec, load_holdout, load_site_data
from fedpacs.common.engine import evaluate
from fedpacs.common.tasks import TASK_PRESETS
from fedpacs.deploy.cli import main
from fedpacs.deploy.demo import DemoOptions, run_demo, write_site_configs
from fedpacs.deploy.federation import LocalFederation
from fedpacs.deploy.pki import provision
from fedpacs.server.registry import Registry, RegistryServer, TokenStore

pytestmark = pytest.mark.e2e


def test_federated_run_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    lines: list[str] = []
    res = run_demo(DemoOptions(task="hippocampus", sites=2, rounds=2, local_epochs=1,
                               workdir=tmp_path / "demo", data_dir=data_dir, timeout_s=900),
                   echo=lines.append)
    assert res.status == "finished:completed"
    assert [r["round"] for r in res.rounds] == [0, 1, 2]
    root = data_dir / "msd_hippocampus_udacity"
    task = TASK_PRESETS["hippocampus"]
    site_data = {f"site-{c}": load_site_data(DataSpec("nifti", root, partition=i,
                                                      num_partitions=2), task)
                 for i, c in enumerate("ab")}
    expected = {k: len(d.train) for k, d in site_data.items()}
    # disjoint partitions + the 52 held-out cases cover the 260 cases exactly
    assert sum(len(d.train) + len(d.val) for d in site_data.values()) + 52 == 260
    # both authenticated sites trained every round, each on its own partition
    for r in res.rounds[1:]:
        assert {k: v["num-examples"] for k, v in r["train_sites"].items()} == expected
        assert set(r["evaluate_sites"]) == {"site-a", "site-b"}
    dice = [r["heldout"]["dice-mean"] for r in res.rounds]
    assert dice[0] < dice[1] < dice[2]  # held-out Dice rises round over round
    # per-round checkpoints exist and match their recorded hashes
    for r in range(3):
        ckpt = res.run_dir / "rounds" / f"round-{r:03d}" / "model.pt"
        assert sha256_file(ckpt) == res.rounds[r]["model_sha256"]
    card_file = json.loads((res.run_dir / "final" / "model_card.json").read_text())
    assert card_file["files"]["model.pt"]["sha256"] == sha256_file(res.final_model)
    assert any("round 2/2" in line for line in lines)
    log_dir = tmp_path / "demo" / "logs"
    assert (log_dir / "superlink.log").is_file() and (log_dir / "supernode-site-a.log").is_file()

    # the researcher: pull the finished model with a token, load it, reproduce the Dice
    registry = Registry(tmp_path / "registry")
    registry.publish(res.run_dir, "hippo-e2e")
    tokens = TokenStore(tmp_path / "tokens.json")
    token = tokens.add("researcher")
    with RegistryServer(registry, tokens) as srv:
        assert main(["models", "pull", "hippo-e2e", "--out", str(tmp_path / "pulled"),
                     "--url", srv.url, "--token", token]) == 0
        base = f"{srv.url}/v1/models"
        for url, tok, code in ((base, "not-a-token", 401),
                               (f"{base}/..%2F..%2Ftokens.json/files/model.pt", token, 404),
                               (f"{base}/hippo-e2e/files/..%2F..%2F..%2Ftokens.json", token, 404)):
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tok}"})
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(req, timeout=10)
            assert exc.value.code == code
    model, card = fedpacs.load_model(str(tmp_path / "pulled" / "hippo-e2e" / "model.pt"))
    assert card["sites"] == expected and card["num_rounds"] == 2
    hold = load_holdout(DataSpec("nifti", root), task)
    again = evaluate(model, hold, task=task, device=torch.device("cpu"))
    assert again["dice-mean"] == pytest.approx(res.rounds[-1]["heldout"]["dice-mean"], abs=1e-5)


def test_unregistered_supernode_is_refused(tmp_path: Path, data_dir: Path) -> None:
    pki = provision(tmp_path / "pki", sites=["site-a", "intruder"])
    files = write_site_configs(tmp_path / "sites", task="breastmnist",
                               data=data_dir / "medmnist_breast" / "breastmnist.npz",
                               fmt="medmnist", names=["site-a", "intruder"], threads=1, seed=0)
    with LocalFederation(tmp_path, pki) as fed:
        fed.start_superlink()
        fed.register(pki.site("site-a"))
        fed.start_supernode(pki.site("site-a"), site_config=files[0])
        intruder = fed.start_supernode(pki.site("intruder"), site_config=files[1], max_wait_s=15)
        fed.wait_nodes_online(1)
        deadline = time.monotonic() + 60
        while intruder.running() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not intruder.running() and intruder.popen.returncode != 0
        assert "Failed to activate SuperNode" in intruder.log_path.read_text()
        superlink_log = (tmp_path / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in superlink_log
        nodes = fed.list_nodes()
        assert len(nodes) == 1 and nodes[0]["status"] == "online"
        # control: the same key, once registered, is let in
        fed.register(pki.site("intruder"))
        fed.procs.procs.remove(intruder)
        fed.start_supernode(pki.site("intruder"), site_config=files[1])
        fed.wait_nodes_online(2)
    assert all(not p.running() for p in fed.procs.procs)
