"""End to end, as an attack on the app gate, with real processes: a SuperLink (TLS, node
authentication), a site daemon (``fedpacs site start``) and, beside it, a stock Flower
SuperNode. The coordinator submits an UNSIGNED bundle whose only component is
``agentapp = "evil:app"``; ``evil.py`` writes a marker file when it is imported and when
its main runs, naming the processes it runs under. The stock SuperNode runs it (the attack
is real on Flower 1.41); the fedpacs site runs none of it, answers at once, says why in its
log, and still runs a signed fedpacs app afterwards."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from fedpacs.common.config import RunConfig
from fedpacs.common.errors import ProcessError
from fedpacs.common.procs import free_port, tool
from fedpacs.common.signing import sign_app
from fedpacs.deploy.demo import write_site_configs
from fedpacs.server.coordinator.federation import CONNECTION, Federation, SiteSpec
from fedpacs.server.coordinator.pki import provision

pytestmark = pytest.mark.e2e

EVIL_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil"
version = "1.0.0"
description = "not a fedpacs app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
agentapp = "evil:app"
"""

EVIL_PY = '''"""Imported anywhere: leaves a marker naming the processes it runs under."""
import json, os, sys
from pathlib import Path
from flwr.agentapp import AgentApp

MARKERS = Path({markers!r})


def mark(what, **extra):
    chain, pid = [], os.getpid()
    while pid > 1:
        chain.append(pid)
        status = Path(f"/proc/{{pid}}/status").read_text()
        pid = int(next(l for l in status.splitlines() if l.startswith("PPid:")).split()[1])
    (MARKERS / f"{{what}}-{{os.getpid()}}.json").write_text(json.dumps(
        {{"argv": sys.argv, "ancestors": chain, **extra}}))


mark("imported")
app = AgentApp()


def call(agent, name, **arguments):
    out = agent.grid.call({{"name": name, "call_id": name, "arguments": arguments}})
    return json.loads(out["output"])


@app.main()
def main(agent, context):
    try:
        nodes = call(agent, "get_nodes")["nodes"]
    except ValueError:  # at a SuperNode: only the coordinator's grid lists nodes
        mark("main")
        call(agent, "push_reply_message", payload="evil.py ran here")
        return
    sent = call(agent, "push_messages",
                messages=[{{"dst_node_id": n["id"], "payload": "run me"}} for n in nodes])
    ids = [r["message_id"] for r in sent["results"]]
    replies = call(agent, "pull_messages", message_ids=ids, timeout=90)
    mark("main", nodes=nodes, replies=replies)
'''


def _evil_app(folder: Path, markers: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(EVIL_PYPROJECT, encoding="utf-8")
    (folder / "evil.py").write_text(EVIL_PY.format(markers=str(markers)), encoding="utf-8")
    return folder


def _submit_with_prompt(fed: Federation, app: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """What ``flwr chat`` does (and anyone at the Control API can): a local bundle with a
    user prompt, which ``flwr run`` cannot send."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.chat.chat_app import start_chat_run
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    monkeypatch.setenv("FLWR_HOME", str(fed.flwr_home))
    client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
    try:
        with warnings.catch_warnings():  # flwr's pathspec call is deprecated (third party)
            warnings.simplefilter("ignore", DeprecationWarning)
            fab = build_fab_from_disk(app)
        run_id, _ = start_chat_run(client, "run evil.py everywhere", None, None,
                                   fab_hash=hashlib.sha256(fab).hexdigest(), fab_content=fab)
    finally:
        client.close()
    return int(run_id)


def _wait_finished(fed: Federation, run_id: int, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fed.check_alive()
        status = fed.flower_status(run_id)
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish in {timeout_s}s")


def _markers(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) | {"what": p.name.split("-")[0]}
            for p in sorted(folder.glob("*.json"))]


def _under(markers: list[dict[str, Any]], pid: int) -> set[str]:
    """What of evil.py ran in a process below ``pid``: {"imported", "main"}."""
    return {m["what"] for m in markers if pid in m["ancestors"]}


def test_unsigned_agentapp_bundle_runs_nowhere_at_a_fedpacs_site(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = provision(tmp_path / "pki", sites=["site-a", "stock"])
    (site_file,) = write_site_configs(
        tmp_path / "sites", task="breastmnist", fmt="medmnist", names=["site-a"], threads=1,
        seed=0, data=data_dir / "medmnist_breast" / "breastmnist.npz",
        trusted_keys=[pki.app_pub], require_secagg=False)
    site_log = tmp_path / "logs" / "supernode-site-a.log"
    markers = tmp_path / "markers"
    markers.mkdir()
    evil = _evil_app(tmp_path / "evil-app", markers)

    with Federation.new(tmp_path, pki) as fed:
        superlink = fed.start_superlink()
        ids = {name: fed.register(pki.site(name)) for name in ("site-a", "stock")}
        site = fed.start_site(SiteSpec("site-a", site_file, "breastmnist"))
        stock = fed.procs.start("supernode-stock", [
            tool("flower-supernode"), "--superlink", fed.address,
            "--root-certificates", str(pki.ca_cert),
            "--auth-supernode-private-key", str(pki.site("stock").private_key),
            "--port", str(free_port())], env=fed.env() | {"FLWR_HOME": str(tmp_path / "stock")})
        fed.wait_nodes_online(2)

        # `flwr run` cannot start an AgentApp bundle: the SuperLink wants a user prompt
        with pytest.raises(ProcessError, match="user prompt is required"):
            fed.submit(evil)
        assert _markers(markers) == []

        # with a prompt (as `flwr chat` sends it) the SuperLink runs it and sends a message
        # of the AgentApp run to every node
        run_id = _submit_with_prompt(fed, evil, monkeypatch)
        assert _wait_finished(fed, run_id) == "finished:completed"
        found = _markers(markers)
        assert _under(found, superlink.pid) == {"imported", "main"}  # the payload is live
        assert _under(found, stock.pid) == {"imported", "main"}  # a stock SuperNode runs it
        assert _under(found, site.pid) == set()  # the fedpacs site: nothing, not an import
        (coordinator,) = [m for m in found if m["what"] == "main" and "replies" in m]
        assert {n["id"] for n in coordinator["nodes"]} == {str(i) for i in ids.values()}
        replies = {r["src_node_id"]: r for r in coordinator["replies"]["messages"]}
        assert coordinator["replies"]["pending_message_ids"] == []  # both answered
        assert replies[str(ids["stock"])]["payload"] == "evil.py ran here"
        assert replies[str(ids["site-a"])]["error"]  # the site answered at once: refused
        log = site_log.read_text()
        assert "REFUSED task" in log and "asked it to run a 'flwr-agentapp' task" in log
        assert not (fed.workdir / "site-state" / "site-a" / "flwr-home" / "apps").exists()

        # the stock node leaves; the site still runs a signed fedpacs app
        fed.revoke("stock")
        fed.procs.stop(stock)
        cfg = RunConfig(task="breastmnist", rounds=1, local_epochs=1, batch_size=64,
                        min_sites=1, secagg=False, cross_site=False, round_timeout_s=120)
        app, run_dir = fed.prepare_run(cfg)
        sign_app(app, pki.app_key)
        assert _wait_finished(fed, fed.submit(app)) == "finished:completed"
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        assert set(rounds[1]["train_sites"]) == {"site-a"}
        assert "signed by trusted key" in site_log.read_text()
        assert _under(_markers(markers), site.pid) == set()
