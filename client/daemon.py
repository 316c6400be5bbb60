"""The site daemon: validate the site config, then run a SuperNode for it.

``fedpacs site start`` refuses to start (exit code 3, every bad field named) when the site
config is invalid, so a hospital never joins a federation it cannot serve.

The daemon runs three processes: the SuperNode (``--isolation process``: it starts no task
launcher of its own, its Runtime API on 127.0.0.1 only; fedpacs.client.supernode), the
site's SuperExec from the app gate (fedpacs.client.gate), which runs ClientApp tasks only,
each behind the signature check, and (``compute.warm``, the default) the warm parent that
forks each task's process with imports and data ready (fedpacs.client.warm). All see the
gate folder first on PATH and a Flower home of the site's own (the folder apps are
installed into and imported from).

The daemon supervises them (:class:`Supervisor`) until it is signalled (SIGTERM: exit 0,
SIGINT: 130; every process stopped with :data:`STOP_GRACE_S` of grace):

* a process that exits is restarted after a pause that grows with each exit
  (:data:`RESTART_BACKOFF_S`, 1 s to 30 s) and starts from the first again once the process
  stayed up :data:`STABLE_S`; every exit and restart is logged (process, pid, exit code or
  signal, pause) and counted (``fedpacs_site_process_restarts_total{process}``, beside
  ``fedpacs_site_process_up{process}``, on ``--metrics-port``);
* the SuperExec exits with its SuperNode (``--parent-pid``): when the SuperNode exits the
  daemon stops the SuperExec and starts both again, the SuperNode with the same key, so it
  rejoins as the same node (Flower binds the node id to the registered public key). After
  a SuperNode died by a signal (kill -9) the SuperLink counts it online for up to two
  heartbeats (60 s): restarts meanwhile are refused ("Failed to activate SuperNode"), and
  the daemon keeps trying (:data:`REJOIN_S`); the same holds for the first
  :data:`REJOIN_S` after the daemon starts (the site's previous daemon may just have been
  killed);
* crash loop: when the SuperNode or the SuperExec exits on its own (an exit code, not a
  signal) :data:`GIVE_UP_EXITS` times in a row, each within :data:`STABLE_S` of its start,
  the daemon stops everything and fails with ExitCode.PROCESS: a key the SuperLink does not
  know (never registered, revoked), a wrong address or certificate, or ``--max-wait``
  elapsing fail the same way on every restart. A single kill never ends the daemon; the
  warm parent is restarted without limit (tasks run cold meanwhile);
* the children die with the daemon, also when it is killed by SIGKILL
  (:func:`fedpacs.common.procs.die_with_parent`: they get SIGTERM, the SuperNode then
  deactivates its node, so a restarted daemon rejoins at once).
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
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from fedpacs.client.config import SITE_CONFIG_NODE_KEY, SiteConfig, load_site_config
from fedpacs.client.gate import (
    GATE_DIR_ENV,
    SUPEREXEC_COMMAND,
    TRUST_ENV,
    UNSIGNED_ENV,
    install_gate,
)
from fedpacs.client.metrics import ProcessState, SiteProcessCollector
from fedpacs.client.warm import SOCKET_NAME, WARM_SOCKET_ENV
from fedpacs.common.errors import (
    AuthError,
    ConfigError,
    DataError,
    ExitCode,
    FieldError,
    ProcessError,
)
from fedpacs.common.procs import child_env, die_with_parent, tool
from fedpacs.common.tasks import get_task
from fedpacs.common.telemetry import MULTIPROC_ENV, fresh_dir, serve_multiprocess

log = logging.getLogger("fedpacs.site")


@dataclass(frozen=True)
class SiteSummary:
    site: SiteConfig
    train: int
    val: int
    skipped: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)  # what the user should know (and fix)


def check_site(config_path: Path | None) -> SiteSummary:
    """Parse the site config and load its data once: counts plus skipped files with reasons."""
    from fedpacs.client.data import (  # (torch: not in the daemon's own process)
        PacsSiteData,
        load_site_data,
    )

    site = load_site_config(config_path)
    from fedpacs.common.preprocess import preprocessed

    task = site.custom_task or get_task(site.task)
    data = preprocessed(load_site_data(site.data, task, preprocess=site.preprocess), task)
    if len(data.train) == 0:
        raise DataError(str(site.data.root), "no usable training samples in this site's "
                        "partition", "check data.root, data.partition and the skipped files")
    notes = list(data.notes) if isinstance(data, PacsSiteData) else []
    return SiteSummary(site, len(data.train), len(data.val), data.skipped, notes)


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
RESTART_BACKOFF_S = WARM_BACKOFF_S  # ... and the SuperNode or the SuperExec
STABLE_S = 60.0  # up this long: the next exit pauses RESTART_BACKOFF_S[0] again
GIVE_UP_EXITS = 3  # quick exits by code in a row that end the daemon (a crash loop)
# Flower's SuperLink counts a node online until HEARTBEAT_PATIENCE (2) x its heartbeat
# interval (30 s) after its last heartbeat, and refuses to activate it again meanwhile: a
# SuperNode killed by a signal (it could not deactivate its node) is refused that long.
# tests/test_supervise.py pins this against Flower's constants.
REJOIN_S = 70.0


def supernode_argv(opts: DaemonOptions, site_config: Path) -> list[str]:
    for option, path in (("--root-certificates", opts.root_certificates),
                         ("--auth-key", opts.auth_key)):
        if not path.is_file():
            raise AuthError(f"{option}: expected an existing file, got {path}. Fix: run "
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


@dataclass(frozen=True)
class RestartPolicy:
    """When a supervised process is started again after it exited."""

    pauses_s: tuple[float, ...] = RESTART_BACKOFF_S  # the n-th exit in a row pauses [n]
    stable_s: float = STABLE_S  # up this long: the pauses start from the first again
    give_up_after: int = 0  # quick exits by code in a row that end the daemon (0: never)
    rejoin_s: float = 0.0  # quick exits this long after one by a signal are not counted
    # ... nor this long after the first start: the site's previous daemon may just have
    # died (kill -9, a power cut) and left its node counted online at the SuperLink
    rejoin_at_start: bool = False

    def pause(self, streak: int) -> float:
        return self.pauses_s[min(streak, len(self.pauses_s) - 1)]


SUPERNODE_RESTARTS = RestartPolicy(give_up_after=GIVE_UP_EXITS, rejoin_s=REJOIN_S,
                                   rejoin_at_start=True)
SUPEREXEC_RESTARTS = RestartPolicy(give_up_after=GIVE_UP_EXITS)
WARM_RESTARTS = RestartPolicy(pauses_s=WARM_BACKOFF_S)  # tasks run cold meanwhile: no limit


def exit_text(code: int) -> str:
    """``code 3`` or ``signal 9 (SIGKILL)`` for a Popen return code."""
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"signal {-code}"


@dataclass
class Restarting:
    """A process the daemon restarts when it exits, pausing longer after each exit in a
    row (``policy``); ``name`` is what the log calls it, ``process`` its metric label."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    policy: RestartPolicy = WARM_RESTARTS
    process: str = "warm"
    note: str = " (tasks run cold meanwhile)"  # appended to the exit line
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    streak: int = 0  # exits since it last stayed up policy.stable_s: picks the pause
    strikes: int = 0  # quick exits by code in a row: policy.give_up_after ends the daemon
    started_at: float = 0.0
    not_before: float = 0.0
    killed_at: float | None = None  # when it last died by a signal
    pauses: list[float] = field(default_factory=list)  # every pause so far, in order

    @property
    def restarts(self) -> int:
        return max(self.starts - 1, 0)

    def state(self) -> ProcessState:
        return ProcessState(self.process, self.restarts, self.proc is not None)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def check(self, now: float) -> None:
        """Restart it when it exited and its pause is over (the first call starts it)."""
        self.reap(now)
        self.start_if_due(now)

    def reap(self, now: float) -> bool:
        """True when it exited: logged, counted, its next start scheduled; raises
        ProcessError when that makes ``policy.give_up_after`` quick exits in a row."""
        if self.proc is None or self.proc.poll() is None:
            return False
        proc, self.proc = self.proc, None
        code, ran = int(proc.returncode), now - self.started_at
        if ran >= self.policy.stable_s:
            self.streak = self.strikes = 0
        pause = self.policy.pause(self.streak)
        self.streak += 1
        rejoining = self.killed_at is not None and now - self.killed_at < self.policy.rejoin_s
        why = ""
        if code < 0:
            self.killed_at = now
        elif ran < self.policy.stable_s and self.policy.give_up_after:
            if rejoining:
                why = (f" (refusals are expected for up to {self.policy.rejoin_s:.0f}s after "
                       "it was killed: the SuperLink counts the old one online until its "
                       "heartbeat runs out)")
            else:
                self.strikes += 1
                why = (f" (quick exit {self.strikes} of {self.policy.give_up_after} in a "
                       "row before the daemon gives up)")
        if self.policy.give_up_after and self.strikes >= self.policy.give_up_after:
            raise ProcessError(
                f"the site's {self.name} (pid {proc.pid}) exited with {exit_text(code)}: "
                f"{self.strikes} exits in a row, each within {self.policy.stable_s:.0f}s of "
                "its start; the daemon stops instead of restarting it again: a restart with "
                "the same key, address and certificates fails the same way. Fix: read its "
                "messages above ('Failed to activate SuperNode': this site's key is not "
                "registered at the SuperLink or was revoked; a wrong --superlink or "
                "--root-certificates; --max-wait elapsed), then start the site again")
        self.not_before = now + pause
        self.pauses.append(pause)
        log.error("the site's %s (pid %d) exited with %s after %.0fs; restarting it in %gs%s%s",
                  self.name, proc.pid, exit_text(code), ran, pause, self.note, why)
        return True

    def start_if_due(self, now: float) -> bool:
        if self.proc is not None or now < self.not_before:
            return False
        self.proc = self.start()
        self.starts += 1
        self.started_at = now
        if self.starts == 1 and self.policy.rejoin_at_start:
            self.killed_at = now  # refusals in the first rejoin_s are expected, as after a kill
        if self.starts > 1:
            log.warning("restarted the site's %s: pid %d (restart %d)", self.name,
                        self.proc.pid, self.restarts)
        return True

    def halt(self, why: str, grace_s: float = STOP_GRACE_S) -> None:
        """Stop it on purpose (no pause, not counted as an exit); it starts again when
        :meth:`start_if_due` is next called."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            log.info("stopping the site's %s (pid %d): %s", self.name, proc.pid, why)
        stop(proc, grace_s)
        self.not_before = 0.0


def stop(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    stop_all([proc], grace_s)


def stop_all(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each, give all together ``grace_s`` to exit, then SIGKILL what is left."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            log.error("pid %d did not stop within %.0fs of SIGTERM; killing it", p.pid,
                      grace_s)
            p.kill()
            p.wait(timeout=grace_s)


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child of the daemon that gets SIGTERM when the daemon dies, SIGKILL included
    (call from the main thread: PR_SET_PDEATHSIG follows the thread that forked)."""
    return subprocess.Popen(argv, env=env, preexec_fn=die_with_parent(signal.SIGTERM))


