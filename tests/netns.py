"""Test hosts as Linux network namespaces: a coordinator and hospitals on one switch.

A :class:`Network` builds, for one test, a *switch* namespace holding a Linux bridge and
one namespace per host (``coordinator`` at ``.1``, ``hospital1``, ``hospital2``, ... at
``.11``, ``.12``, ... of one /24, 10.77.0.0/24 by default). Each host has ``lo`` up and one
veth, ``eth0``, whose peer is a port of the bridge. Nothing in the root namespace is
touched: every interface is created directly inside its namespace.

Namespace names are ``{prefix}-{pid}-{token}-{host}``: parallel test processes (and
several networks in one process) never collide, and a leftover of a crashed run (its pid
no longer alive) is removed when the next :class:`Network` with the same prefix starts.

Run a process on a host with :meth:`Host.popen`/:meth:`Host.run`, or put
:meth:`Host.argv` in front of an argv for a process started elsewhere (e.g.
``ProcessSet.start``); the environment (``PATH`` with this venv's scripts first, so
``fedpacs`` and ``python`` resolve to this venv) is kept across ``ip netns exec``.

Name resolution: /etc/hosts is shared with the machine and is never edited. Tests use
addresses; ``Network(..., resolve_names=True)`` additionally gives each namespace its own
hosts file through iproute2's ``/etc/netns/NAME/hosts`` (bind-mounted over /etc/hosts for
processes started with ``ip netns exec``), removed again on exit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import pytest

from fedpacs.common.errors import DeadlineError
from fedpacs.common.procs import child_env, process_alive, wait_until

DEFAULT_PREFIX = "fpt"
DEFAULT_SUBNET = "10.77.0.0/24"
COORDINATOR = "coordinator"
BRIDGE = "br0"
HOST_IF = "eth0"
ETC_NETNS = Path("/etc/netns")
# Host offsets in the subnet: the coordinator at .1, hospital i at .(10 + i).
COORDINATOR_OFFSET = 1
HOSPITAL_OFFSET = 10
IP_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0

# Run inside a namespace by Host.can_connect: one TCP connect, its outcome on stdout.
_CONNECT_SCRIPT = """
import errno, socket, sys
host, port, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    socket.create_connection((host, port), timeout=timeout_s).close()
    print("ok")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as e:
    if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        print("unreachable")
    else:
        print(errno.errorcode.get(e.errno or 0, str(e)))
"""


class NetnsError(RuntimeError):
    """An `ip` command failed while building or tearing down test namespaces."""


def find_ip() -> str | None:
    """Path of iproute2's ``ip`` (also in /usr/sbin or /sbin when those are not on PATH)."""
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")


