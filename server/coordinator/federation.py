"""One federation, persisted: a SuperLink (TLS, SuperNode authentication, on-disk state),
a metrics exporter and the site daemons this host runs, driven through Flower's own
executables and ``flwr`` CLI.

The SuperLink has two listeners (fedpacs.server.superlink): Flower's own on
127.0.0.1:``control_port`` (Control and Runtime APIs, for the ``flwr`` CLI and the
ServerApps) and the Fleet-only one on the fleet address, which is what sites dial
(127.0.0.1 for a federation on one host; e.g. 10.77.0.1:9092 for sites on other hosts).

Every command that acts on a federation is a short-lived process: what it needs lives in
``WORKDIR/federation.json`` (addresses, PIDs, each site's config file and task, runs), so
``fedpacs federation up``, ``run start``, ``federation rotate`` and ``fedpacs demo`` all
go through this one class: the demo is ``up`` + ``start_run`` + ``watch`` + ``down``. The
runs themselves go through fedpacs.server.coordinator.control, which `fedpacs run ...
--control HOST:PORT` uses without a federation.json.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpacs.common.artifacts import write_json
from fedpacs.common.config import RunConfig
from fedpacs.common.errors import (
    AuthError,
    ConfigError,
    DeadlineError,
    FieldError,
    ProcessError,
)
from fedpacs.common.procs import (
    Proc,
    ProcessSet,
    child_env,
    free_port,
    port_open,
    process_alive,
    stop_group,
    tail,
    tool,
    wait_until,
)
from fedpacs.common.telemetry import MULTIPROC_ENV, fresh_dir
from fedpacs.server.coordinator import control as ctl
from fedpacs.server.coordinator.control import (  # CONNECTION: re-exported for tests
    CONNECTION as CONNECTION,
)
from fedpacs.server.coordinator.control import (
    Control,
    ControlConnection,
    ResumedRun,
    write_flwr_home,
)
from fedpacs.server.coordinator.pki import (
    Pki,
    SiteKeys,
    check_site_name,
    create_site_key,
    is_revoked,
    missing_hosts,
    revoke_site_key,
)
from fedpacs.server.rundir import RUNS_DIR_ENV, read_rounds
from fedpacs.server.superlink import ListenAddress, is_loopback

log = logging.getLogger("fedpacs.coordinator")

STATE_FILE = "federation.json"
SUPERLINK = "superlink"
EXPORTER = "metrics-exporter"
FINISHED = "finished:completed"
CONTROL_HOST = "127.0.0.1"  # Flower's own listener: Control + Runtime APIs, never public
FATAL = frozenset({SUPERLINK})  # a run cannot go on without it; a site daemon or the
# exporter gone is reported while Flower still runs the run
DATABASE = "superlink.db"


def site_proc_name(site: str) -> str:
    return f"supernode-{site}"


@dataclass(frozen=True)
class Timeouts:
    """Deadlines of the launcher (seconds)."""

    superlink_start: float = 60.0
    cli_call: float = 120.0
    nodes_online: float = 120.0
    stop_grace: float = 10.0
    status_every: float = 10.0  # how often `watch` asks the SuperLink for the run's status


@dataclass(frozen=True)
class SiteSpec:
    """A site this host runs: its config file (validated by the caller, on the site side)
    and the task it serves (the coordinator checks a run's min-sites against it)."""

    name: str
    config: Path
    task: str
    metrics_port: int = 0  # 0: no metrics endpoint


@dataclass
class SiteState:
    config: str
    task: str
    pid: int = 0
    metrics_port: int = 0


@dataclass
class FederationState:
    """What ``WORKDIR/federation.json`` holds."""

    workdir: str
    fleet_host: str  # what sites dial (the public, Fleet-only listener binds it)
    fleet_port: int
    control_port: int  # Flower's own listener, on 127.0.0.1 only
    superlink_pid: int = 0
    exporter_pid: int = 0
    metrics_port: int = 0
    sites: dict[str, SiteState] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> run directory

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FederationState:
        sites = {k: SiteState(**v) for k, v in raw.pop("sites", {}).items()}
        if "host" in raw:  # a state file of the one-listener SuperLink
            host, port = raw.pop("host"), raw.pop("port")
            raw |= {"fleet_host": host, "fleet_port": port, "control_port": port}
        return cls(**raw, sites=sites)

    @property
    def fleet(self) -> ListenAddress:
        return ListenAddress(self.fleet_host, self.fleet_port)

    @property
    def control(self) -> ListenAddress:
        return ListenAddress(CONTROL_HOST, self.control_port)

    def metrics_urls(self) -> dict[str, str]:
        urls = {"server": f"http://127.0.0.1:{self.metrics_port}/metrics"} \
            if self.metrics_port else {}
        return urls | {n: f"http://127.0.0.1:{s.metrics_port}/metrics"
                       for n, s in self.sites.items() if s.metrics_port}

    def pids(self) -> dict[str, int]:
        """Process name -> PID of every process of this federation."""
        out = {SUPERLINK: self.superlink_pid, EXPORTER: self.exporter_pid}
        out |= {site_proc_name(n): s.pid for n, s in self.sites.items()}
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class Gone:
    """A process of the federation that is no longer running."""

    name: str
    pid: int
    code: int | str  # its exit code ("?" when not a child of this process)
    log: Path

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}) exited with code {self.code}; log {self.log}"

    def error(self) -> ProcessError:
        return ProcessError(f"{self.describe()}:\n{tail(self.log)}")


