"""The warm site (fedpacs.client.warm) and its data cache, with real processes.

A real warm parent process forks a child per launch, and real relays (the gate's
``flwr-clientapp`` at a warm site) hand it their arguments and stdio; the child runs a
stand-in launcher here (the e2e tests run the real one behind a real SuperNode).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpacs.client import datacache, warm
from fedpacs.client.config import load_site_config
from fedpacs.client.gate import GATE_COMMAND, TRUST_ENV, UNSIGNED_ENV, install_gate
from fedpacs.common.errors import ExitCode
from fedpacs.common.procs import wait_until
from fedpacs.common.tasks import get_task
from fedpacs.deploy.demo import write_site_configs

# The warm parent under test: the real WarmParent, with a stand-in for the launcher that
# reports what the child got (its pid, argv, the launch marks) or fails as asked.
PARENT = """
import os, sys, time
from pathlib import Path
from fedpacs.client import timing, warm

def launcher():
    what = sys.argv[1]
    if what == "kill":
        os.kill(os.getpid(), 9)
    if what == "sleep":
        time.sleep(60)
    if what == "code":
        raise SystemExit(7)
    marks = timing.marks()
    print("child", os.getpid(), os.getppid(), sys.argv[1:], sorted(marks), flush=True)
    print("to stderr", file=sys.stderr, flush=True)

warm.launcher = launcher
warm.WarmParent(Path(sys.argv[1]), None).serve()
"""


@pytest.fixture
def parent(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "warm" / warm.SOCKET_NAME
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(sock)])
    try:
        wait_until("the warm parent's socket", sock.exists, timeout_s=30)
        yield proc, sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def relay(sock: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from fedpacs.client.warm import relay_main; relay_main()",
         *args], env=(env or os.environ) | {warm.WARM_SOCKET_ENV: str(sock)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_each_launch_runs_in_a_fresh_child_with_the_relays_stdio(
        parent: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = parent
    pids = set()
    for _ in range(2):
        r = relay(sock, "ok", "--token", "t")
        out, err = r.communicate(timeout=30)
        assert r.returncode == 0, err
        _, pid, ppid, *_ = out.split(" ", 3)
        assert int(ppid) == proc.pid and int(pid) not in (proc.pid, r.pid)
        assert "['ok', '--token', 't'] ['forked', 'launch']" in out
        assert "to stderr" in err
        pids.add(pid)
    assert len(pids) == 2  # one process per message


def test_a_child_that_dies_is_reported_and_the_parent_serves_the_next(
        parent: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = parent
    r = relay(sock, "kill")
    r.communicate(timeout=30)
    assert r.returncode == 128 + signal.SIGKILL
    r = relay(sock, "code")
    r.communicate(timeout=30)
    assert r.returncode == 7
    r = relay(sock, "ok")
    out, _ = r.communicate(timeout=30)
    assert r.returncode == 0 and out.startswith("child") and proc.poll() is None


def test_a_stopped_relay_stops_its_child(parent: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, sock = parent
    r = relay(sock, "sleep")
    time.sleep(1.0)
    r.send_signal(signal.SIGTERM)
    r.communicate(timeout=30)
    assert r.returncode == 128 + signal.SIGTERM


def test_without_a_warm_parent_the_relay_runs_cold_under_the_same_policy(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (TRUST_ENV, UNSIGNED_ENV)}
    r = relay(tmp_path / "no.sock", "--token", "t", env=env)
    _, err = r.communicate(timeout=60)
    assert "warm parent not reachable" in err and "running this message cold" in err
    # no trusted key and unsigned apps not allowed: nothing runs
    assert r.returncode == ExitCode.POLICY


def test_relay_imports_no_flower_torch_or_numpy() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, fedpacs.client.warm; print(sorted(m for m in "
         "('torch', 'flwr', 'numpy', 'monai') if m in sys.modules))"],
        capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gate_folder_holds_the_relay_at_a_warm_site(tmp_path: Path) -> None:
    folder = install_gate(tmp_path / "gate", warm=True)
    assert "relay_main()" in (folder / GATE_COMMAND).read_text()
    folder = install_gate(tmp_path / "gate", warm=False)
    assert "from fedpacs.client.gate import main" in (folder / GATE_COMMAND).read_text()


# ------------------------------------------------------------------ the data cache
@pytest.fixture
def npz_site(tmp_path: Path, data_dir: Path) -> Path:
    npz = tmp_path / "breastmnist.npz"
    npz.write_bytes((data_dir / "medmnist_breast" / "breastmnist.npz").read_bytes())
    (path,) = write_site_configs(tmp_path / "sites", task="breastmnist", fmt="medmnist",
                                 names=["site-a"], threads=1, seed=0, data=npz,
                                 trusted_keys=[])
    return path


def test_data_are_loaded_once_and_again_when_a_file_or_the_config_changes(
        npz_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datacache, "_entry", None)
    site = load_site_config(npz_site)
    task = get_task(site.task)
    loads = datacache.loads
    first = datacache.site_data(site, task)
    assert datacache.site_data(site, task) is first and datacache.loads == loads + 1
    assert datacache.is_warm(site, task)
    npz = tmp_path / "breastmnist.npz"
    os.utime(npz, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed
    assert not datacache.is_warm(site, task)
    second = datacache.site_data(site, task)
    assert second is not first and datacache.loads == loads + 2
    npz_site.write_text(npz_site.read_text().replace("seed = 0", "seed = 1"))
    changed = load_site_config(npz_site)
    assert not datacache.is_warm(changed, task)
    third = datacache.site_data(changed, task)
    assert datacache.loads == loads + 3 and third is not second


def test_the_warm_parent_reloads_before_forking_when_the_site_changed(
        npz_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datacache, "_entry", None)
    assert warm.refresh(str(npz_site)) is True  # first load
    assert warm.refresh(str(npz_site)) is False  # warm: nothing to do
    npz_site.write_text(npz_site.read_text() + "\n# edited\n")
    assert warm.refresh(str(npz_site)) is True
