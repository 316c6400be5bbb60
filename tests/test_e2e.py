"""End to end with real processes: SuperLink + SuperNodes over TLS with node auth."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fedpacs
from fedpacs.client.data import load_site_data
from fedpacs.common.artifacts import sha256_file
from fedpacs.common.config import RunConfig
from fedpacs.common.datasets import DataSpec, load_holdout
from fedpacs.common.engine import evaluate
from fedpacs.common.procs import Proc
from fedpacs.common.signing import generate_signing_key, sign_app, verify_run
from fedpacs.common.tasks import TASK_PRESETS
from fedpacs.deploy.cli import main
from fedpacs.deploy.demo import DemoOptions, run_demo, write_site_configs
from fedpacs.server.coordinator.federation import Federation, SiteSpec
from fedpacs.server.coordinator.pki import SiteKeys, create_site_key, provision
from fedpacs.server.registry import Registry, RegistryServer, TokenStore
from fedpacs.server.rundir import read_status

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
    """The demo as the README runs it: 3 sites, SecAgg+, signed app, TLS + node auth."""
    lines: list[str] = []
    scrapes: list[dict[str, dict[str, float]]] = []

    def scrape(record: dict[str, object], urls: dict[str, str]) -> None:
        scrapes.append({name: scrape_metrics(url) for name, url in urls.items()})

    res = run_demo(DemoOptions(task="hippocampus", sites=3, rounds=2, local_epochs=1,
                               workdir=tmp_path / "demo", data_dir=data_dir, timeout_s=1200),
                   echo=lines.append, on_round=scrape)
    assert res.status == "finished:completed"
    assert [r["round"] for r in res.rounds] == [0, 1, 2]
    root = data_dir / "msd_hippocampus_udacity"
    task = TASK_PRESETS["hippocampus"]
    names = ["site-a", "site-b", "site-c"]
    site_data = {name: load_site_data(DataSpec("nifti", root, partition=i, num_partitions=3),
                                      task) for i, name in enumerate(names)}
    expected = {k: len(d.train) for k, d in site_data.items()}
    # disjoint partitions + the 52 held-out cases cover the 260 cases exactly
    assert sum(len(d.train) + len(d.val) for d in site_data.values()) + 52 == 260
    # all three authenticated sites trained every round, each on its own partition, and
    # under SecAgg+ the server got only their masked sum
    for r in res.rounds[1:]:
        assert {k: v["num-examples"] for k, v in r["train_sites"].items()} == expected
        assert set(r["evaluate_sites"]) == set(names)
        assert r["secagg"] == {"sites_summed": 3, "sites_dropped": 0}
    # each site ran only the app the coordinator signed
    for name in names:
        site_log = (tmp_path / "demo" / "logs" / f"supernode-{name}.log").read_text()
        assert "signed by trusted key" in site_log and "REFUSED" not in site_log
    # both metrics endpoints, scraped with a real HTTP client after rounds 0, 1 and 2
    assert len(scrapes) == 3
    server = [s["server"] for s in scrapes]
    assert [s["fedpacs_round"] for s in server] == [0.0, 1.0, 2.0]
    assert server[1]["fedpacs_sites_participating"] == 3 and server[1]["fedpacs_sites_dropped"] == 0
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
    assert card_file["secure_aggregation"] == "SecAgg+"
    # cross-site validation: under SecAgg+ no local model is ever seen, so the global
    # model is validated on every site's data
    cross = card_file["cross_site"]
    assert set(cross) == {"global"} and set(cross["global"]) == set(names)
    for s in names:  # the global row is the last round's evaluation again
        assert cross["global"][s]["dice-mean"] == pytest.approx(
            res.rounds[-1]["evaluate_sites"][s]["val-dice-mean"], abs=1e-6)
    # the artifacts are signed with the coordinator's key, and verify
    check = verify_run(res.run_dir, tmp_path / "demo" / "pki" / "artifact-signing.pub")
    # final model, card, metrics; each of rounds 0..2: model.pt, strategy.pt, metrics.json
    assert check.ok and check.checked == 3 + 3 * 3, check.problems
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
        # checked against the run's manifest, signed by the coordinator's pinned key
        assert main(["models", "pull", "hippo-e2e", "--out", str(tmp_path / "pulled"),
                     "--public-key", str(tmp_path / "demo" / "pki" / "artifact-signing.pub"),
                     "--url", srv.url, "--token", token]) == 0
        assert (tmp_path / "pulled" / "hippo-e2e" / "MANIFEST.sig").is_file()
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


def _refused(proc: Proc, timeout_s: float = 60) -> str:
    """Wait until the SuperLink turned a site's SuperNode away (its daemon keeps trying for
    a minute, as after a kill, then gives up); returns the daemon's log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = proc.log_path.read_text() if proc.log_path.is_file() else ""
        if "Failed to activate SuperNode" in text:
            return text
        assert proc.running() or proc.popen.returncode != 0
        time.sleep(0.5)
    raise AssertionError(f"no refusal within {timeout_s:.0f}s: {proc.log_path}")


