"""Warm sites through faults, with real processes: SuperLink + 3 site daemons over TLS.

A message process killed mid-round drops its site from that round only; a warm parent
killed between rounds is restarted by the site daemon, and the site serves the next
round meanwhile (cold). Nothing is waited for beyond Flower's own rule for a ClientApp
that stopped responding (no heartbeat for two intervals: about a minute).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from fedpacs.common.config import RunConfig
from fedpacs.common.procs import wait_until
from fedpacs.deploy.demo import write_site_configs
from fedpacs.server.coordinator.federation import Federation, SiteSpec
from fedpacs.server.coordinator.pki import provision
from fedpacs.server.rundir import read_rounds

pytestmark = pytest.mark.e2e


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def warm_parent(daemon_pid: int) -> int:
    found = [p for p in children(daemon_pid) if "fedpacs.client.warm" in cmdline(p)]
    return found[0] if found else 0


def test_a_killed_message_process_drops_its_site_for_one_round_and_a_killed_warm_parent_is_restarted(  # noqa: E501
        tmp_path: Path, data_dir: Path) -> None:
    names = ["site-a", "site-b", "site-c"]
    pki = provision(tmp_path / "pki", sites=names)
    files = write_site_configs(
        tmp_path / "sites", task="breastmnist", fmt="medmnist", names=names, threads=1, seed=0,
        data=data_dir / "medmnist_breast" / "breastmnist.npz", trusted_keys=[pki.app_pub],
        require_secagg=False)
    cfg = RunConfig(task="breastmnist", rounds=3, local_epochs=5, batch_size=64, min_sites=2,
                    secagg=False, cross_site=False, round_timeout_s=300)
    with Federation.new(tmp_path, pki) as fed:
        fed.start_superlink()
        daemons = {}
        for name, path in zip(names, files, strict=True):
            fed.register(pki.site(name))
            daemons[name] = fed.start_site(SiteSpec(name, path, "breastmnist")).pid
        fed.wait_nodes_online(3)
        parents = {}
        for name, pid in daemons.items():
            wait_until(f"{name}'s warm parent", lambda p=pid: warm_parent(p) > 0, timeout_s=60)
            parents[name] = warm_parent(pid)
        run_id, run_dir = fed.start_run(cfg)

        # round 1: site-a's message process is killed while it trains (its evaluation of
        # the incoming model is logged first); Flower answers for it once its heartbeat
        # has stopped for two intervals, and the round closes with the other two
        log_a = tmp_path / "logs" / "supernode-site-a.log"
        wait_until("site-a training round 1", lambda: "round 1: evaluated on" in
                   log_a.read_text(), timeout_s=180, interval_s=0.05)
        killed = children(parents["site-a"])
        assert killed
        for child in killed:
            os.kill(child, signal.SIGKILL)
        wait_until("round 1", lambda: len(read_rounds(run_dir)) >= 2, timeout_s=400)

        # between rounds: site-b's warm parent itself is killed; the daemon restarts it
        os.kill(parents["site-b"], signal.SIGKILL)
        deadline = time.monotonic() + 600
        while fed.flower_status(run_id).split(":")[0] != "finished":
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(2)
        assert fed.flower_status(run_id) == "finished:completed"
        restarted = warm_parent(daemons["site-b"])
        assert restarted not in (0, parents["site-b"])

    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert set(rounds[1]["train_sites"]) == {"site-b", "site-c"}  # site-a dropped, once
    for r in rounds[2:]:
        assert set(r["train_sites"]) == set(names)  # site-a back; site-b served (cold or warm)
    log_b = (tmp_path / "logs" / "supernode-site-b.log").read_text()
    assert "warm parent" in log_b and "restarting it" in log_b
    assert "ended with signal 9" in log_a.read_text()
