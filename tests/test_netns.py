"""Test hosts (network namespaces on a bridge) and the delaying/dropping TCP relay."""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from fedpacs.common.procs import wait_until
from tests import netns
from tests.netns import Host, Network, list_namespaces, wait_connectable
from tests.relay import ControlError, Impairment, RelayThread, relay_argv, write_control

NetworkFactory = Callable[..., Network]
PORT = 7000  # inside fresh namespaces every port is free
RELAY_PORT = 7100

# A TCP echo server, run inside a namespace: python -c ECHO ADDRESS PORT
ECHO = """
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
print("listening", flush=True)
def serve(c):
    with c:
        while d := c.recv(65536):
            c.sendall(d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# One exchange with an echo server: python -c CLIENT ADDRESS PORT MESSAGE -> "SECONDS REPLY"
CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
msg = sys.argv[3].encode()
start = time.monotonic()
s.sendall(msg)
out = b""
while len(out) < len(msg) and (d := s.recv(65536)):
    out += d
print(f"{time.monotonic() - start:.4f} {out.decode()}")
"""


def start_echo(host: Host, address: str, log: Path) -> subprocess.Popen[bytes]:
    proc = host.popen([sys.executable, "-c", ECHO, address, str(PORT)], log)
    wait_until(f"echo server on {host.name} {address}:{PORT}",
               lambda: "listening" in log.read_text(), timeout_s=20, interval_s=0.05,
               alive=lambda: _alive(proc, log))
    return proc


def _alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is not None:
        raise AssertionError(f"exited with {proc.returncode}: {log.read_text()}")


def exchange(host: Host, address: str, port: int, message: str) -> tuple[float, str]:
    out = host.run([sys.executable, "-c", CLIENT, address, str(port), message], timeout_s=30)
    assert out.returncode == 0, out.stderr
    seconds, _, reply = out.stdout.strip().partition(" ")
    return float(seconds), reply


# -- namespaces -------------------------------------------------------------------------


def test_hosts_reach_each_other_by_address(network_factory: NetworkFactory,
                                           tmp_path: Path) -> None:
    net = network_factory(2)
    assert net.coordinator.address == "10.77.0.1"
    assert [h.address for h in net.hospitals] == ["10.77.0.11", "10.77.0.12"]
    assert [h.name for h in net.hospitals] == ["hospital1", "hospital2"]
    assert len(set(net.namespaces)) == 4
    assert all(ns.startswith(f"{netns.DEFAULT_PREFIX}-{os.getpid()}-") for ns in net.namespaces)

    start_echo(net.coordinator, "0.0.0.0", tmp_path / "echo.log")
    for hospital in net.hospitals:
        assert exchange(hospital, "10.77.0.1", PORT, f"hi-{hospital.name}")[1] == \
            f"hi-{hospital.name}"
    # hospital to hospital too
    start_echo(net["hospital2"], "10.77.0.12", tmp_path / "echo2.log")
    assert exchange(net["hospital1"], "10.77.0.12", PORT, "peer")[1] == "peer"


