"""The site daemon: validate the site config, then run a SuperNode for it.

``fedpacs site start`` refuses to start (exit code 3, every bad field named) when the site
config is invalid, so a hospital never joins a federation it cannot serve.

The daemon runs three processes: the SuperNode (``--isolation process``: it starts no task
launcher of its own, its Runtime API on 127.0.0.1 only; fedpacs.client.supernode), the
site's SuperExec from the app gate (fedpacs.client.gate), which runs ClientApp tasks only,
each behind the signature check, and (``compute.warm``, the default) the warm parent that
forks each task's process with imports and data ready (fedpacs.client.warm). All see the
gate folder first on PATH and a Flower home of the site's own (the folder apps are
installed into and imported from). If the SuperNode or the SuperExec exits, the daemon
stops the others and exits; a warm parent that exits is restarted (with a growing pause),
and tasks run cold until it is back.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpacs.client.config import SITE_CONFIG_NODE_KEY, SiteConfig, load_site_config
from fedpacs.client.gate import (
    GATE_DIR_ENV,
    SUPEREXEC_COMMAND,
    TRUST_ENV,
    UNSIGNED_ENV,
    install_gate,
)
from fedpacs.client.warm import SOCKET_NAME, WARM_SOCKET_ENV
from fedpacs.common.errors import AuthError, ConfigError, DataError, ExitCode, FieldError
from fedpacs.common.procs import child_env, tool
from fedpacs.common.tasks import get_task
from fedpacs.common.telemetry import MULTIPROC_ENV, fresh_dir, serve_multiprocess

log = logging.getLogger("fedpacs.site")


@dataclass(frozen=True)
class SiteSummary:
    site: SiteConfig
    train: int
    val: int
    skipped: list[tuple[str, str]]


def check_site(config_path: Path | None) -> SiteSummary:
    """Parse the site config and load its data once: counts plus skipped files with reasons."""
    from fedpacs.client.data import load_site_data  # (torch: not in the daemon's own process)

    site = load_site_config(config_path)
    data = load_site_data(site.data, site.custom_task or get_task(site.task),
                          preprocess=site.preprocess)
    if len(data.train) == 0:
        raise DataError(str(site.data.root), "no usable training samples in this site's "
                        "partition", "check data.root, data.partition and the skipped files")
    return SiteSummary(site, len(data.train), len(data.val), data.skipped)


@dataclass(frozen=True)
class DaemonOptions:
    config: Path | None
    superlink: str
    root_certificates: Path
    auth_key: Path
    runtime_port: int = 9094
    max_wait_s: float | None = None
    metrics_port: int = 0  # 0: no metrics endpoint
    state_dir: Path | None = None  # where ClientApp processes write metrics (default: a tmp dir)


RUNTIME_HOST = "127.0.0.1"  # the SuperNode's Runtime API: this machine only
STOP_GRACE_S = 10.0  # how long a stopped process has before it is killed
POLL_S = 0.5  # how often the daemon looks at its processes
WARM_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # pauses before restarting a warm parent


def supernode_argv(opts: DaemonOptions, site_config: Path) -> list[str]:
    for field, path in (("--root-certificates", opts.root_certificates),
                        ("--auth-key", opts.auth_key)):
        if not path.is_file():
            raise AuthError(f"{field}: expected an existing file, got {path}. Fix: run "
                            "`fedpacs provision init` at the coordinator and copy the site's "
                            "files here")
    argv = [sys.executable, "-m", "fedpacs.client.supernode", "--superlink", opts.superlink,
            "--root-certificates", str(opts.root_certificates),
            "--auth-supernode-private-key", str(opts.auth_key),
            "--node-config", f'{SITE_CONFIG_NODE_KEY}="{site_config}"',
            "--isolation", "process",  # the daemon starts the site's own SuperExec
            "--host", RUNTIME_HOST, "--port", str(opts.runtime_port)]
    if opts.max_wait_s is not None:
        argv += ["--max-wait-time", str(opts.max_wait_s)]
    return argv


def gate_dir(state: Path) -> Path:
    return state / "gate-bin"


def superexec_argv(opts: DaemonOptions, state: Path, supernode_pid: int) -> list[str]:
    """The site's SuperExec (fedpacs.client.gate), by absolute path, for the SuperNode's
    Runtime API; it exits with the SuperNode."""
    return [str(gate_dir(state) / SUPEREXEC_COMMAND),
            "--runtime-api-address", f"{RUNTIME_HOST}:{opts.runtime_port}", "--insecure",
            "--parent-pid", str(supernode_pid)]


def gate_env(site: SiteConfig, state: Path, path: str) -> dict[str, str]:
    """PATH and trust settings that put the app gate in front of every task launcher."""
    sec = site.security
    if not sec.allow_unsigned_apps and not sec.trusted_app_keys:
        raise ConfigError(site.source, [FieldError(
            "security.trusted_app_keys", "at least one public key the site trusts to sign apps",
            "none", "add the coordinator's signing.pub (or, for development only, set "
            "allow_unsigned_apps = true)")])
    gate = install_gate(gate_dir(state), check_signatures=not sec.allow_unsigned_apps,
                        warm=site.compute.warm)
    env = {"PATH": f"{gate}{os.pathsep}{path}", GATE_DIR_ENV: str(gate)}
    if site.compute.warm:
        env[WARM_SOCKET_ENV] = str(warm_socket(state))
    if sec.allow_unsigned_apps:
        log.warning("site %s: security.allow_unsigned_apps = true: apps are NOT checked "
                    "against a signature (development only); still only ClientApps run",
                    site.name)
        return env | {UNSIGNED_ENV: "1"}
    log.info("site %s: runs only ClientApps signed by %s", site.name,
             ", ".join(str(k) for k in sec.trusted_app_keys))
    return env | {TRUST_ENV: os.pathsep.join(str(k) for k in sec.trusted_app_keys)}


def warm_socket(state: Path) -> Path:
    return state / "warm" / SOCKET_NAME


def warm_argv(state: Path, site_config: Path) -> list[str]:
    return [sys.executable, "-m", "fedpacs.client.warm", "--socket", str(warm_socket(state)),
            "--config", str(site_config)]


@dataclass
class Restarting:
    """A process the daemon restarts when it exits (the warm parent), pausing longer
    after each exit (:data:`WARM_BACKOFF_S`)."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    not_before: float = 0.0

    def check(self, now: float) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                return
            pause = WARM_BACKOFF_S[min(self.restarts, len(WARM_BACKOFF_S) - 1)]
            log.error("the site's %s (pid %d) exited with code %s; restarting it in %.0fs "
                      "(tasks run cold meanwhile)", self.name, self.proc.pid,
                      self.proc.returncode, pause)
            self.restarts += 1
            self.proc, self.not_before = None, now + pause
        if now >= self.not_before:
            self.proc = self.start()


