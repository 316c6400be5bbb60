"""One federation, persisted: a SuperLink (TLS, SuperNode authentication, on-disk state),
a metrics exporter and the site daemons this host runs, driven through Flower's own
executables and ``flwr`` CLI.

Every command that acts on a federation is a short-lived process: what it needs lives in
``WORKDIR/federation.json`` (addresses, PIDs, each site's config file and task, runs), so
``fedpacs federation up``, ``run start``, ``federation rotate`` and ``fedpacs demo`` all
go through this one class: the demo is ``up`` + ``start_run`` + ``watch`` + ``down``.
"""

from __future__ import annotations

import json
import subprocess
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
from fedpacs.common.signing import sign_app
from fedpacs.common.telemetry import MULTIPROC_ENV, fresh_dir
from fedpacs.server.coordinator.bundle import write_app
from fedpacs.server.coordinator.pki import (
    Pki,
    SiteKeys,
    create_site_key,
    is_revoked,
    revoke_site_key,
)
from fedpacs.server.rundir import RUNS_DIR_ENV, read_rounds, read_status, write_server_side

CONNECTION = "fedpacs"
STATE_FILE = "federation.json"
SUPERLINK = "superlink"
EXPORTER = "metrics-exporter"
FINISHED = "finished:completed"


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
    host: str
    port: int
    superlink_pid: int = 0
    exporter_pid: int = 0
    metrics_port: int = 0
    sites: dict[str, SiteState] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> run directory

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FederationState:
        sites = {k: SiteState(**v) for k, v in raw.pop("sites", {}).items()}
        return cls(**raw, sites=sites)

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