def test_venv_and_fedpacs_resolve_inside_a_namespace(network_factory: NetworkFactory) -> None:
    host = network_factory(0).coordinator
    out = host.run(["sh", "-c", "command -v fedpacs; command -v python"], timeout_s=30)
    bindir = str(Path(sys.executable).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{bindir}/fedpacs", f"{bindir}/python"]
    out = host.run(["python", "-c", "import fedpacs, sys; print(sys.prefix)"], timeout_s=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == sys.prefix


def test_loopback_port_is_refused_from_a_hospital(network_factory: NetworkFactory,
                                                  tmp_path: Path) -> None:
    net = network_factory(1)
    start_echo(net.coordinator, "127.0.0.1", tmp_path / "echo.log")
    assert net.coordinator.can_connect("127.0.0.1", PORT) is True
    hospital = net.hospitals[0]
    assert hospital.can_connect("10.77.0.1", PORT) == "refused"
    assert hospital.can_connect("127.0.0.1", PORT) == "refused"  # its own loopback


def test_cut_times_out_and_restore_reconnects(network_factory: NetworkFactory,
                                              tmp_path: Path) -> None:
    net = network_factory(1)
    hospital = net.hospitals[0]
    start_echo(net.coordinator, "0.0.0.0", tmp_path / "echo-c.log")
    start_echo(hospital, "0.0.0.0", tmp_path / "echo-h.log")
    assert net.coordinator.can_connect(hospital.address, PORT) is True
    assert hospital.can_connect("10.77.0.1", PORT) is True

    hospital.cut()  # ip link set eth0 down, in the hospital
    assert net.coordinator.can_connect(hospital.address, PORT, timeout_s=0.5) == "timeout"
    assert hospital.can_connect("10.77.0.1", PORT, timeout_s=0.5) == "unreachable"
    hospital.restore()
    wait_connectable(hospital, "10.77.0.1", PORT, timeout_s=10)
    wait_connectable(net.coordinator, hospital.address, PORT, timeout_s=10)

    hospital.cut("switch")  # the path dies; the hospital keeps its address and routes
    assert net.coordinator.can_connect(hospital.address, PORT, timeout_s=0.5) == "timeout"
    assert hospital.can_connect("10.77.0.1", PORT, timeout_s=0.5) == "timeout"
    hospital.restore()
    wait_connectable(hospital, "10.77.0.1", PORT, timeout_s=10)


def test_names_resolve_only_inside_the_network(network_factory: NetworkFactory) -> None:
    net = network_factory(1, resolve_names=True)
    script = "import socket; print(socket.gethostbyname('coordinator'))"
    out = net.hospitals[0].run([sys.executable, "-c", script], timeout_s=30)
    assert out.stdout.strip() == "10.77.0.1", out.stderr
    hosts_dir = netns.ETC_NETNS / net.hospitals[0].namespace
    assert (hosts_dir / "hosts").read_text() == net.hosts_text()
    net.close()
    assert not hosts_dir.exists()


def test_exit_kills_processes_and_deletes_namespaces(netns_ok: None, tmp_path: Path) -> None:
    ip = netns.find_ip()
    assert ip is not None
    with Network(1, prefix="fptclean") as net:
        names = net.namespaces
        assert set(names) <= set(list_namespaces(ip))
        sleeper = net.hospitals[0].popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                         tmp_path / "sleep.log")
        wait_until("sleeper in its namespace",
                   lambda: sleeper.pid in netns.namespace_pids(ip, net.hospitals[0].namespace),
                   timeout_s=10, interval_s=0.05)
    assert sleeper.poll() is not None
    assert not set(names) & set(list_namespaces(ip))


def test_leftover_of_a_crashed_run_is_removed(netns_ok: None, tmp_path: Path) -> None:
    ip = netns.find_ip()
    assert ip is not None
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    leftover = f"fptstale-{dead.pid}-beef-coordinator"
    subprocess.run([ip, "netns", "add", leftover], check=True, timeout=10)
    orphan = subprocess.Popen([ip, "netns", "exec", leftover, "sleep", "600"],
                              start_new_session=True)
    try:
        with Network(0, prefix="fptstale") as net:
            assert leftover not in list_namespaces(ip)
            assert net.coordinator.namespace in list_namespaces(ip)
        orphan.wait(timeout=10)  # killed with its namespace
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(timeout=10)
        if leftover in list_namespaces(ip):
            netns.delete_namespace(ip, leftover)


def test_relay_process_in_the_coordinator_namespace(network_factory: NetworkFactory,
                                                    tmp_path: Path) -> None:
    """The relay as it runs end to end: on the coordinator's address in front of a port
    that only listens on the coordinator's loopback; a hospital reaches it only through
    the relay, which adds its delay."""
    net = network_factory(1)
    coordinator, hospital = net.coordinator, net.hospitals[0]
    start_echo(coordinator, "127.0.0.1", tmp_path / "echo.log")
    control = tmp_path / "relay.json"
    write_control(control, delay_s=0.1)
    log = tmp_path / "relay.log"
    relay = coordinator.popen(
        relay_argv(("10.77.0.1", RELAY_PORT), ("127.0.0.1", PORT), control), log)
    wait_until("relay listening", lambda: "listening" in log.read_text(), timeout_s=20,
               interval_s=0.05, alive=lambda: _alive(relay, log))
    seconds, reply = exchange(hospital, "10.77.0.1", RELAY_PORT, "via-relay")
    assert reply == "via-relay"
    assert seconds >= 0.2  # 0.1 s each way
    assert hospital.can_connect("10.77.0.1", PORT) == "refused"  # no way around the relay
    relay.send_signal(signal.SIGTERM)
    relay.wait(timeout=10)
    assert "stopped; connections=1 " in log.read_text()


# -- the CI rule ------------------------------------------------------------------------


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception),
                                             (None, pytest.skip.Exception),
                                             ("", pytest.skip.Exception)])
def test_unavailable_namespaces_fail_under_ci_and_skip_otherwise(
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, ci: str | None,
        outcome: type[BaseException]) -> None:
    monkeypatch.setattr(netns, "netns_available", lambda: "no namespaces on this test box")
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no namespaces on this test box"):
        request.getfixturevalue("netns_ok")


def test_available_namespaces_neither_fail_nor_skip() -> None:
    for ci in ("true", None):
        try:
            netns.require_netns(None, ci=ci)
        except pytest.skip.Exception as exc:  # (a skip would not fail this test by itself)
            raise AssertionError(f"skipped although namespaces work: {exc}") from exc


# -- the relay, in-process ----------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.connections = 0
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", int(self.server_address[1])

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()
        self._thread.join(timeout=10)
        self.server_close()


@pytest.fixture()
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture()
def control(tmp_path: Path) -> Path:
    return tmp_path / "relay.json"


