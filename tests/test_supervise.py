"""The site daemon supervises its processes (fedpacs.client.daemon): real processes, but
stand-ins (``python -c "time.sleep"``) for the SuperNode, the SuperExec and the warm parent,
injected through :class:`SiteCommands`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedpacs.client.daemon import (
    REJOIN_S,
    RestartPolicy,
    SiteCommands,
    Supervisor,
    SupervisorPolicy,
    exit_text,
    spawn,
)
from fedpacs.client.metrics import ProcessState, SiteProcessCollector
from fedpacs.common.errors import ProcessError
from fedpacs.common.procs import die_with_parent, free_port, process_alive, wait_until
from fedpacs.common.telemetry import MULTIPROC_ENV, serve_multiprocess

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
FAST = RestartPolicy(pauses_s=(0.2, 0.8), stable_s=60.0, give_up_after=3)
POLICY = SupervisorPolicy(supernode=RestartPolicy(pauses_s=(0.2, 0.8), give_up_after=3,
                                                  rejoin_s=30.0),
                          superexec=FAST, warm=RestartPolicy(pauses_s=(0.2, 0.8)), grace_s=5.0)
Start = Callable[[], subprocess.Popen[bytes]]


def sleeper() -> subprocess.Popen[bytes]:
    return spawn(SLEEP, dict(os.environ))


def exiting(code: int) -> Start:
    return lambda: spawn([sys.executable, "-c", f"raise SystemExit({code})"], dict(os.environ))


def in_turn(*starts: Start) -> Start:
    """Each call the next of ``starts``; the last one from then on."""
    calls: list[int] = []

    def start() -> subprocess.Popen[bytes]:
        calls.append(1)
        return starts[min(len(calls), len(starts)) - 1]()

    return start


@contextmanager
def supervised(commands: SiteCommands, policy: SupervisorPolicy = POLICY
               ) -> Iterator[Supervisor]:
    sup = Supervisor(commands, policy)
    try:
        yield sup
    finally:
        sup.stop_all()


def until(sup: Supervisor, what: str, check: Callable[[], bool], timeout_s: float = 20) -> None:
    """Step the supervisor (as its loop does, more often) until ``check``."""
    def stepped() -> bool:
        sup.step(time.monotonic())
        return check()

    wait_until(what, stepped, timeout_s=timeout_s, interval_s=0.02)


def test_a_killed_supernode_is_restarted_with_its_superexec(
        caplog: pytest.LogCaptureFixture) -> None:
    served: list[int] = []  # the SuperNode pid each SuperExec was started for

    def superexec(pid: int) -> subprocess.Popen[bytes]:
        served.append(pid)
        return sleeper()

    caplog.set_level(logging.INFO, logger="fedpacs.site")
    with supervised(SiteCommands(supernode=sleeper, superexec=superexec)) as sup:
        sup.step(time.monotonic())
        node, execr = sup.supernode.proc, sup.superexec.proc
        assert node is not None and execr is not None and served == [node.pid]
        os.kill(node.pid, signal.SIGKILL)
        until(sup, "the SuperNode's exit", lambda: sup.supernode.proc is None)
        # the SuperExec (which exits with its SuperNode) was stopped with it, on purpose
        assert sup.superexec.proc is None and execr.poll() is not None
        assert sup.states() == [ProcessState("supernode", 0, False),
                                ProcessState("superexec", 0, False)]
        reaped = time.monotonic()
        until(sup, "the SuperNode's restart", lambda: sup.supernode.restarts == 1)
        assert time.monotonic() - reaped >= 0.15  # after its pause (0.2 s), not at once
        new = sup.supernode.proc
        assert new is not None and new.pid != node.pid and sup.supernode.pauses == [0.2]
        assert sup.superexec.restarts == 1 and served == [node.pid, new.pid]
        assert sup.states() == [ProcessState("supernode", 1, True),
                                ProcessState("superexec", 1, True)]
    assert new.poll() is not None  # stop_all
    text = caplog.text
    assert (f"the site's SuperNode (pid {node.pid}) exited with signal 9 (SIGKILL) after 0s; "
            "restarting it in 0.2s") in text
    assert f"stopping the site's SuperExec (pid {execr.pid}): its SuperNode exited" in text
    assert f"restarted the site's SuperNode: pid {new.pid} (restart 1)" in text
    assert "restarted the site's SuperExec" in text and "gives up" not in text


def test_quick_exits_pause_longer_and_a_stable_run_resets_the_pause(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedpacs.site")
    policy = SupervisorPolicy(supernode=RestartPolicy(pauses_s=(0.2, 0.8), stable_s=1.0),
                              grace_s=5.0)
    with supervised(SiteCommands(supernode=sleeper, superexec=lambda _pid: sleeper()),
                    policy) as sup:
        def kill_and_restart(n: int) -> None:
            assert sup.supernode.proc is not None
            os.kill(sup.supernode.proc.pid, signal.SIGKILL)
            until(sup, f"restart {n}", lambda: sup.supernode.restarts == n)

        sup.step(time.monotonic())
        kill_and_restart(1)
        kill_and_restart(2)
        assert sup.supernode.pauses == [0.2, 0.8]  # the second quick exit waits longer
        time.sleep(1.2)  # up longer than stable_s
        kill_and_restart(3)
        assert sup.supernode.pauses == [0.2, 0.8, 0.2]
    assert "restarting it in 0.8s" in caplog.text


def test_a_superexec_that_exits_alone_is_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedpacs.site")
    execs = in_turn(exiting(3), sleeper)
    with supervised(SiteCommands(supernode=sleeper, superexec=lambda _pid: execs())) as sup:
        sup.step(time.monotonic())
        node = sup.supernode.proc
        assert node is not None
        until(sup, "the SuperExec's restart", lambda: sup.superexec.restarts == 1)
        assert sup.supernode.proc is node and node.poll() is None  # the SuperNode stays
        assert sup.superexec.pauses == [0.2] and sup.supernode.restarts == 0
    assert "the site's SuperExec (pid" in caplog.text
    assert "exited with code 3" in caplog.text
    assert "(quick exit 1 of 3 in a row before the daemon gives up)" in caplog.text


def test_a_crash_loop_ends_the_daemon_with_a_coded_error() -> None:
    started: list[subprocess.Popen[bytes]] = []

    def superexec(_pid: int) -> subprocess.Popen[bytes]:
        started.append(sleeper())
        return started[-1]

    with supervised(SiteCommands(supernode=exiting(1), superexec=superexec)) as sup:
        with pytest.raises(ProcessError, match="3 exits in a row") as err:
            until(sup, "the crash loop", lambda: False)
        assert "Failed to activate SuperNode" in str(err.value) and sup.supernode.restarts == 2
    assert all(p.poll() is not None for p in started)


def test_refusals_after_a_kill_do_not_count_as_a_crash_loop(
        caplog: pytest.LogCaptureFixture) -> None:
    """kill -9: the SuperLink counts the node online for up to 60 s and refuses the new
    SuperNode meanwhile (Flower exits with code 1); the daemon keeps trying."""
    caplog.set_level(logging.INFO, logger="fedpacs.site")
    node = in_turn(sleeper, exiting(1), exiting(1), exiting(1), sleeper)
    with supervised(SiteCommands(supernode=node, superexec=lambda _pid: sleeper())) as sup:
        sup.step(time.monotonic())
        assert sup.supernode.proc is not None
        os.kill(sup.supernode.proc.pid, signal.SIGKILL)
        until(sup, "four restarts", lambda: sup.supernode.restarts == 4)
        assert sup.supernode.strikes == 0 and sup.supernode.pauses == [0.2, 0.8, 0.8, 0.8]
    assert caplog.text.count("refusals are expected for up to 30s") == 3


def test_refusals_right_after_the_daemon_starts_do_not_count_either() -> None:
    """The site's previous daemon was killed (kill -9): its node may still count as online
    at the SuperLink, so the new daemon's first SuperNodes are refused for up to a minute."""
    policy = SupervisorPolicy(supernode=RestartPolicy(pauses_s=(0.2, 0.8), give_up_after=3,
                                                      rejoin_s=30.0, rejoin_at_start=True))
    node = in_turn(exiting(1), exiting(1), exiting(1), sleeper)
    with supervised(SiteCommands(supernode=node, superexec=lambda _pid: sleeper()),
                    policy=policy) as sup:
        until(sup, "three restarts", lambda: sup.supernode.restarts == 3)
        assert sup.supernode.strikes == 0 and sup.supernode.proc is not None


