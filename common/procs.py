"""Child processes with log files, deadlines and teardown by process group.

Every wait here has a deadline; every process is started in its own session so that
stopping it also stops what it spawned (SuperExec, ServerApp, ClientApp processes).
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedpacs.common.errors import DeadlineError, ProcessError

FLWR_QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
# How often a SuperExec (the SuperLink's, for ServerApps; a site's, for ClientApps) looks
# for a new task: Flower's default is 1 s, paid on every message exchange.
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_S = 0.1
# OpenMP threads that wait by sleeping, not spinning: a federation runs many processes
# (SuperLink, ServerApp, site daemons) on shared cores, and torch's spinning threads then
# slowed a 0.2 s held-out evaluation in the ServerApp to 4-6 s on a 2-core machine.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def tool(name: str) -> str:
    """Path of a console script installed beside this Python (flower-superlink, flwr, ...)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: quiet, unbuffered, and with this Python's
    scripts first on PATH (the SuperLink and SuperNode start ``flower-superexec`` and
    ``flwr-serverapp``/``flwr-clientapp`` by name, also when no venv is activated)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(FLWR_QUIET_ENV)
    env.setdefault(TASK_POLL_ENV, str(TASK_POLL_S))
    for k, v in OMP_ENV.items():
        env.setdefault(k, v)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# Ports handed out for processes started later come from below the kernel's range for
# outgoing connections (32768-60999 by default): a port from that range, free when chosen,
# can be taken by any outgoing connection before the process that is to listen on it binds
# it (seen as a risk with 30 site daemons starting for minutes).
PORT_RANGE = (20000, 32000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` free now, from :data:`PORT_RANGE`; the OS's choice when none of
    64 random tries is free."""
    for _ in range(64):
        port = random.randint(*PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], *, timeout_s: float,
               interval_s: float = 0.25, alive: Callable[[], None] | None = None) -> None:
    """Poll ``check`` until it is true; raise DeadlineError after ``timeout_s``.

    ``alive`` is called on every poll and may raise (e.g. ProcessError when a child died).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None:
            alive()
        if check():
            return
        if time.monotonic() >= deadline:
            raise DeadlineError(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(interval_s)


def process_parents() -> dict[int, int]:
    """pid -> parent pid of every process now (Linux /proc; one that ends meanwhile is
    left out)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and ")"; the parent pid follows it
        out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None


@dataclass
class ProcessSet:
    """The processes of one local federation; stop_all() tears all of them down."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, env: dict[str, str],
              cwd: Path | None = None) -> Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def check_alive(self, names: list[str] | None = None) -> None:
        for p in self.procs:
            if (names is None or p.name in names) and not p.running():
                raise ProcessError(
                    f"{p.name} (pid {p.pid}) exited with code {p.popen.returncode}; "
                    f"log {p.log_path}:\n{tail(p.log_path)}")

    def stop(self, proc: Proc, *, grace_s: float = 10.0) -> None:
        """Stop one process (and its group) and forget it."""
        stop_group(proc.pid, grace_s=grace_s)
        proc.popen.wait(timeout=grace_s)  # reap it (stop_group waited already)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self, *, grace_s: float = 10.0) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p, grace_s=grace_s)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child is sent ``sig`` when this
    process dies, also by SIGKILL (Linux ``PR_SET_PDEATHSIG``; it survives the child's exec).
    ``None`` (no such guard) on other systems.

    The kernel sends ``sig`` when the *thread* that forked the child exits, so children
    are to be started from the main thread only; anything else raises ProcessError. A
    parent that died before the child set the flag is caught too: the child then sends
    ``sig`` to itself. Everything the child calls is looked up here, before the fork.
    """
    if threading.current_thread() is not threading.main_thread():
        raise ProcessError(
            f"die_with_parent: expected a call from the main thread, got thread "
            f"{threading.current_thread().name!r}. Fix: start children that are to die with "
            "this process from the main thread (PR_SET_PDEATHSIG fires when the thread that "
            "forked them exits)")
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent, signum = os.getpid(), int(sig)

    def preexec() -> None:  # in the child, between fork and exec
        if prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent went before the flag was set
            os.kill(os.getpid(), signum)

    return preexec


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False


def stop_group(pid: int, *, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, wait up to ``grace_s`` for the leader to
    go, then SIGKILL the group (children that outlived their leader go too). Works for
    children of this process and for processes started by an earlier command alike."""
    if pid <= 0:
        return
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