def _ip(ip: str, *args: str, timeout_s: float = IP_TIMEOUT_S) -> str:
    cmd = [ip, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f}s") from e
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}: "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def netns_available(prefix: str = DEFAULT_PREFIX) -> str | None:
    """None when this process can create a network namespace with a bridge in it;
    otherwise why not (and the fix)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux; this is {sys.platform}"
    ip = find_ip()
    if ip is None:
        return "`ip` (iproute2) is not installed; run `make system-deps`"
    if os.geteuid() != 0:
        return (f"creating network namespaces needs root (running as uid {os.geteuid()}); "
                "run the tests as root or in a container with CAP_SYS_ADMIN and CAP_NET_ADMIN")
    probe = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}-probe"
    try:
        _ip(ip, "netns", "add", probe)
    except NetnsError as e:
        return f"cannot create a network namespace: {e}"
    try:
        _ip(ip, "-n", probe, "link", "add", BRIDGE, "type", "bridge")
    except NetnsError as e:
        return f"cannot create a bridge in a network namespace: {e}"
    finally:
        _ip(ip, "netns", "del", probe)
    return None


def require_netns(reason: str | None, *, ci: str | None) -> None:
    """What a test needing namespaces does when they are unavailable (``reason`` is not
    None): fail under CI=true, so that a CI machine without them is noticed, else skip."""
    if reason is None:
        return
    message = f"network namespaces are unavailable: {reason}"
    if (ci or "").strip().lower() == "true":
        pytest.fail(f"{message} (CI=true: tests that need network namespaces fail rather "
                    "than skip)", pytrace=False)
    pytest.skip(message)


def list_namespaces(ip: str) -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in _ip(ip, "netns", "list").splitlines() if line.strip()]


def namespace_pids(ip: str, namespace: str) -> list[int]:
    """Live processes in ``namespace`` (zombies count as gone)."""
    try:
        out = _ip(ip, "netns", "pids", namespace)
    except NetnsError:
        return []  # the namespace is gone already
    return [pid for pid in map(int, out.split()) if process_alive(pid)]


def kill_namespace_processes(ip: str, namespaces: Sequence[str], *,
                             grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process in ``namespaces``, wait up to ``grace_s``, then SIGKILL the
    rest and wait for them to go."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        pids = [pid for ns in namespaces for pid in namespace_pids(ip, ns)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            wait_until(f"processes {pids} in namespaces {list(namespaces)} to exit",
                       lambda pids=pids: not any(map(process_alive, pids)),
                       timeout_s=wait_s, interval_s=0.05)
        except DeadlineError:
            if sig == signal.SIGKILL:
                raise


def delete_namespace(ip: str, namespace: str) -> None:
    """Kill what runs in ``namespace``, delete it and its /etc/netns entry."""
    kill_namespace_processes(ip, [namespace])
    if namespace in list_namespaces(ip):
        _ip(ip, "netns", "del", namespace)
    shutil.rmtree(ETC_NETNS / namespace, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (another network's), or gone
        ETC_NETNS.rmdir()


def write_hosts_file(namespace: str, text: str, *, tries: int = 3) -> Path:
    """``/etc/netns/NAMESPACE/hosts``: what processes started with ``ip netns exec`` in
    that namespace see as /etc/hosts (the machine's /etc/hosts is not touched)."""
    path = ETC_NETNS / namespace / "hosts"
    for attempt in range(tries):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except FileNotFoundError:  # another network removed the empty /etc/netns just now
            if attempt == tries - 1:
                raise
    return path


def remove_stale(ip: str, prefix: str) -> list[str]:
    """Delete namespaces named ``{prefix}-{pid}-...`` whose pid no longer runs (left by a
    crashed or killed test run); returns their names."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    stale = [ns for ns in list_namespaces(ip)
             if (m := pattern.match(ns)) and int(m.group(1)) != os.getpid()
             and not process_alive(int(m.group(1)))]
    for ns in stale:
        delete_namespace(ip, ns)
    return stale


@dataclass(frozen=True)
class Host:
    """One test host: a network namespace with one address on the test network."""

    name: str
    namespace: str
    address: str
    ip: str = field(repr=False)  # path of iproute2's `ip`
    switch_namespace: str = field(repr=False)
    switch_port: str = field(repr=False)  # this host's port on the bridge
    interface: str = HOST_IF
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False,
                                                 compare=False)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside this host's namespace."""
        return [self.ip, "netns", "exec", self.namespace, *cmd]

    def popen(self, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
              *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in this namespace, in a session (process group) of its own, with
        stdout and stderr appended to ``log_path``. ``env`` is the whole environment
        (default: :func:`fedpacs.common.procs.child_env`); this venv's scripts are put
        first on its PATH. The Network kills it on exit if it still runs."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(self.argv(cmd), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=venv_env(env), cwd=cwd,
                                     start_new_session=True)
        self.procs.append(popen)
        return popen

    def run(self, cmd: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None,
            *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in this namespace to completion (text output captured; the exit
        code is not checked). Raises subprocess.TimeoutExpired after ``timeout_s``."""
        return subprocess.run(self.argv(cmd), capture_output=True, text=True,
                              timeout=timeout_s, env=venv_env(env), cwd=cwd,
                              stdin=subprocess.DEVNULL)

    def cut(self, where: Literal["host", "switch"] = "host") -> None:
        """Cut this host's link. ``host``: ``ip link set eth0 down`` in the host (its own
        connects then fail at once as "unreachable"; connects to it time out).
        ``switch``: its bridge port goes down (the host keeps its address and routes;
        connects both ways time out, as on a dead path)."""
        if where == "host":
            _ip(self.ip, "-n", self.namespace, "link", "set", self.interface, "down")
        else:
            _ip(self.ip, "-n", self.switch_namespace, "link", "set", self.switch_port, "down")

    def restore(self) -> None:
        """Bring the link back up (both ends, whichever :meth:`cut` took down)."""
        _ip(self.ip, "-n", self.switch_namespace, "link", "set", self.switch_port, "up")
        _ip(self.ip, "-n", self.namespace, "link", "set", self.interface, "up")

    def can_connect(self, address: str, port: int, timeout_s: float = 1.0) -> Literal[True] | str:
        """Try one TCP connect to ``address:port`` from inside this namespace: True, or
        why not: "refused", "timeout", "unreachable" (no route / host unreachable) or the
        errno name."""
        script = [sys.executable, "-I", "-S", "-c", _CONNECT_SCRIPT,
                  address, str(port), str(timeout_s)]
        proc = self.run(script, timeout_s=timeout_s + 30)
        outcome = proc.stdout.strip()
        if proc.returncode != 0 or not outcome:
            raise NetnsError(f"connect probe in {self.namespace} failed with exit code "
                             f"{proc.returncode}: {proc.stderr.strip()}")
        return True if outcome == "ok" else outcome


def venv_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: fedpacs's child environment) with this Python's scripts
    directory first on PATH, so that ``fedpacs``, ``python`` and Flower's scripts resolve
    to this venv inside a namespace too."""
    out = dict(env) if env is not None else child_env()
    bindir = str(Path(sys.executable).parent)
    path = out.get("PATH", os.defpath)
    if path.split(os.pathsep)[0] != bindir:
        out["PATH"] = bindir + os.pathsep + path
    return out


class Network:
    """A coordinator and ``hospitals`` hospitals on one bridged /24, as a context manager.

    >>> with Network(2) as net:
    ...     net.coordinator.address, [h.address for h in net.hospitals]
    ('10.77.0.1', ['10.77.0.11', '10.77.0.12'])
    """

    def __init__(self, hospitals: int = 2, *, prefix: str = DEFAULT_PREFIX,
                 subnet: str = DEFAULT_SUBNET, resolve_names: bool = False) -> None:
        net = ipaddress.ip_network(subnet)
        if not 0 <= hospitals <= net.num_addresses - HOSPITAL_OFFSET - 2:
            raise ValueError(f"hospitals: expected 0..{net.num_addresses - HOSPITAL_OFFSET - 2}"
                             f" for subnet {subnet}, got {hospitals}; use a larger subnet")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", prefix):
            raise ValueError(f"prefix: expected letters and digits, got {prefix!r}")
        ip = find_ip()
        if ip is None:
            raise NetnsError("`ip` (iproute2) is not installed; run `make system-deps`")
        self.ip = ip
        self.prefix = prefix
        self.prefixlen = net.prefixlen
        self.resolve_names = resolve_names
        base = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.switch_namespace = f"{base}-switch"
        names = [COORDINATOR] + [f"hospital{i}" for i in range(1, hospitals + 1)]
        offsets = [COORDINATOR_OFFSET] + [HOSPITAL_OFFSET + i for i in range(1, hospitals + 1)]
        self.hosts: dict[str, Host] = {
            name: Host(name=name, namespace=f"{base}-{name}", address=str(net[offset]),
                       ip=ip, switch_namespace=self.switch_namespace, switch_port=f"p{i}")
            for i, (name, offset) in enumerate(zip(names, offsets, strict=True))}
        self._created: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def coordinator(self) -> Host:
        return self.hosts[COORDINATOR]

    @property
    def hospitals(self) -> list[Host]:
        return [h for name, h in self.hosts.items() if name != COORDINATOR]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this network (hosts and switch)."""
        return [self.switch_namespace] + [h.namespace for h in self.hosts.values()]

    def hosts_text(self) -> str:
        """The network's names in /etc/hosts format (with localhost)."""
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{h.address} {h.name}" for h in self.hosts.values()]
        return "\n".join(lines) + "\n"

    def __enter__(self) -> Network:
        remove_stale(self.ip, self.prefix)
        with ExitStack() as undo:
            undo.callback(self.close)
            self._build()
            undo.pop_all()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _ip(self.ip, "netns", "add", name)
        self._created.append(name)

    def _build(self) -> None:
        ip, sw = self.ip, self.switch_namespace
        self._add_namespace(sw)
        _ip(ip, "-n", sw, "link", "add", BRIDGE, "type", "bridge")
        _ip(ip, "-n", sw, "link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            ns = host.namespace
            self._add_namespace(ns)
            # Both ends are created inside their namespaces: no name in the root namespace.
            _ip(ip, "link", "add", host.interface, "netns", ns, "type", "veth",
                "peer", "name", host.switch_port, "netns", sw)
            _ip(ip, "-n", sw, "link", "set", host.switch_port, "master", BRIDGE, "up")
            _ip(ip, "-n", ns, "link", "set", "lo", "up")
            _ip(ip, "-n", ns, "addr", "add", f"{host.address}/{self.prefixlen}",
                "dev", host.interface)
            _ip(ip, "-n", ns, "link", "set", host.interface, "up")
            if self.resolve_names:
                write_hosts_file(ns, self.hosts_text())

    def close(self, *, grace_s: float = STOP_GRACE_S) -> None:
        """Kill every process in this network's namespaces and delete them (idempotent)."""
        created = list(self._created)
        kill_namespace_processes(self.ip, created, grace_s=grace_s)
        for host in self.hosts.values():
            for popen in host.procs:
                popen.wait(timeout=grace_s)  # reap: killed above, or exited before
            host.procs.clear()
        errors: list[str] = []
        for ns in reversed(created):
            try:
                delete_namespace(self.ip, ns)
            except NetnsError as e:
                errors.append(str(e))
                continue
            self._created.remove(ns)
        if errors:
            raise NetnsError("could not delete test namespaces:\n  " + "\n  ".join(errors)
                             + f"\nremove them with `ip netns del NAME` (prefix {self.prefix})")


def wait_connectable(host: Host, address: str, port: int, *, timeout_s: float = 15.0) -> None:
    """Wait until ``host`` can open a TCP connection to ``address:port``."""
    wait_until(f"{address}:{port} accepting connections from {host.name}",
               lambda: host.can_connect(address, port, timeout_s=0.5) is True,
               timeout_s=timeout_s, interval_s=0.05)