def test_rejoin_covers_flowers_heartbeat() -> None:
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    assert REJOIN_S > HEARTBEAT_DEFAULT_INTERVAL * HEARTBEAT_PATIENCE
    assert exit_text(-9) == "signal 9 (SIGKILL)" and exit_text(3) == "code 3"


# a daemon-style parent: the daemon's own loop and signal handling, stand-in children
DAEMON = """
import logging, os, sys
from fedpacs.client.daemon import SiteCommands, Supervisor, run_supervised, spawn
logging.basicConfig(level=logging.INFO)
sleep, env = [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ)
sup = Supervisor(SiteCommands(supernode=lambda: spawn(sleep, env),
                              superexec=lambda pid: spawn(sleep, env),
                              warm=lambda: spawn(sleep, env)))
sys.exit(run_supervised(sup, poll_s=0.05))
"""


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@contextmanager
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[int], Path]]:
    script, log_path = tmp_path / "daemon.py", tmp_path / "daemon.log"
    script.write_text(DAEMON)
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until("the daemon's three processes", lambda: len(children(proc.pid)) == 3,
                   timeout_s=30, interval_s=0.05)
        yield proc, children(proc.pid), log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_sigterm_stops_the_daemon_and_all_its_processes(tmp_path: Path) -> None:
    with daemon(tmp_path) as (proc, kids, log_path):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not [k for k in kids if process_alive(k)]
    assert "SIGTERM received; stopping the site's processes" in log_path.read_text()