def relay_at(echo: EchoServer, control: Path) -> RelayThread:
    return RelayThread(("127.0.0.1", 0), echo.address, control, poll_s=0.05, seed=1)


def set_control(relay: RelayThread, control: Path, **changes: Any) -> None:
    written = write_control(control, **changes)
    wait_until(f"relay applying {written}", lambda: relay.impairment() == written,
               timeout_s=10, interval_s=0.02)


def connect(relay: RelayThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", relay.port), timeout=10)


def recv_exactly(sock: socket.socket, n: int, timeout_s: float = 10.0) -> bytes:
    sock.settimeout(timeout_s)
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def silent(sock: socket.socket, timeout_s: float = 0.3) -> bool:
    """Nothing arrives on ``sock`` for ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return True
    raise AssertionError(f"expected silence, received {data!r}")


def test_relay_forwards_bytes_exactly(echo: EchoServer, control: Path) -> None:
    payload = os.urandom(2 * 1024 * 1024 + 17)
    with relay_at(echo, control) as relay, connect(relay) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        received = recv_exactly(sock, len(payload))
        sender.join(timeout=10)
        assert received == payload
        wait_until("relay counting every byte",
                   lambda: relay.stats().bytes_down == len(payload), timeout_s=10,
                   interval_s=0.02)
        assert relay.stats().bytes_up == len(payload)
        assert relay.stats().connections == 1
        sock.shutdown(socket.SHUT_WR)  # the half-close is forwarded: the echo ends too
        assert sock.recv(1) == b""


def test_relay_delay_adds_latency_each_way(echo: EchoServer, control: Path) -> None:
    write_control(control, delay_s=0.15)
    with relay_at(echo, control) as relay, connect(relay) as sock:
        start = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert time.monotonic() - start >= 0.3  # at least 2 x delay_s; no upper bound


def test_relay_rate_caps_bandwidth(echo: EchoServer, control: Path) -> None:
    write_control(control, rate_bps=200_000)  # 25 kB/s
    payload = os.urandom(5000)  # 0.2 s each way at that rate
    with relay_at(echo, control) as relay, connect(relay) as sock:
        start = time.monotonic()
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        assert time.monotonic() - start >= 0.4


def test_relay_blackhole_stops_and_resumes(echo: EchoServer, control: Path) -> None:
    with relay_at(echo, control) as relay, connect(relay) as old:
        old.sendall(b"a")
        assert recv_exactly(old, 1) == b"a"
        set_control(relay, control, blackhole=True)
        old.sendall(b"held")
        assert silent(old)
        with connect(relay) as new:  # accepted, then nothing
            new.sendall(b"new")
            assert silent(new)
            assert echo.connections == 1  # the target never saw it
            set_control(relay, control, blackhole=False)
            assert recv_exactly(old, 4) == b"held"  # held bytes go on, in order
            assert recv_exactly(new, 3) == b"new"
        with connect(relay) as later:
            later.sendall(b"later")
            assert recv_exactly(later, 5) == b"later"
        assert echo.connections == 3


def test_relay_drop_blackholes_new_connections(echo: EchoServer, control: Path) -> None:
    write_control(control, drop=1.0)
    with relay_at(echo, control) as relay, connect(relay) as dropped:
        dropped.sendall(b"lost")
        assert silent(dropped)
        assert relay.stats().dropped == 1
        assert echo.connections == 0
        set_control(relay, control, drop=0.0)
        with connect(relay) as fine:
            fine.sendall(b"fine")
            assert recv_exactly(fine, 4) == b"fine"
        dropped.sendall(b"still lost")
        assert silent(dropped)  # a dropped connection stays dead


def test_relay_reset_closes_existing_connections_once(echo: EchoServer, control: Path) -> None:
    with relay_at(echo, control) as relay, connect(relay) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        set_control(relay, control, reset=1)
        sock.settimeout(10)
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        assert relay.stats().resets == 1
        with connect(relay) as again:  # the file still says reset=1: nothing more happens
            time.sleep(0.15)
            again.sendall(b"y")
            assert recv_exactly(again, 1) == b"y"
        assert relay.stats().resets == 1


def test_relay_control_errors_name_each_field(control: Path) -> None:
    with pytest.raises(ControlError) as e:
        Impairment.from_dict({"delay": 1, "drop": 2, "blackhole": "yes"})
    text = str(e.value)
    assert "delay: unknown key" in text
    assert "drop: expected a number in [0.0, 1.0], got 2" in text
    assert "blackhole: expected true or false, got 'yes'" in text
    with pytest.raises(ControlError):
        write_control(control, delay_s=-1.0)
    assert not control.exists()


def test_netns_available_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "find_ip", lambda: None)
    assert "make system-deps" in (netns.netns_available() or "")
    monkeypatch.setattr(netns, "find_ip", lambda: "/usr/sbin/ip")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root (running as uid 1000)" in (netns.netns_available() or "")