def test_unregistered_and_revoked_supernodes_are_refused(tmp_path: Path, data_dir: Path
                                                          ) -> None:
    names = ["site-a", "site-b", "intruder"]
    pki = provision(tmp_path / "pki", sites=names)
    files = dict(zip(names, write_site_configs(
        tmp_path / "sites", task="breastmnist", fmt="medmnist", names=names, threads=1, seed=0,
        data=data_dir / "medmnist_breast" / "breastmnist.npz"), strict=True))
    spec = {n: SiteSpec(n, files[n], "breastmnist") for n in names}
    with Federation.new(tmp_path, pki) as fed:
        fed.start_superlink()
        fed.register(pki.site("site-a"))
        fed.register(pki.site("site-b"))
        site_a = fed.start_site(spec["site-a"])
        started = [site_a, fed.start_site(spec["site-b"])]
        intruder = fed.start_site(spec["intruder"], max_wait_s=15)
        fed.wait_nodes_online(2)
        assert "Failed to activate SuperNode" in _refused(intruder)
        fed.stop_site("intruder")
        superlink_log = (tmp_path / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in superlink_log
        assert sorted(n["status"] for n in fed.list_nodes()) == ["online", "online"]

        # revoke site-b: the SuperLink forgets its key; its old key is refused from now on
        old_key = pki.site("site-b")
        moved = tmp_path / "pki" / "revoked"
        fed.revoke("site-b")
        revoked_dir = next(moved.iterdir())
        old = SiteKeys("site-b", revoked_dir / "site-b.key", revoked_dir / "site-b.pub",
                       old_key.ca_cert)
        fed.procs.log_dir = tmp_path / "logs" / "after-revoke"
        again = fed.start_site(spec["site-b"], keys=old, max_wait_s=15)
        assert "Failed to activate SuperNode" in _refused(again)
        fed.stop_site("site-b")
        online = [n for n in fed.list_nodes() if n["status"] == "online"]
        assert len(online) == 1 and site_a.running()  # site-a untouched

        # rotate: site-b gets a new key, registered; it is let in, site-a never restarted
        new = create_site_key(pki, "site-b")
        assert new.public_key.read_bytes() != (revoked_dir / "site-b.pub").read_bytes()
        fed.register(new)
        started.append(fed.start_site(spec["site-b"], keys=new))
        fed.wait_nodes_online(2)
        assert site_a.running() and fed.state.sites["site-a"].pid == site_a.pid
        # control: the intruder's key, once registered, is let in too
        fed.register(pki.site("intruder"))
        started.append(fed.start_site(spec["intruder"]))
        fed.wait_nodes_online(3)
    assert all(not p.running() for p in started)


def _sign(app: Path, key: Path) -> None:
    sign_app(app, key)


def _wait_finished(fed: Federation, run_id: int, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = fed.flower_status(run_id)
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish in {timeout_s}s")


def test_site_runs_only_apps_signed_by_a_trusted_key(tmp_path: Path, data_dir: Path) -> None:
    pki = provision(tmp_path / "pki", sites=["site-a"])
    (site_file,) = write_site_configs(
        tmp_path / "sites", task="breastmnist", fmt="medmnist", names=["site-a"], threads=1,
        seed=0, data=data_dir / "medmnist_breast" / "breastmnist.npz",
        trusted_keys=[pki.app_pub], require_secagg=False)
    site_log = tmp_path / "logs" / "supernode-site-a.log"

    def run(name: str, prepare: Callable[[Path], None], *, refused: bool = True
            ) -> dict[str, object]:
        cfg = RunConfig(task="breastmnist", rounds=1, local_epochs=1, batch_size=64,
                        min_sites=1, secagg=False, cross_site=False, round_timeout_s=120)
        app, run_dir = fed.prepare_run(cfg)  # written unsigned; `prepare` plays the attacker
        prepare(app)
        status = _wait_finished(fed, fed.submit(app))
        if refused:  # the only site trained nothing: the run fails, publishing nothing
            assert status == "finished:failed"
            st = read_status(run_dir)
            assert (st["state"], st["error"]) == ("failed", "NoUpdateError")
            assert "round 1: 0 site(s) trained" in st["detail"]
            assert not (run_dir / "final").exists()
        else:
            assert status == "finished:completed"
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        return dict(rounds[1])

    def tamper(app: Path) -> None:  # signed, then the round count is edited
        sign_app(app, pki.app_key)
        toml = app / "pyproject.toml"
        toml.write_text(toml.read_text().replace('local-epochs = 1', 'local-epochs = 50'))

    with Federation.new(tmp_path, pki) as fed:
        fed.start_superlink()
        fed.register(pki.site("site-a"))
        fed.start_site(SiteSpec("site-a", site_file, "breastmnist"))
        fed.wait_nodes_online(1)

        unsigned = run("unsigned", lambda app: None)
        assert "train_sites" not in unsigned  # the site trained nothing
        assert "REFUSED app" in site_log.read_text()
        assert "the app is not signed" in site_log.read_text()

        tampered = run("tampered", tamper)
        assert "train_sites" not in tampered
        assert "pyproject.toml: changed after signing" in site_log.read_text()

        other = tmp_path / "other" / "signing.key"
        generate_signing_key(other)
        foreign = run("foreign", lambda app: _sign(app, other))
        assert "train_sites" not in foreign
        assert "which this site does not trust" in site_log.read_text()

        # control: the same app signed by the coordinator's key is run
        signed = run("signed", lambda app: _sign(app, pki.app_key), refused=False)
        sites = signed["train_sites"]
        assert isinstance(sites, dict) and set(sites) == {"site-a"}
        assert site_log.read_text().count("REFUSED app") >= 3


def test_secagg_round_survives_a_site_dropping_out(tmp_path: Path, data_dir: Path) -> None:
    """3 real SuperNodes under SecAgg+; site-c loses its data after the key exchange and
    fails in the middle of the round: the server unmasks the other two from the shares."""
    names = ["site-a", "site-b", "site-c"]
    pki = provision(tmp_path / "pki", sites=names)
    src = data_dir / "medmnist_breast" / "breastmnist.npz"
    files = dict(zip(names, write_site_configs(
        tmp_path / "sites", task="breastmnist", fmt="medmnist", names=names, threads=1, seed=0,
        data=src, trusted_keys=[pki.app_pub]), strict=True))
    doomed = tmp_path / "site-c-data" / "breastmnist.npz"
    doomed.parent.mkdir()
    doomed.write_bytes(src.read_bytes())
    files["site-c"].write_text(files["site-c"].read_text().replace(str(src), str(doomed)))
    cfg = RunConfig(task="breastmnist", rounds=1, local_epochs=1, batch_size=64, min_sites=3,
                    cross_site=False, round_timeout_s=300)
    with Federation.new(tmp_path, pki) as fed:
        fed.start_superlink()
        for name in names:
            fed.register(pki.site(name))
            fed.start_site(SiteSpec(name, files[name], "breastmnist"))
        fed.wait_nodes_online(3)
        # site-c's data file is corrupted: its config still checks out (it joins the key
        # exchange under its SecAgg+ policy), but it cannot train
        doomed.write_bytes(b"not a MedMNIST archive")
        run_id, run_dir = fed.start_run(cfg)
        assert _wait_finished(fed, run_id, 600) == "finished:completed"
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["secagg"] == {"sites_summed": 2, "sites_dropped": 1}
    assert set(rounds[1]["train_sites"]) == {"site-a", "site-b"}
    assert rounds[1]["model_sha256"] != rounds[0]["model_sha256"]  # the model moved on
    site_c = (tmp_path / "logs" / "supernode-site-c.log").read_text()
    assert "breastmnist.npz" in site_c  # the site's own log names the missing file