def test_a_daemon_killed_by_sigkill_takes_its_processes_with_it(tmp_path: Path) -> None:
    with daemon(tmp_path) as (proc, kids, _log):
        proc.kill()
        proc.wait(timeout=10)
        wait_until("the children of a killed daemon to exit",
                   lambda: not [k for k in kids if process_alive(k)], timeout_s=10,
                   interval_s=0.05)


def test_die_with_parent_refuses_other_threads() -> None:
    errors: list[BaseException] = []

    def call() -> None:
        try:
            die_with_parent()
        except ProcessError as err:
            errors.append(err)

    t = threading.Thread(target=call)
    t.start()
    t.join(timeout=10)
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_the_metrics_endpoint_shows_restarts_beside_the_clientapp_series(
        tmp_path: Path) -> None:
    mdir = tmp_path / "metrics"
    mdir.mkdir()
    # a ClientApp process writes into the folder, as under the daemon
    subprocess.run([sys.executable, "-c", "from fedpacs.client.metrics import site_metrics; "
                    "site_metrics().rounds.inc()"], check=True, timeout=60,
                   env=dict(os.environ) | {MULTIPROC_ENV: str(mdir)})
    with supervised(SiteCommands(supernode=sleeper, superexec=lambda _pid: sleeper(),
                                 warm=sleeper)) as sup:
        sup.step(time.monotonic())
        assert sup.supernode.proc is not None
        os.kill(sup.supernode.proc.pid, signal.SIGKILL)
        until(sup, "the SuperNode's restart", lambda: sup.supernode.restarts == 1)
        port = free_port()
        server, thread = serve_multiprocess(mdir, port,
                                            collectors=[SiteProcessCollector(sup.states)])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
    lines = set(text.splitlines())
    assert 'fedpacs_site_process_restarts_total{process="supernode"} 1.0' in lines
    assert 'fedpacs_site_process_restarts_total{process="superexec"} 1.0' in lines
    assert 'fedpacs_site_process_restarts_total{process="warm"} 0.0' in lines
    for process in ("supernode", "superexec", "warm"):
        assert f'fedpacs_site_process_up{{process="{process}"}} 1.0' in lines
    assert "fedpacs_site_rounds_total 1.0" in lines


def test_the_daemon_does_not_import_torch() -> None:
    code = ("import sys, fedpacs.client.daemon; "
            "print(sorted(m for m in ('torch', 'pydicom', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