def no_federation(workdir: Path) -> ConfigError:
    return ConfigError(str(workdir), [FieldError(
        "workdir", f"a federation started by `fedpacs federation up` ({STATE_FILE})",
        "no federation state", "run `fedpacs federation up --workdir DIR` first")])


def check_fleet_address(fleet: ListenAddress, control_port: int) -> list[FieldError]:
    """What is wrong with a fleet address and control port, as given by the coordinator."""
    errs = []
    if fleet.host in ("0.0.0.0", "::", ""):
        errs.append(FieldError("--fleet-address", "the host or IP the sites dial (the "
                               "listener binds it, and the TLS certificate names it)",
                               repr(fleet.host), "e.g. --fleet-address 10.77.0.1:9092"))
    if control_port and control_port == fleet.port and is_loopback(fleet.host):
        errs.append(FieldError("--control-port", f"a port other than the fleet port "
                               f"{fleet.port} on {CONTROL_HOST}", str(control_port),
                               "pick another port, or leave --control-port out"))
    if not 0 <= control_port < 65536:
        errs.append(FieldError("--control-port", "0 (any free port) or a TCP port",
                               str(control_port), "e.g. --control-port 9093"))
    return errs


class Federation:
    """A SuperLink and this host's site daemons; every change is saved to the state file.

    Build one with :meth:`new` (nothing started yet), :meth:`up` (everything started) or
    :meth:`load` (one started by an earlier command)."""

    def __init__(self, state: FederationState, pki: Pki, timeouts: Timeouts) -> None:
        self.state = state
        self.pki = pki
        self.timeouts = timeouts
        self.procs = ProcessSet(self.workdir / "logs")  # children of this process

    # ---------------------------------------------------------------- construction
    @classmethod
    def new(cls, workdir: Path, pki: Pki, *, fleet: ListenAddress | None = None,
            control_port: int = 0, timeouts: Timeouts | None = None) -> Federation:
        """A federation in ``workdir`` with nothing started; refuses a workdir whose
        federation is still running (a stale state file, its SuperLink gone, is replaced).
        ``fleet``: what sites dial (default 127.0.0.1 and a free port); ``control_port``:
        Flower's own listener on 127.0.0.1 (default a free port)."""
        work = workdir.resolve()
        path = work / STATE_FILE
        if path.is_file():
            old = FederationState.from_json(json.loads(path.read_text()))
            if process_alive(old.superlink_pid):
                raise ConfigError(str(workdir), [FieldError(
                    "workdir", "no running federation",
                    f"a federation whose SuperLink (pid {old.superlink_pid}) runs",
                    "run `fedpacs federation down` first, or use another --workdir")])
        fleet = fleet or ListenAddress(CONTROL_HOST, free_port(CONTROL_HOST))
        errs = check_fleet_address(fleet, control_port)
        if errs:
            raise ConfigError("federation", errs)
        while not control_port or (control_port == fleet.port and is_loopback(fleet.host)):
            control_port = free_port(CONTROL_HOST)
        work.mkdir(parents=True, exist_ok=True)
        state = FederationState(workdir=str(work), fleet_host=fleet.host,
                                fleet_port=fleet.port, control_port=control_port)
        return cls(state, pki, timeouts or Timeouts())

    @classmethod
    def up(cls, workdir: Path, pki: Pki, sites: Sequence[SiteSpec], *,
           fleet: ListenAddress | None = None, control_port: int = 0, metrics_port: int = 0,
           timeouts: Timeouts | None = None) -> Federation:
        """Start a fresh SuperLink, the metrics exporter, register every site's key and start
        its daemon, wait until all are online. With no ``sites`` this is the coordinator's
        part alone (sites on other hosts dial ``fleet``; register them with
        :meth:`register`). On any failure everything started is stopped."""
        fed = cls.new(workdir, pki, fleet=fleet, control_port=control_port, timeouts=timeouts)
        fed.reset_state()
        try:
            fed.start_superlink()
            fed.start_exporter(metrics_port or free_port())
            for site in sites:
                fed.register(pki.site(site.name))
            for site in sites:
                fed.start_site(site)
            fed.wait_nodes_online(len(sites))
        except BaseException:
            fed.down()
            raise
        return fed

    @classmethod
    def load(cls, workdir: Path, timeouts: Timeouts | None = None) -> Federation:
        path = workdir / STATE_FILE
        if not path.is_file():
            raise no_federation(workdir)
        state = FederationState.from_json(json.loads(path.read_text()))
        return cls(state, Pki(Path(state.workdir) / "pki"), timeouts or Timeouts())

    def save(self) -> None:
        write_json(self.workdir / STATE_FILE, asdict(self.state))

    def reload(self) -> None:
        """Re-read the state file (another command may have written it)."""
        path = self.workdir / STATE_FILE
        if path.is_file():
            self.state = FederationState.from_json(json.loads(path.read_text()))

    # ---------------------------------------------------------------- where
    @property
    def workdir(self) -> Path:
        return Path(self.state.workdir)

    @property
    def address(self) -> str:
        """The fleet address: what sites dial."""
        return str(self.state.fleet)

    @property
    def control_address(self) -> str:
        """Flower's own listener (Control and Runtime APIs), on 127.0.0.1."""
        return str(self.state.control)

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def runs_dir(self) -> Path:
        return self.workdir / "runs"

    @property
    def apps_dir(self) -> Path:
        return self.workdir / "apps"

    @property
    def database(self) -> Path:
        return self.workdir / "state" / DATABASE

    @functools.cached_property
    def control(self) -> Control:
        """The ``flwr`` CLI against this SuperLink's Control API (FLWR_HOME in the
        workdir)."""
        return Control(ControlConnection(self.state.control, self.pki.ca_cert), self.flwr_home,
                       timeout_s=self.timeouts.cli_call, cwd=self.workdir,
                       source=f"{self.workdir / STATE_FILE}: control_port")

    def env(self) -> dict[str, str]:
        return child_env({"FLWR_HOME": str(self.flwr_home)})

    # ---------------------------------------------------------------- processes
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        return self.procs.start(name, argv, env=env or self.env(), cwd=self.workdir)

    def reset_state(self) -> None:
        """Forget earlier node registrations and runs: a fresh federation each start."""
        for stale in (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm"):
            (self.workdir / "state" / stale).unlink(missing_ok=True)
        (self.workdir / "state" / "node-ids.json").unlink(missing_ok=True)

    def superlink_argv(self) -> list[str]:
        return [
            sys.executable, "-m", "fedpacs.server.superlink",  # flower-superlink, see there
            "--ssl-ca-certfile", str(self.pki.ca_cert),
            "--ssl-certfile", str(self.pki.server_cert),
            "--ssl-keyfile", str(self.pki.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str(self.database),
            "--host", CONTROL_HOST, "--port", str(self.state.control_port),
            "--fleet-address", self.address,
        ]

    def start_superlink(self, *, fresh_metrics: bool = True) -> Proc:
        """Start the SuperLink (both listeners); its ServerApps write Prometheus values to
        a folder the metrics exporter serves (see fedpacs.common.telemetry), emptied first
        unless ``fresh_metrics`` is False (a restart)."""
        missing = missing_hosts(self.pki, [self.state.fleet_host])
        if missing:
            raise ConfigError(str(self.pki.server_cert), [FieldError(
                "--fleet-address", "a host the SuperLink's TLS certificate names (sites "
                "check it)", f"{missing[0]} (not a SAN of the certificate)",
                f"`fedpacs provision init --dir {self.pki.root} --host {missing[0]}` "
                "re-issues it from the same CA")])
        self.database.parent.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)  # `run start --runs-dir` expects it
        write_flwr_home(self.flwr_home, address=self.control_address, ca_cert=self.pki.ca_cert)
        metrics = fresh_dir(self.metrics_dir) if fresh_metrics or not self.metrics_dir.is_dir() \
            else self.metrics_dir
        env = self.env() | {MULTIPROC_ENV: str(metrics), RUNS_DIR_ENV: str(self.runs_dir)}
        proc = self._start(SUPERLINK, self.superlink_argv(), env)
        self.state.superlink_pid = proc.pid
        self.save()
        fleet, control = self.state.fleet, self.state.control
        wait_until(f"SuperLink listening on {control} (control) and {fleet} (fleet)",
                   lambda: port_open(control.host, control.port)
                   and port_open(fleet.host, fleet.port),
                   timeout_s=self.timeouts.superlink_start,
                   alive=lambda: self.check_alive([SUPERLINK]))
        return proc

    def restart_superlink(self) -> Proc:
        """Start the SuperLink again after it died, on its existing database (node
        registrations and runs are kept) and the same addresses; the exporter too when it
        is gone. Refuses when the SuperLink still runs or has no database."""
        errs = []
        if process_alive(self.state.superlink_pid):
            errs.append(FieldError("superlink", "a SuperLink that is gone (killed or "
                                   "crashed)", f"pid {self.state.superlink_pid}, running",
                                   "nothing to restart; `fedpacs federation down` stops it"))
        if not self.database.is_file():
            errs.append(FieldError("database", f"the SuperLink's database {self.database}",
                                   "no such file", "start a new federation with `fedpacs "
                                   "federation up`"))
        if errs:
            raise ConfigError(str(self.workdir / STATE_FILE), errs)
        proc = self.start_superlink(fresh_metrics=False)
        if self.state.metrics_port and not process_alive(self.state.exporter_pid):
            self.start_exporter(self.state.metrics_port)
        return proc

    @property
    def metrics_dir(self) -> Path:
        return self.workdir / "server-metrics"

    def start_exporter(self, port: int) -> Proc:
        """Serve what the short-lived ServerApp processes write, on 127.0.0.1:``port``."""
        proc = self._start(EXPORTER, [tool("fedpacs"), "metrics", "serve", "--dir",
                                      str(self.metrics_dir), "--port", str(port)])
        self.state.exporter_pid, self.state.metrics_port = proc.pid, port
        self.save()
        return proc

    def start_site(self, site: SiteSpec, *, keys: SiteKeys | None = None,
                   max_wait_s: float | None = None) -> Proc:
        """Start a site daemon (``fedpacs site start``), which validates the site config and
        runs the site's SuperNode (and serves its metrics when ``site.metrics_port``); it
        dials the fleet address, as a site on another host does."""
        keys = keys or self.pki.site(site.name)
        argv = [
            tool("fedpacs"), "site", "start",
            "--config", str(site.config.resolve()),
            "--superlink", self.address,
            "--root-certificates", str(self.pki.ca_cert),
            "--auth-key", str(keys.private_key),
            "--runtime-port", str(free_port(CONTROL_HOST)),
            "--state-dir", str(self.workdir / "site-state" / site.name),
            "--metrics-port", str(site.metrics_port),
        ]
        if max_wait_s is not None:
            argv += ["--max-wait", str(max_wait_s)]
        proc = self._start(site_proc_name(site.name), argv)
        self.state.sites[site.name] = SiteState(str(site.config.resolve()), site.task, proc.pid,
                                                site.metrics_port)
        self.save()
        return proc

    def stop_site(self, name: str) -> None:
        """Stop one site daemon (by PID, its SuperNode and ClientApps with it)."""
        site = self.state.sites.get(name)
        if site is None or not site.pid:
            return
        mine = [p for p in self.procs.procs if p.pid == site.pid]
        if mine:
            self.procs.stop(mine[0], grace_s=self.timeouts.stop_grace)
        else:
            stop_group(site.pid, grace_s=self.timeouts.stop_grace)
        site.pid = 0
        self.save()

    def gone(self, names: Sequence[str] | None = None) -> list[Gone]:
        """The processes of this federation (of ``names``; default all) that are gone."""
        out = []
        for name, pid in self.state.pids().items():
            if (names is None or name in names) and not process_alive(pid):
                proc = next((p for p in self.procs.procs if p.pid == pid), None)
                code = proc.popen.poll() if proc is not None else None
                out.append(Gone(name, pid, "?" if code is None else code,
                                self.log_dir / f"{name}.log"))
        return out

    def check_alive(self, names: Sequence[str] | None = None, *,
                    fatal_only: bool = False) -> list[Gone]:
        """Raise ProcessError naming the first process of ``names`` (default: all) that is
        gone, with its log's tail. With ``fatal_only`` only a :data:`FATAL` one (the
        SuperLink) raises: the others gone are returned (a run goes on without a site
        daemon, or the exporter, while Flower still runs it)."""
        dead = self.gone(names)
        fatal = [g for g in dead if not fatal_only or g.name in FATAL]
        if fatal:
            raise fatal[0].error()
        return dead

    def down(self) -> list[int]:
        """Stop every process of the federation by PID (process group); returns the PIDs."""
        pids = list(self.state.pids().values())
        for name in list(self.state.sites):
            self.stop_site(name)
        for pid in (self.state.exporter_pid, self.state.superlink_pid):
            stop_group(pid, grace_s=self.timeouts.stop_grace)
        self.procs.stop_all(grace_s=self.timeouts.stop_grace)  # reap our own children
        (self.workdir / STATE_FILE).unlink(missing_ok=True)
        return pids

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---------------------------------------------------------------- site keys
    @property
    def node_ids_file(self) -> Path:
        return self.workdir / "state" / "node-ids.json"

    def node_ids(self) -> dict[str, int]:
        """Site name -> node id of its registered key (as registered by this federation)."""
        f = self.node_ids_file
        return {k: int(v) for k, v in json.loads(f.read_text()).items()} if f.is_file() else {}

    def register(self, site: SiteKeys) -> int:
        """Register a site's public key so its SuperNode may connect; returns its node id.
        A key in the revocation log is refused."""
        if is_revoked(self.pki, site.public_key):
            raise AuthError(f"{site.public_key}: expected a key that was never revoked, got one "
                            f"in {self.pki.root / 'revoked.json'}. Fix: `fedpacs federation "
                            f"rotate {site.name}` issues and registers a new key")
        node_id = self.control.register(site.public_key, site.name)
        write_json(self.node_ids_file, self.node_ids() | {site.name: node_id})
        return node_id

    def register_site(self, name: str, *, public_key: Path | None = None) -> int:
        """Register site ``name`` (on this or another host) with ``public_key`` (default:
        the key provisioned in WORKDIR/pki/sites/NAME/); returns its node id."""
        check_site_name(name)
        keys = self.pki.site(name)
        key = public_key or keys.public_key
        if not key.is_file():
            raise ConfigError(f"federation register {name}", [FieldError(
                "--public-key", "the site's SuperNode public key (OpenSSH)", f"{key}: no such "
                "file", f"`fedpacs provision add-site {name} --dir {self.pki.root}` creates "
                "one, or pass --public-key FILE")])
        return self.register(replace(keys, public_key=key.resolve()))

    def list_nodes(self) -> list[dict[str, Any]]:
        return self.control.list_nodes()

    def wait_nodes_online(self, count: int) -> None:
        def online() -> bool:
            nodes = self.list_nodes()
            return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online") >= count

        wait_until(f"{count} SuperNode(s) online", online, timeout_s=self.timeouts.nodes_online,
                   interval_s=1.0, alive=self.check_alive)

    def revoke(self, name: str) -> int:
        """Revoke one site: the SuperLink forgets its key (its SuperNode is refused from
        now on), its daemon is stopped and its key files are retired; other sites keep
        running. Returns the node id."""
        ids = self.node_ids()
        if name not in ids:
            raise ConfigError(str(self.workdir), [FieldError(
                "site", "a site registered by this federation "
                f"({', '.join(sorted(ids)) or 'none'})", repr(name), "name a registered site")])
        node_id = ids.pop(name)
        self.control.unregister(node_id)
        write_json(self.node_ids_file, ids)
        self.stop_site(name)
        self.state.sites.pop(name, None)
        self.save()
        if self.pki.site(name).public_key.is_file():  # (a key registered from elsewhere,
            revoke_site_key(self.pki, name)         # `register --public-key`, is not here)
        return node_id

    def rotate(self, name: str) -> Proc:
        """Give one site a new key: revoke the old one, register the new one and restart the
        site's daemon with it (when this federation runs it). Returns the new daemon."""
        site = self.state.sites.get(name)
        if site is None:
            raise ConfigError(str(self.workdir), [FieldError(
                "site", f"one of {', '.join(sorted(self.state.sites)) or 'none'}", repr(name),
                "name a site of this federation")])
        online = sum(1 for s in self.state.sites.values() if s.pid)
        self.revoke(name)
        keys = create_site_key(self.pki, name)
        self.register(keys)
        proc = self.start_site(SiteSpec(name, Path(site.config), site.task, site.metrics_port),
                               keys=keys)
        self.wait_nodes_online(online)
        return proc

    # ---------------------------------------------------------------- runs
    def check_run(self, cfg: RunConfig) -> None:
        """Every problem of ``cfg`` on this federation (ConfigError), before anything starts.
        Min-sites is checked against this host's sites when every registered site is one
        of them (sites on other hosts serve tasks this host does not know)."""
        errs = cfg.validate()
        serving = sorted(n for n, s in self.state.sites.items() if s.task == cfg.task)
        local_only = set(self.node_ids()) <= set(self.state.sites)
        if self.state.sites and local_only and cfg.min_sites > len(serving):
            errs.append(FieldError("min-sites", f"<= {len(serving)} (sites serving task "
                                   f"{cfg.task!r}: {', '.join(serving) or 'none'})",
                                   str(cfg.min_sites), "lower min-sites or add sites"))
        if errs:
            raise ConfigError("run config", errs)

    def prepare_run(self, cfg: RunConfig) -> tuple[Path, Path]:
        """Validate ``cfg`` against the federation, give it a run directory with its
        server-side settings (server.json) and write its app, unsigned; returns
        (app folder, run directory)."""
        self.check_run(cfg)
        prep = ctl.prepare_run(cfg, runs_dir=self.runs_dir, apps_dir=self.apps_dir,
                               artifact_key=self.pki.artifact_key)
        return prep.app_dir, prep.run_dir

    def start_run(self, cfg: RunConfig) -> tuple[int, Path]:
        """Check ``cfg`` against the federation, then start it as `run start --control`
        does (signed with the app-signing key, recorded in RUN_DIR/run.json); returns
        (run id, run directory)."""
        self.check_run(cfg)
        started = ctl.start_run(control=self.control, cfg=cfg, runs_dir=self.runs_dir,
                                apps_dir=self.apps_dir, app_key=self.pki.app_key,
                                artifact_key=self.pki.artifact_key)
        self._remember(started.run_id, started.run_dir)
        return started.run_id, started.run_dir

    def resume_run(self, run_dir: Path) -> ResumedRun:
        """Continue a stopped run of this federation after its last completed round."""
        resumed = ctl.resume_run(control=self.control, run_dir=run_dir, apps_dir=self.apps_dir,
                                 app_key=self.pki.app_key, runs_dir=self.runs_dir)
        self._remember(resumed.run_id, resumed.run_dir)
        return resumed

    def _remember(self, run_id: int, run_dir: Path) -> None:
        self.reload()
        self.state.runs[str(run_id)] = str(run_dir)
        self.save()

    def submit(self, app_dir: Path) -> int:
        """Hand an app folder to the SuperLink as a run; returns the run id."""
        return self.control.submit(app_dir)

    def find_run_dir(self, run_id: int) -> Path | None:
        path = self.state.runs.get(str(run_id))
        if path is not None:
            return Path(path)
        if self.runs_dir.is_dir():
            try:
                return ctl.find_run_dir(self.runs_dir, run_id)
            except ConfigError:
                return None
        return None

    def run_dir(self, run_id: int) -> Path:
        path = self.find_run_dir(run_id)
        if path is None:
            raise ConfigError(str(self.workdir), [FieldError(
                "run id", "a run started on this federation "
                f"({', '.join(self.state.runs) or 'none'})", str(run_id),
                "use the id `fedpacs run start` printed")])
        return path

    def flower_status(self, run_id: int) -> str:
        return self.control.flower_run(run_id).status

    def stop_run(self, run_id: int) -> None:
        self.run_dir(run_id)  # refuses a run of another federation
        self.control.stop(run_id)

    def logs(self, run_id: int) -> str:
        return self.control.logs(run_id)

    def _check_run_alive(self, run_dir: Path, reported: set[int],
                         on_gone: Callable[[Gone], None] | None) -> None:
        """During a run: a SuperLink gone marks the run interrupted and raises; a site
        daemon or the exporter gone is reported once and the run goes on."""
        try:
            dead = self.check_alive(fatal_only=True)
        except ProcessError as err:
            first = str(err).splitlines()[0]
            ctl.mark_interrupted(run_dir, f"interrupted: {first}; restart it with `fedpacs "
                                 f"federation restart-superlink --workdir {self.workdir}`")
            raise
        for g in dead:
            if g.pid not in reported:
                reported.add(g.pid)
                log.warning("%s; the run goes on while Flower runs it", g.describe())
                if on_gone:
                    on_gone(g)

    def watch(self, run_id: int, *, timeout_s: float,
              on_round: Callable[[dict[str, Any]], None] | None = None,
              on_gone: Callable[[Gone], None] | None = None) -> str:
        """Follow a run until Flower says it finished (or the deadline passes, then it is
        stopped and marked interrupted): ``on_round`` gets each round record as it appears,
        ``on_gone`` each site daemon (or the exporter) that died meanwhile (the run goes on
        while Flower runs it); when the SuperLink dies the run is marked interrupted and
        ProcessError raised. Returns Flower's final status (status.json settled to it)."""
        run_dir = self.run_dir(run_id)
        seen, next_status = 0, 0.0
        flower = ctl.FlowerRun(run_id, "pending")
        deadline = time.monotonic() + timeout_s
        reported: set[int] = set()

        def report() -> None:
            nonlocal seen
            rounds = read_rounds(run_dir)
            for r in rounds[seen:]:
                if on_round:
                    on_round(r)
            seen = max(seen, len(rounds))

        while True:
            self._check_run_alive(run_dir, reported, on_gone)
            report()
            if time.monotonic() >= next_status:
                try:
                    flower = self.control.flower_run(run_id)
                except ProcessError:  # the SuperLink may have died since the check
                    self._check_run_alive(run_dir, reported, on_gone)
                    raise
                next_status = time.monotonic() + self.timeouts.status_every
                if flower.finished:
                    report()
                    break
            if time.monotonic() >= deadline:
                self.control.stop(run_id)
                ctl.mark_interrupted(run_dir, f"interrupted: the run did not finish within "
                                     f"{timeout_s:.0f}s and was stopped")
                raise DeadlineError(f"run {run_id} did not finish within {timeout_s:.0f}s; "
                                    f"logs in {self.log_dir}")
            time.sleep(1.0)
        ctl.status_of(flower, run_id=run_id, run_dir=run_dir)  # settles status.json
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"run-{run_id}.log").write_text(self.logs(run_id), encoding="utf-8")
        return flower.status