@dataclass(frozen=True)
class SiteCommands:
    """How the daemon starts each of its processes (tests inject stand-ins)."""

    supernode: Callable[[], subprocess.Popen[bytes]]
    superexec: Callable[[int], subprocess.Popen[bytes]]  # for the SuperNode of this pid
    warm: Callable[[], subprocess.Popen[bytes]] | None = None


@dataclass(frozen=True)
class SupervisorPolicy:
    supernode: RestartPolicy = SUPERNODE_RESTARTS
    superexec: RestartPolicy = SUPEREXEC_RESTARTS
    warm: RestartPolicy = WARM_RESTARTS
    grace_s: float = STOP_GRACE_S


class Supervisor:
    """The site's SuperNode, its SuperExec and (optionally) the warm parent, each restarted
    when it exits; :meth:`step` looks once, :meth:`stop_all` ends all of them."""

    def __init__(self, commands: SiteCommands,
                 policy: SupervisorPolicy = SupervisorPolicy()) -> None:
        self.commands, self.grace_s = commands, policy.grace_s
        self.supernode = Restarting("SuperNode", commands.supernode, policy.supernode,
                                    process="supernode", note="")
        self.superexec = Restarting("SuperExec", self._start_superexec, policy.superexec,
                                    process="superexec", note="")
        self.warm = (Restarting("warm parent", commands.warm, policy.warm)
                     if commands.warm is not None else None)

    @property
    def processes(self) -> list[Restarting]:
        return [r for r in (self.supernode, self.superexec, self.warm) if r is not None]

    def states(self) -> list[ProcessState]:
        return [r.state() for r in self.processes]

    def _start_superexec(self) -> subprocess.Popen[bytes]:
        if self.supernode.proc is None:
            raise ProcessError("the site's SuperExec: expected a running SuperNode to serve, "
                               "got none. Fix: start it after the SuperNode (Supervisor.step)")
        return self.commands.superexec(self.supernode.proc.pid)

    def step(self, now: float) -> None:
        """Reap what exited, start what is due (the warm parent first, then the SuperNode,
        then its SuperExec); raises ProcessError for a crash loop (:class:`RestartPolicy`)."""
        if self.warm is not None:
            self.warm.check(now)
        if self.supernode.exited():  # looked at first: the SuperExec exits after it
            self.supernode.reap(now)
            self.superexec.halt("its SuperNode exited; it starts again with the next one",
                                self.grace_s)
        elif self.superexec.exited():
            self.superexec.reap(now)
        self.supernode.start_if_due(now)
        if self.supernode.proc is not None:
            self.superexec.start_if_due(now)

    def stop_all(self) -> None:
        procs = [r.proc for r in self.processes if r.proc is not None]
        for r in self.processes:
            r.proc = None
        stop_all(procs, self.grace_s)


