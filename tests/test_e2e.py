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
from fedpacs.common.signing import verify_run
from fedpacs.common.tasks import TASK_PRESETS
from fedpacs.deploy.cli import main
from fedpacs.deploy.demo import DemoOptions, run_demo, write_site_configs
from fedpacs.deploy.federation import LocalFederation
from fedpacs.deploy.pki import provision
from fedpacs.server.registry import Registry, RegistryServer, TokenStore

pytestmark = pytest.mark.e2e


def scrape_metrics(url: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{label="v"}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())
                              if k not in ("pid",))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_federated_run_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    lines: list[str] = []
    scrapes: list[dict[str, dict[str, float]]] = []

    def scrape(record: dict[str, object], urls: dict[str, str]) -> None:
        scrapes.append({name: scrape_metrics(url) for name, url in urls.items()})

    res = run_demo(DemoOptions(task="hippocampus", sites=2, rounds=2, local_epochs=1,
                               workdir=tmp_path / "demo", data_dir=data_dir, timeout_s=900),
                   echo=lines.append, on_round=scrape)
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
    # both metrics endpoints, scraped with a real HTTP client after rounds 0, 1 and 2
    assert len(scrapes) == 3
    server = [s["server"] for s in scrapes]
    assert [s["fedpacs_round"] for s in server] == [0.0, 1.0, 2.0]
    assert server[1]["fedpacs_sites_participating"] == 2 and server[1]["fedpacs_sites_dropped"] == 0
    bytes_in = [s["fedpacs_update_bytes_in_total"] for s in server]
    assert 0 < bytes_in[1] < bytes_in[2]
    assert server[1]['fedpacs_heldout_metric{metric="dice-mean"}'] != \
        server[2]['fedpacs_heldout_metric{metric="dice-mean"}']
    assert server[2]["fedpacs_aggregate_train_loss"] < server[1]["fedpacs_aggregate_train_loss"]
    site = [s["site-a"] for s in scrapes]
    assert [s.get("fedpacs_site_rounds_total", 0.0) for s in site] == [0.0, 1.0, 2.0]
    assert site[2]["fedpacs_site_train_samples"] == expected["site-a"]
    assert site[2]["fedpacs_site_last_round"] == 2 and site[2]["fedpacs_site_train_seconds"] > 0
    assert site[2]["fedpacs_site_peak_memory_bytes"] > 50e6
    dice = [r["heldout"]["dice-mean"] for r in res.rounds]
    assert dice[0] < dice[1] < dice[2]  # held-out Dice rises round over round
    # per-round checkpoints exist and match their recorded hashes
    for r in range(3):
        ckpt = res.run_dir / "rounds" / f"round-{r:03d}" / "model.pt"
        assert sha256_file(ckpt) == res.rounds[r]["model_sha256"]
    card_file = json.loads((res.run_dir / "final" / "model_card.json").read_text())
    assert card_file["files"]["model.pt"]["sha256"] == sha256_file(res.final_model)
    # NxN cross-site validation: the global and each local model on each site's data
    cross = card_file["cross_site"]
    assert set(cross) == {"global", "site-a", "site-b"}
    assert all(set(row) == {"site-a", "site-b"} for row in cross.values())
    for s in ("site-a", "site-b"):  # the global row is the last round's evaluation again
        assert cross["global"][s]["dice-mean"] == pytest.approx(
            res.rounds[-1]["evaluate_sites"][s]["val-dice-mean"], abs=1e-6)
        assert 0 < cross[s][s]["dice-mean"] <= 1
    # the artifacts are signed with the coordinator's key, and verify
    check = verify_run(res.run_dir, tmp_path / "demo" / "pki" / "signing.pub")
    assert check.ok and check.checked == 3 + 2 * 3, check.problems
    report = (res.run_dir / "report" / "index.html").read_text()
    assert "cross_site.png" in report and "rounds.png" in report
    for png in ("rounds.png", "sites.png", "cross_site.png"):
        assert (res.run_dir / "report" / png).read_bytes()[:4] == b"\x89PNG"
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