def stop(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


def supervise(supernode: subprocess.Popen[bytes], superexec: subprocess.Popen[bytes],
              *, stopping: Callable[[], bool] = lambda: False, poll_s: float = POLL_S,
              restarting: Sequence[Restarting] = ()) -> int:
    """Wait until the SuperNode or the SuperExec exits, stop the other (and the
    ``restarting`` ones, restarted meanwhile whenever they exit); returns the SuperNode's
    exit code, or ExitCode.PROCESS when the SuperExec went first (no task could run
    without it) while the daemon was not ``stopping``."""
    try:
        return _supervise(supernode, superexec, stopping, poll_s, restarting)
    finally:
        for r in restarting:
            if r.proc is not None:
                stop(r.proc)


def _supervise(supernode: subprocess.Popen[bytes], superexec: subprocess.Popen[bytes],
               stopping: Callable[[], bool], poll_s: float,
               restarting: Sequence[Restarting]) -> int:
    while True:
        code = supernode.poll()
        if code is not None:
            stop(superexec)
            return code
        if superexec.poll() is not None:
            if stopping():
                stop(supernode)
                return int(supernode.returncode)
            log.error("the site's SuperExec (pid %d) exited with code %s; stopping the "
                      "SuperNode, which could run no task without it", superexec.pid,
                      superexec.returncode)
            stop(supernode)
            return int(ExitCode.PROCESS)
        if not stopping():
            for r in restarting:
                r.check(time.monotonic())
        time.sleep(poll_s)


def check_in_child(config: Path | None) -> int:
    """``fedpacs site check`` in a process of its own (it prints the counts, or the coded
    error naming each bad field or file); its exit code. The daemon, which runs for the
    life of the site, thereby never imports torch and the data code (~190 MiB a site)."""
    argv = [tool("fedpacs"), "site", "check"]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(argv, env=child_env(), check=False).returncode


def run_daemon(opts: DaemonOptions) -> int:
    """Validate, then run the SuperNode and the site's SuperExec in the foreground until
    either exits or the daemon is signalled."""
    site = load_site_config(opts.config)  # a bad config: the coded error, nothing started
    checked = check_in_child(opts.config)
    if checked != 0:
        return checked
    site_config = Path(site.source)
    argv = supernode_argv(opts, site_config)
    log.info("site %s: data checked; starting SuperNode", site.name)
    env = child_env()
    state = opts.state_dir or Path(tempfile.mkdtemp(prefix=f"fedpacs-{site.name}-"))
    env.update(gate_env(site, state, env["PATH"]))
    env["FLWR_HOME"] = str(state / "flwr-home")  # apps are installed here, by this site only
    if opts.metrics_port:
        mdir = fresh_dir(state / "metrics")
        serve_multiprocess(mdir, opts.metrics_port)
        env[MULTIPROC_ENV] = str(mdir)
        log.info("site %s: metrics on http://127.0.0.1:%d/metrics", site.name,
                 opts.metrics_port)
    restarting = []
    if site.compute.warm:
        warm = Restarting("warm parent", lambda: subprocess.Popen(
            warm_argv(state, site_config), env=env))
        warm.check(time.monotonic())
        restarting.append(warm)
    supernode = subprocess.Popen(argv, env=env)
    try:
        superexec = subprocess.Popen(superexec_argv(opts, state, supernode.pid), env=env)
    except OSError:
        stop(supernode)
        for r in restarting:
            if r.proc is not None:
                stop(r.proc)
        raise

    signalled: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        signalled.append(signum)
        for proc in (supernode, superexec, *(r.proc for r in restarting if r.proc)):
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return supervise(supernode, superexec, stopping=lambda: bool(signalled),
                     restarting=restarting)