@dataclass
class StopRequest:
    """Set by the daemon's SIGTERM/SIGINT handler; read by :func:`supervise`."""

    signum: int | None = None

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum


def supervise(supervisor: Supervisor, stop_request: StopRequest, *,
              poll_s: float = POLL_S) -> int:
    """Run ``supervisor`` until ``stop_request`` is set, then stop every process; returns
    ExitCode.OK (SIGTERM) or ExitCode.INTERRUPTED (SIGINT). A crash loop raises
    ProcessError, after every process was stopped."""
    try:
        while stop_request.signum is None:
            supervisor.step(time.monotonic())
            time.sleep(poll_s)
        log.info("%s received; stopping the site's processes",
                 signal.Signals(stop_request.signum).name)
        return int(ExitCode.INTERRUPTED if stop_request.signum == signal.SIGINT
                   else ExitCode.OK)
    finally:
        supervisor.stop_all()


def run_supervised(supervisor: Supervisor, *, poll_s: float = POLL_S) -> int:
    """:func:`supervise` until SIGTERM or SIGINT (the handlers are this call's only)."""
    request = StopRequest()
    before = {s: signal.signal(s, request.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervise(supervisor, request, poll_s=poll_s)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def check_in_child(config: Path | None) -> int:
    """``fedpacs site check`` in a process of its own (it prints the counts, or the coded
    error naming each bad field or file); its exit code. The daemon, which runs for the
    life of the site, thereby never imports torch and the data code (~190 MiB a site)."""
    argv = [tool("fedpacs"), "site", "check"]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(argv, env=child_env(), check=False).returncode


def run_daemon(opts: DaemonOptions) -> int:
    """Validate, then run the SuperNode, the site's SuperExec and the warm parent in the
    foreground, restarting each that exits, until the daemon is signalled."""
    site = load_site_config(opts.config)  # a bad config: the coded error, nothing started
    checked = check_in_child(opts.config)
    if checked != 0:
        return checked
    site_config = Path(site.source)
    argv = supernode_argv(opts, site_config)
    env = child_env()
    state = opts.state_dir or Path(tempfile.mkdtemp(prefix=f"fedpacs-{site.name}-"))
    env.update(gate_env(site, state, env["PATH"]))
    env["FLWR_HOME"] = str(state / "flwr-home")  # apps are installed here, by this site only
    mdir = fresh_dir(state / "metrics") if opts.metrics_port else None
    if mdir is not None:
        env[MULTIPROC_ENV] = str(mdir)  # the ClientApp processes write here
    warm_cmd = warm_argv(state, site_config)
    supervisor = Supervisor(SiteCommands(
        supernode=lambda: spawn(argv, env),
        superexec=lambda pid: spawn(superexec_argv(opts, state, pid), env),
        warm=(lambda: spawn(warm_cmd, env)) if site.compute.warm else None))
    if mdir is not None:
        serve_multiprocess(mdir, opts.metrics_port,
                           collectors=[SiteProcessCollector(supervisor.states)])
        log.info("site %s: metrics on http://127.0.0.1:%d/metrics", site.name,
                 opts.metrics_port)
    log.info("site %s: data checked; starting SuperNode", site.name)
    return run_supervised(supervisor)
