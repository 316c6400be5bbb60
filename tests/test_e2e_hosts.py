"""Across hosts and through faults: a coordinator and four hospitals, each in its own network
namespace with its own address (tests/netns.py), everything driven through the CLI as the
README tells each role.

* The coordinator provisions (the SuperLink's certificate names its real address), brings
  up its SuperLink with the Fleet API on 10.77.0.1 and the Control API on its own loopback,
  and registers each hospital's public key. Each hospital gets only its own PKI folder.
* Each hospital loads its part of the hippocampus cases into its own Orthanc, ingests them
  with ``fedpacs site ingest`` and runs ``fedpacs site start`` against the fleet address;
  site-d dials through a relay of the test's own (tests/relay.py: no netem here), which
  the test slows down or black-holes.
* Runs are started, watched, stopped and resumed with ``fedpacs run ... --control
  127.0.0.1:PORT --ca ... --runs-dir ...``, from a folder without federation.json.

The tests run in file order on one deployment (module fixture): the SecAgg+ run first,
then one fault scenario per test. Each asserts that nothing is lost: metrics.json holds
every round exactly once and the signed manifest verifies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedpacs.common.errors import DeadlineError
from fedpacs.common.procs import child_env, tool, wait_until
from fedpacs.common.signing import MANIFEST
from fedpacs.server.rundir import read_rounds, read_status
from tests import netns
from tests.relay import relay_argv, write_control

pytestmark = pytest.mark.e2e

FLEET_PORT = 9092  # the SuperLink's Fleet API, on the coordinator's address
CONTROL_PORT = 9093  # its Control + Runtime APIs, on the coordinator's 127.0.0.1 only
RELAY_PORT = 9192  # site-d's way in (the relay, in front of the fleet port)
SITES = ("site-a", "site-b", "site-c", "site-d")
RELAYED = "site-d"
ROUND_TIMEOUT_S = 40  # plain rounds that lose a site wait this long for it
CASES = 12  # hippocampus cases in each hospital's PACS (filling one costs ~60 ms/instance)


@dataclass
class Hospital:
    name: str
    host: netns.Host
    home: Path
    config: Path = Path()
    daemon: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.home / f"daemon-{self.starts}.log"


@dataclass
class Deployment:
    net: netns.Network
    root: Path
    data: Path
    hospitals: dict[str, Hospital] = field(default_factory=dict)
    relay_control: Path = Path()

    # ------------------------------------------------------------ coordinator
    @property
    def coord(self) -> netns.Host:
        return self.net.coordinator

    @property
    def work(self) -> Path:
        return self.root / "coordinator" / "federation"

    @property
    def pki(self) -> Path:
        return self.work / "pki"

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    @property
    def ops(self) -> Path:
        """Where the coordinator's operator types `fedpacs run ...`: no federation.json."""
        path = self.root / "coordinator" / "ops"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def fedpacs(self, *args: str, host: netns.Host | None = None, timeout_s: float = 300,
                expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        res = (host or self.coord).run([tool("fedpacs"), *args], timeout_s=timeout_s,
                                       env=child_env(), cwd=self.ops)
        if expect is not None:
            assert res.returncode == expect, (f"fedpacs {' '.join(args)} exited "
                                              f"{res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def control(self, *, app_key: bool = False) -> list[str]:
        flags = ["--control", f"127.0.0.1:{CONTROL_PORT}", "--ca", str(self.pki / "ca.pem"),
                 "--runs-dir", str(self.runs)]
        if app_key:
            flags += ["--app-key", str(self.pki / "app-signing.key")]
        return flags

    def nodes(self) -> dict[str, dict[str, Any]]:
        """The SuperLink's nodes by site name (asked inside the coordinator's namespace;
        names from the ids `federation register` recorded)."""
        code = ("import json,sys; from pathlib import Path; from fedpacs.server.coordinator."
                "federation import Federation; print(json.dumps(Federation.load(Path("
                f"{str(self.work)!r})).list_nodes()))")
        res = self.coord.run([sys.executable, "-c", code], timeout_s=120, env=child_env())
        assert res.returncode == 0, res.stderr
        nodes = json.loads(res.stdout.strip().splitlines()[-1])
        ids = json.loads((self.work / "state" / "node-ids.json").read_text())
        names = {str(v): k for k, v in ids.items()}
        return {names.get(str(n["node-id"]), str(n["node-id"])): n for n in nodes}

    def online(self) -> set[str]:
        return {name for name, n in self.nodes().items()
                if str(n.get("status", "")).lower() == "online"}

    def wait_online(self, names: set[str], timeout_s: float = 180) -> None:
        wait_until(f"sites {sorted(names)} online", lambda: names <= self.online(),
                   timeout_s=timeout_s, interval_s=2.0)

    def start_run(self, *flags: str) -> tuple[int, Path]:
        res = self.fedpacs("run", "start", *self.control(app_key=True), "--artifact-key",
                           str(self.pki / "artifact-signing.key"), *flags)
        m = re.search(r"run (\d+) started; run directory (\S+)", res.stdout)
        assert m, res.stdout
        return int(m.group(1)), Path(m.group(2))

    def status(self, run_id: int) -> dict[str, Any]:
        res = self.fedpacs("run", "status", str(run_id), *self.control())
        return dict(json.loads(res.stdout[res.stdout.index("{"):]))

    def wait_state(self, run_id: int, states: set[str], timeout_s: float) -> dict[str, Any]:
        """Until the run's status.json state is one of ``states``; a deadline missed names
        the last status seen."""
        seen: dict[str, Any] = {}

        def settled() -> bool:
            seen.clear()
            seen.update(self.status(run_id))
            return seen.get("state") in states

        try:
            wait_until(f"run {run_id} {' or '.join(sorted(states))}", settled,
                       timeout_s=timeout_s, interval_s=3.0)
        except DeadlineError as exc:
            raise AssertionError(f"{exc}; last status: {seen}") from exc
        return seen

    def wait_finished(self, run_id: int, timeout_s: float) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def done() -> bool:
            seen.update(self.status(run_id))
            return str(seen.get("status", "")).startswith("finished")

        wait_until(f"run {run_id} finished", done, timeout_s=timeout_s, interval_s=3.0)
        return seen

    def resume(self, run_dir: Path, rounds: int) -> int:
        """``fedpacs run resume RUN_DIR`` by address, then until the new Flower run
        finished with every round in place; returns the round it continued after."""
        res = self.fedpacs("run", "resume", str(run_dir), *self.control(app_key=True))
        m = re.search(r"run (\d+) started: resumes \S+ after round (\d+)", res.stdout)
        assert m, res.stdout
        st = self.wait_finished(int(m.group(1)), timeout_s=600)
        assert st["status"] == "finished:completed", st
        assert_complete(run_dir, rounds, self.pki)
        return int(m.group(2))

    # ------------------------------------------------------------ hospitals
    def start_daemon(self, h: Hospital) -> None:
        h.starts += 1
        port = RELAY_PORT if h.name == RELAYED else FLEET_PORT
        argv = [tool("fedpacs"), "site", "start", "--config", str(h.config),
                "--superlink", f"{self.coord.address}:{port}",
                "--root-certificates", str(h.home / "pki" / "ca.pem"),
                "--auth-key", str(h.home / "pki" / f"{h.name}.key"),
                "--state-dir", str(h.home / "state"), "--metrics-port", "9100"]
        h.daemon = h.host.popen(argv, h.log, env=child_env())

    def relay(self, **impairment: Any) -> None:
        write_control(self.relay_control, **impairment)


def rounds_of(run_dir: Path) -> list[int]:
    return [int(r["round"]) for r in read_rounds(run_dir)]


def wait_round(run_dir: Path, n: int, timeout_s: float) -> None:
    """Until round ``n``'s record is in metrics.json (round n+1 has then begun)."""
    wait_until(f"round {n} of {run_dir.name}", lambda: n in rounds_of(run_dir),
               timeout_s=timeout_s, interval_s=0.5)


def train_sites(run_dir: Path, n: int) -> set[str]:
    rec = next(r for r in read_rounds(run_dir) if r["round"] == n)
    return set(rec.get("train_sites") or {})


def assert_complete(run_dir: Path, rounds: int, pki: Path) -> None:
    """Nothing lost: every round 0..rounds once, the final model, a manifest that verifies."""
    assert rounds_of(run_dir) == list(range(rounds + 1))
    assert (run_dir / "final" / "model.pt").is_file()
    assert read_status(run_dir)["state"] == "finished"
    res = subprocess.run([tool("fedpacs"), "models", "verify", str(run_dir), "--public-key",
                          str(pki / "artifact-signing.pub")], env=child_env(),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = (run_dir / MANIFEST).read_text()
    for n in range(rounds + 1):  # every round's checkpoint is in the signed manifest
        assert f"rounds/round-{n:03d}/model.pt" in manifest

def pids_in(host: netns.Host, pattern: str) -> list[int]:
    """PIDs of processes in ``host``'s namespace whose command line matches ``pattern``."""
    ip = netns.find_ip()
    assert ip
    out = []
    for pid in netns.namespace_pids(ip, host.namespace):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if re.search(pattern, cmd):
            out.append(pid)
    return out


def https_status(host: netns.Host, url: str, ca: Path) -> str:
    """What a request from ``host`` to ``url`` gets: the HTTP status, or the error."""
    code = ("import ssl,sys,urllib.request,urllib.error\n"
            f"ctx=ssl.create_default_context(cafile={str(ca)!r})\n"
            "try:\n"
            f"  r=urllib.request.urlopen(urllib.request.Request({url!r},data=b'',method='POST'),"
            "context=ctx,timeout=10); print(r.status)\n"
            "except urllib.error.HTTPError as e: print(e.code)\n"
            "except Exception as e: print(type(e).__name__)\n")
    res = host.run([sys.executable, "-c", code], timeout_s=60, env=child_env())
    return res.stdout.strip()


# ---------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, data_dir: Path
        ) -> Iterator[Deployment]:
    netns.require_netns(netns.netns_available(), ci=os.environ.get("CI"))
    root = tmp_path_factory.mktemp("hosts")
    with netns.Network(hospitals=len(SITES)) as net:
        dep = Deployment(net, root, data_dir / "msd_hippocampus_udacity")
        try:
            yield bring_up(dep)
        finally:
            for h in dep.hospitals.values():
                if h.daemon is not None and h.daemon.poll() is None:
                    h.daemon.send_signal(signal.SIGTERM)
            dep.fedpacs("federation", "down", "--workdir", str(dep.work), expect=None)


def bring_up(dep: Deployment) -> Deployment:
    coord = dep.coord
    # the coordinator: PKI whose SuperLink certificate names its address, then the SuperLink
    dep.fedpacs("provision", "init", "--dir", str(dep.pki), *[a for s in SITES
                for a in ("--site", s)], "--host", coord.address)
    dep.fedpacs("federation", "up", "--workdir", str(dep.work), "--sites", "0",
                "--fleet-address", f"{coord.address}:{FLEET_PORT}",
                "--control-port", str(CONTROL_PORT))
    for name in SITES:
        dep.fedpacs("federation", "register", name, "--workdir", str(dep.work),
                    "--public-key", str(dep.pki / "sites" / name / f"{name}.pub"))
    # site-d's link: a relay in the coordinator's namespace, on the coordinator's address
    dep.relay_control = dep.root / "relay.json"
    write_control(dep.relay_control)
    coord.popen(relay_argv((coord.address, RELAY_PORT), (coord.address, FLEET_PORT),
                           dep.relay_control), dep.root / "relay.log")
    netns.wait_connectable(coord, coord.address, RELAY_PORT, timeout_s=30)
    # each hospital: only its own PKI folder; its PACS, ingest, then its daemon
    setups = {}
    for i, (name, host) in enumerate(zip(SITES, dep.net.hospitals, strict=True)):
        home = dep.root / name
        (home / "pki").mkdir(parents=True)
        for f in (dep.pki / "sites" / name).iterdir():
            (home / "pki" / f.name).write_bytes(f.read_bytes())
        trusted = next(p for p in (home / "pki").iterdir() if p.suffix == ".pub"
                       and "app" in p.name)
        h = Hospital(name, host, home)
        dep.hospitals[name] = h
        setups[name] = host.popen(
            [sys.executable, "-m", "tests.hospital", "--home", str(home), "--name", name,
             "--data-root", str(dep.data), "--partition", str(i), "--num-partitions",
             str(len(SITES)), "--trusted-app-key", str(trusted), "--max-cases", str(CASES)],
            home / "setup.log", env=child_env(), cwd=Path(__file__).resolve().parents[1])
    for name, proc in setups.items():
        h = dep.hospitals[name]
        assert proc.wait(timeout=900) == 0, (h.home / "setup.log").read_text()[-3000:]
        summary = json.loads((h.home / "setup.log").read_text().strip().splitlines()[-1])
        h.config = Path(summary["config"])
        dep.start_daemon(h)
    dep.wait_online(set(SITES), timeout_s=300)
    return dep


# ---------------------------------------------------------------------------- tests
def test_hospitals_reach_the_fleet_api_but_never_the_control_api(fed: Deployment) -> None:
    coord, ca = fed.coord.address, fed.hospitals["site-a"].home / "pki" / "ca.pem"
    hosp = fed.net.hospitals[0]
    assert hosp.can_connect(coord, FLEET_PORT) is True
    assert hosp.can_connect(coord, CONTROL_PORT) == "refused"  # bound to 127.0.0.1 there
    # through the fleet port, only the Fleet API answers: Control and Runtime are refused
    assert https_status(hosp, f"https://{coord}:{FLEET_PORT}/v1/control/list-runs",
                        ca) in {"403", "404"}
    assert https_status(hosp, f"https://{coord}:{FLEET_PORT}/v1/runtime/get-run",
                        ca) in {"403", "404"}
    # the coordinator's own loopback does reach the Control API
    assert fed.coord.can_connect("127.0.0.1", CONTROL_PORT) is True


def test_secagg_hippocampus_run_across_hosts(fed: Deployment) -> None:
    run_id, run_dir = fed.start_run("--task", "hippocampus", "--rounds", "2", "--min-sites",
                                    "4", "--secagg", "--eval-root", str(fed.data))
    st = fed.wait_finished(run_id, timeout_s=600)
    assert st["status"] == "finished:completed", st
    assert_complete(run_dir, 2, fed.pki)
    for r in read_rounds(run_dir)[1:]:
        assert r["secagg"]["sites_summed"] == 4 and r["secagg"]["sites_dropped"] == 0
        assert set(r["evaluate_sites"]) == set(SITES)
    dice = [r["heldout"]["dice-mean"] for r in read_rounds(run_dir)]
    assert dice[-1] > dice[0] + 0.05, dice  # the federation learnt from what the PACS held
    logs = fed.fedpacs("run", "logs", str(run_id), *fed.control()).stdout
    assert re.search(r"\(2, [0-9.]+\)", logs), logs[-2000:]  # round 2 in the run's history


def test_plain_run_through_link_cut_slow_link_and_supernode_kill(fed: Deployment) -> None:
    """Round 2: site-a's link is cut; round 3: it is back. Round 4: site-d's relay
    black-holes its traffic. Round 5: site-b's SuperNode is killed (kill -9), its daemon
    restarts it. Every round completes with the sites left; the run finishes."""
    rounds = 6
    run_id, run_dir = fed.start_run("--task", "hippocampus", "--rounds", str(rounds),
                                    "--min-sites", "3", "--no-secagg", "--round-timeout",
                                    str(ROUND_TIMEOUT_S))
    a, b = fed.net.hospitals[0], fed.hospitals["site-b"]
    wait_round(run_dir, 1, timeout_s=300)
    a.cut()
    wait_round(run_dir, 2, timeout_s=300)
    a.restore()
    assert train_sites(run_dir, 2) == {"site-b", "site-c", "site-d"}
    wait_round(run_dir, 3, timeout_s=300)
    fed.relay(blackhole=True)
    wait_round(run_dir, 4, timeout_s=300)
    fed.relay(blackhole=False, reset=1)
    assert RELAYED not in train_sites(run_dir, 4)
    assert b.daemon is not None
    supernodes = pids_in(b.host, r"fedpacs\.client\.supernode")
    assert supernodes, "site-b's SuperNode is not running"
    os.kill(supernodes[0], signal.SIGKILL)
    wait_round(run_dir, 5, timeout_s=300)
    assert "site-b" not in train_sites(run_dir, 5)
    st = fed.wait_finished(run_id, timeout_s=600)
    assert st["status"] == "finished:completed", st
    assert_complete(run_dir, rounds, fed.pki)
    # every round closed with the sites it still had (a round that lost one counts it as
    # dropped); the cut site rejoined once its link was back; site-b's daemon lived on
    for n in range(1, rounds + 1):
        rec = next(r for r in read_rounds(run_dir) if r["round"] == n)
        assert len(train_sites(run_dir, n)) + rec.get("dropped", 0) >= 3
    assert any("site-a" in train_sites(run_dir, n) for n in range(3, rounds + 1))
    assert b.daemon.poll() is None
    assert "restarted the site's SuperNode" in b.log.read_text()
    fed.wait_online(set(SITES), timeout_s=180)


def test_secagg_round_survives_a_cut_link(fed: Deployment) -> None:
    run_id, run_dir = fed.start_run("--task", "hippocampus", "--rounds", "2", "--min-sites",
                                    "3", "--secagg", "--round-timeout", str(ROUND_TIMEOUT_S))
    c = fed.net.hospitals[2]
    wait_round(run_dir, 0, timeout_s=300)
    time.sleep(4.0)  # the key exchange of round 1 is done: site-c drops while training
    c.cut()
    wait_round(run_dir, 1, timeout_s=300)
    c.restore()
    st = fed.wait_finished(run_id, timeout_s=600)
    assert st["status"] == "finished:completed", st
    assert_complete(run_dir, 2, fed.pki)
    first, second = (r["secagg"] for r in read_rounds(run_dir)[1:])
    assert first["sites_summed"] >= 3 and first["sites_summed"] + first["sites_dropped"] <= 4
    assert first["sites_summed"] < 4 or first["sites_dropped"] == 0
    # the next round sums every site that finished its key exchange, site-c rejoining or not
    assert second["sites_summed"] >= 3
    fed.wait_online(set(SITES), timeout_s=180)


def test_serverapp_killed_then_run_resume_continues(fed: Deployment) -> None:
    rounds = 4
    run_id, run_dir = fed.start_run("--task", "hippocampus", "--rounds", str(rounds),
                                    "--min-sites", "4", "--no-secagg", "--strategy", "fedadam")
    wait_round(run_dir, 2, timeout_s=300)
    serverapps = pids_in(fed.coord, r"flwr-serverapp")
    assert serverapps
    for pid in serverapps:
        os.kill(pid, signal.SIGKILL)
    # the run's status is not left at "running"
    fed.wait_state(run_id, {"failed", "interrupted"}, timeout_s=180)
    assert fed.resume(run_dir, rounds) >= 2


def test_superlink_killed_and_restarted_on_its_database(fed: Deployment) -> None:
    before = {n: v.get("node-id") for n, v in fed.nodes().items()}
    rounds = 3
    run_id, run_dir = fed.start_run("--task", "hippocampus", "--rounds", str(rounds),
                                    "--min-sites", "4", "--no-secagg")
    wait_round(run_dir, 1, timeout_s=300)
    state = json.loads((fed.work / "federation.json").read_text())
    os.kill(int(state["superlink_pid"]), signal.SIGKILL)
    time.sleep(2.0)
    fed.fedpacs("federation", "restart-superlink", "--workdir", str(fed.work))
    fed.wait_online(set(SITES), timeout_s=240)  # the same keys: no re-registration
    assert {n: v.get("node-id") for n, v in fed.nodes().items()} == before
    fed.wait_state(run_id, {"failed", "interrupted"}, timeout_s=240)
    assert fed.resume(run_dir, rounds) >= 1


def test_site_daemon_killed_and_restarted_rejoins_without_registration(
        fed: Deployment) -> None:
    """site-c's daemon is killed (kill -9) and started again: the same node, no
    re-registration. Then a run stopped with `run stop` by address is resumed."""
    c = fed.hospitals["site-c"]
    node = fed.nodes()["site-c"]
    assert c.daemon is not None
    c.daemon.kill()  # kill -9 the daemon: its SuperNode and SuperExec go with it
    c.daemon.wait(timeout=30)
    wait_until("site-c's processes gone", lambda: not pids_in(c.host, r"fedpacs"),
               timeout_s=30)
    fed.start_daemon(c)
    # the SuperLink reads a killed node as online until its heartbeat lapses (a message sent
    # to it after that, before the new SuperNode comes, gets Flower's "node unavailable"
    # reply and the site misses that round): wait for the new SuperNode's own activation
    wait_until("site-c's new SuperNode activated",
               lambda: fed.nodes()["site-c"].get("online-at") != node.get("online-at"),
               timeout_s=240, interval_s=2.0)
    fed.wait_online(set(SITES), timeout_s=240)
    assert fed.nodes()["site-c"].get("node-id") == node.get("node-id")
    # a run stopped by address reads interrupted, and resumes with all four sites
    # (5 rounds: `run stop` lands while the run still trains, however fast the rounds)
    run_id, run_dir = fed.start_run("--task", "hippocampus", "--rounds", "5", "--min-sites",
                                    "4", "--no-secagg")
    wait_round(run_dir, 1, timeout_s=300)
    fed.fedpacs("run", "stop", str(run_id), *fed.control())
    fed.wait_state(run_id, {"interrupted"}, timeout_s=120)
    # a site may still be finishing the stopped run's message; its late reply is refused
    # ("Run is finished"). Flower's SuperNode pushed that reply in the cycle of the resumed
    # run's first message and then held the new reply back until the round timed out: the
    # site's SuperNode now pushes a reply left waiting at its next idle pull
    # (fedpacs.client.supernode.push_pending_replies). Here the resume still waits for the
    # sites to be idle, as an operator would.
    wait_until("the sites done with the stopped run's messages",
               lambda: not any(pids_in(h.host, r"flwr-clientapp")
                               for h in fed.hospitals.values()),
               timeout_s=300, interval_s=2.0)
    assert fed.resume(run_dir, 5) >= 1
    for n in range(1, 6):
        assert train_sites(run_dir, n) == set(SITES), read_rounds(run_dir)[n]