def write_flwr_home(home: Path, *, address: str, ca_cert: Path) -> None:
    """A Flower config (FLWR_HOME/config.toml) with one TLS connection to our SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert.resolve()}"\n', encoding="utf-8")


def no_federation(workdir: Path) -> ConfigError:
    return ConfigError(str(workdir), [FieldError(
        "workdir", f"a federation started by `fedpacs federation up` ({STATE_FILE})",
        "no federation state", "run `fedpacs federation up --workdir DIR` first")])


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
    def new(cls, workdir: Path, pki: Pki, *, host: str = "127.0.0.1", port: int = 0,
            timeouts: Timeouts | None = None) -> Federation:
        """A federation in ``workdir`` with nothing started; refuses a workdir whose
        federation is still running (a stale state file, its SuperLink gone, is replaced)."""
        work = workdir.resolve()
        path = work / STATE_FILE
        if path.is_file():
            old = FederationState.from_json(json.loads(path.read_text()))
            if process_alive(old.superlink_pid):
                raise ConfigError(str(workdir), [FieldError(
                    "workdir", "no running federation",
                    f"a federation whose SuperLink (pid {old.superlink_pid}) runs",
                    "run `fedpacs federation down` first, or use another --workdir")])
        work.mkdir(parents=True, exist_ok=True)
        state = FederationState(workdir=str(work), host=host, port=port or free_port(host))
        return cls(state, pki, timeouts or Timeouts())

    @classmethod
    def up(cls, workdir: Path, pki: Pki, sites: Sequence[SiteSpec], *, metrics_port: int = 0,
           timeouts: Timeouts | None = None) -> Federation:
        """Start a fresh SuperLink, the metrics exporter, register every site's key and start
        its daemon, wait until all are online. On any failure everything started is stopped."""
        fed = cls.new(workdir, pki, timeouts=timeouts)
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
        return f"{self.state.host}:{self.state.port}"

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def env(self) -> dict[str, str]:
        return child_env({"FLWR_HOME": str(self.flwr_home)})

    # ---------------------------------------------------------------- processes
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        return self.procs.start(name, argv, env=env or self.env(), cwd=self.workdir)

    def reset_state(self) -> None:
        """Forget earlier node registrations and runs: a fresh federation each start."""
        for stale in ("superlink.db", "superlink.db-wal", "superlink.db-shm"):
            (self.workdir / "state" / stale).unlink(missing_ok=True)
        (self.workdir / "state" / "node-ids.json").unlink(missing_ok=True)

    def start_superlink(self) -> Proc:
        """Start the SuperLink; its ServerApps write Prometheus values to a folder the
        metrics exporter serves (see fedpacs.common.telemetry)."""
        state = self.workdir / "state"
        state.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "fedpacs.server.superlink",  # flower-superlink, see there
            "--ssl-ca-certfile", str(self.pki.ca_cert),
            "--ssl-certfile", str(self.pki.server_cert),
            "--ssl-keyfile", str(self.pki.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str(state / "superlink.db"),
            "--host", self.state.host, "--port", str(self.state.port),
        ]
        write_flwr_home(self.flwr_home, address=self.address, ca_cert=self.pki.ca_cert)
        env = self.env() | {MULTIPROC_ENV: str(fresh_dir(self.metrics_dir)),
                            RUNS_DIR_ENV: str(self.runs_dir)}
        proc = self._start(SUPERLINK, argv, env)
        self.state.superlink_pid = proc.pid
        self.save()
        wait_until(f"SuperLink listening on {self.address}",
                   lambda: port_open(self.state.host, self.state.port),
                   timeout_s=self.timeouts.superlink_start,
                   alive=lambda: self.check_alive([SUPERLINK]))
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
        runs the site's SuperNode (and serves its metrics when ``site.metrics_port``)."""
        keys = keys or self.pki.site(site.name)
        argv = [
            tool("fedpacs"), "site", "start",
            "--config", str(site.config.resolve()),
            "--superlink", self.address,
            "--root-certificates", str(self.pki.ca_cert),
            "--auth-key", str(keys.private_key),
            "--runtime-port", str(free_port(self.state.host)),
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

    def check_alive(self, names: Sequence[str] | None = None) -> None:
        """Raise ProcessError naming the first process of this federation that is gone."""
        for name, pid in self.state.pids().items():
            if (names is None or name in names) and not process_alive(pid):
                proc = next((p for p in self.procs.procs if p.pid == pid), None)
                code = proc.popen.poll() if proc is not None else "?"
                log = self.log_dir / f"{name}.log"
                raise ProcessError(f"{name} (pid {pid}) exited with code {code}; log {log}:\n"
                                   f"{tail(log)}")

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

    # ---------------------------------------------------------------- flwr CLI
    def flwr(self, *args: str, timeout_s: float | None = None) -> str:
        """Run the ``flwr`` CLI against this SuperLink; returns stdout or raises ProcessError."""
        argv = [tool("flwr"), *args]
        try:
            res = subprocess.run(argv, env=self.env(), capture_output=True, text=True,
                                 timeout=timeout_s or self.timeouts.cli_call, cwd=self.workdir,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise DeadlineError(f"`flwr {' '.join(args)}` did not finish within "
                                f"{exc.timeout:.0f}s") from exc
        if res.returncode != 0:
            raise ProcessError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}):\n"
                               f"{(res.stdout + res.stderr).strip()[-2000:]}")
        return res.stdout

    def flwr_json(self, *args: str) -> Any:
        out = self.flwr(*args, "--format", "json")
        start = out.find("{")
        try:
            return json.loads(out[start:])
        except json.JSONDecodeError as exc:
            raise ProcessError(f"`flwr {' '.join(args)}` printed no JSON: {out[-500:]}") from exc

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
        res = dict(self.flwr_json("supernode", "register", str(site.public_key), CONNECTION,
                                  "--name", site.name))
        ids = self.node_ids() | {site.name: int(res["node-id"])}
        write_json(self.node_ids_file, ids)
        return int(res["node-id"])

    def list_nodes(self) -> list[dict[str, Any]]:
        return list(self.flwr_json("supernode", "list", CONNECTION).get("nodes", []))

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
        self.flwr("supernode", "unregister", str(node_id), CONNECTION)
        write_json(self.node_ids_file, ids)
        self.stop_site(name)
        self.state.sites.pop(name, None)
        self.save()
        revoke_site_key(self.pki, name)
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
        """Every problem of ``cfg`` on this federation (ConfigError), before anything starts."""
        errs = cfg.validate()
        serving = sorted(n for n, s in self.state.sites.items() if s.task == cfg.task)
        if self.state.sites and cfg.min_sites > len(serving):
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
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
        run_dir = self.runs_dir / stamp
        cfg = replace(cfg, run_dir=str(run_dir), run_name=stamp,
                      artifact_key=cfg.artifact_key or str(self.pki.artifact_key))
        write_server_side(run_dir, cfg.server_side())
        return write_app(self.workdir / "apps" / stamp, cfg), run_dir

    @property
    def runs_dir(self) -> Path:
        return self.workdir / "runs"

    def start_run(self, cfg: RunConfig) -> tuple[int, Path]:
        """``prepare_run``, sign the app with the app-signing key (sites run only apps
        signed by a key they trust), submit it; returns (run id, run directory)."""
        app, run_dir = self.prepare_run(cfg)
        sign_app(app, self.pki.app_key)
        run_id = self.submit(app)
        self.reload()
        self.state.runs[str(run_id)] = str(run_dir)
        self.save()
        return run_id, run_dir

    def submit(self, app_dir: Path) -> int:
        """Hand an app folder to the SuperLink as a run; returns the run id."""
        res = self.flwr_json("run", str(app_dir), CONNECTION)
        if not res.get("success"):
            raise ProcessError(f"flwr run refused the app: {res}")
        return int(res["run-id"])

    def run_dir(self, run_id: int) -> Path:
        path = self.state.runs.get(str(run_id))
        if path is None:
            raise ConfigError(str(self.workdir), [FieldError(
                "run id", "a run started on this federation "
                f"({', '.join(self.state.runs) or 'none'})", str(run_id),
                "use the id `fedpacs run start` printed")])
        return Path(path)

    def flower_status(self, run_id: int) -> str:
        res = self.flwr_json("list", "--run-id", str(run_id), CONNECTION)
        runs = res.get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def run_status(self, run_id: int) -> dict[str, Any]:
        """Flower's status of the run plus fedpacs' round progress and latest metrics."""
        out: dict[str, Any] = {"run_id": run_id, "status": self.flower_status(run_id)}
        run_dir = self.state.runs.get(str(run_id))
        if run_dir:
            out["run_dir"] = run_dir
            st = read_status(Path(run_dir))
            if st:
                out.update(round=st.get("round"), rounds=st.get("rounds"))
            rounds = read_rounds(Path(run_dir))
            if rounds:
                out["latest"] = {k: rounds[-1].get(k) for k in ("heldout", "train", "evaluate")}
        return out

    def stop_run(self, run_id: int) -> None:
        self.run_dir(run_id)  # refuses a run of another federation
        self.flwr("stop", str(run_id), CONNECTION)

    def logs(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show")

    def watch(self, run_id: int, *, timeout_s: float,
              on_round: Callable[[dict[str, Any]], None] | None = None) -> str:
        """Follow a run until Flower says it finished (or the deadline passes, then it is
        stopped): ``on_round`` gets each round record as it appears; raises ProcessError
        when a process of the federation dies. Returns Flower's final status."""
        run_dir = self.run_dir(run_id)
        seen, status, next_status = 0, "pending", 0.0
        deadline = time.monotonic() + timeout_s

        def report() -> None:
            nonlocal seen
            rounds = read_rounds(run_dir)
            for r in rounds[seen:]:
                if on_round:
                    on_round(r)
            seen = max(seen, len(rounds))

        while True:
            self.check_alive()
            report()
            if time.monotonic() >= next_status:
                status = self.flower_status(run_id)
                next_status = time.monotonic() + self.timeouts.status_every
                if status.startswith("finished"):
                    report()
                    break
            if time.monotonic() >= deadline:
                self.flwr("stop", str(run_id), CONNECTION)
                raise DeadlineError(f"run {run_id} did not finish within {timeout_s:.0f}s; "
                                    f"logs in {self.log_dir}")
            time.sleep(1.0)
        (self.log_dir / f"run-{run_id}.log").write_text(self.logs(run_id), encoding="utf-8")
        return status
