"""A local federation on loopback: a SuperLink (TLS, node auth, on-disk state) and
SuperNodes, driven through Flower's own executables and ``flwr`` CLI.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpacs.common.config import RunConfig
from fedpacs.common.errors import DeadlineError, ProcessError
from fedpacs.common.signing import sign_app
from fedpacs.common.telemetry import MULTIPROC_ENV, fresh_dir
from fedpacs.deploy.pki import Pki, SiteKeys, create_site_key, revoke_site_key
from fedpacs.deploy.procs import Proc, ProcessSet, child_env, free_port, port_open, tool, wait_until

CONNECTION = "fedpacs"
APP_PUBLISHER = "fedpacs"
APP_NAME = "fedpacs-app"


@dataclass(frozen=True)
class Timeouts:
    """Deadlines of the launcher (seconds)."""

    superlink_start: float = 60.0
    cli_call: float = 120.0
    nodes_online: float = 120.0
    stop_grace: float = 10.0


def write_flwr_home(home: Path, *, address: str, ca_cert: Path) -> None:
    """A Flower config (FLWR_HOME/config.toml) with one TLS connection to our SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert.resolve()}"\n', encoding="utf-8")


def _toml_value(v: bool | int | float | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(v)


def write_app(app_dir: Path, cfg: RunConfig) -> Path:
    """The Flower App for a run: components point at the installed fedpacs package, and the
    run config carries the RunConfig (no site paths; sites read their own config files)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"',
        'description = "fedpacs federated run (components installed with fedpacs)"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", f'publisher = "{APP_PUBLISHER}"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedpacs.server.app:app"',
        'clientapp = "fedpacs.client.app:app"', "", "[tool.flwr.app.config]",
    ]
    lines += [f'"{k}" = {_toml_value(v)}' for k, v in cfg.to_flat().items()]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return app_dir


@dataclass
class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1 with TLS and SuperNode authentication."""

    workdir: Path
    pki: Pki
    timeouts: Timeouts = field(default_factory=Timeouts)
    host: str = "127.0.0.1"
    port: int = 0
    procs: ProcessSet = field(init=False)
    superlink: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs = ProcessSet(self.workdir / "logs")
        self.port = self.port or free_port(self.host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def env(self) -> dict[str, str]:
        return child_env({"FLWR_HOME": str(self.flwr_home)})

    # ---------------------------------------------------------------- SuperLink
    def reset_state(self) -> None:
        """Forget earlier node registrations and runs: a fresh federation each start."""
        for stale in ("superlink.db", "superlink.db-wal", "superlink.db-shm"):
            (self.workdir / "state" / stale).unlink(missing_ok=True)

    def start_superlink(self, *, metrics_dir: Path | None = None) -> Proc:
        """Start the SuperLink; with ``metrics_dir``, its ServerApps write Prometheus values
        there (see fedpacs.common.telemetry) for an exporter that outlives them."""
        state = self.workdir / "state"
        state.mkdir(parents=True, exist_ok=True)
        argv = [
            tool("flower-superlink"),
            "--ssl-ca-certfile", str(self.pki.ca_cert),
            "--ssl-certfile", str(self.pki.server_cert),
            "--ssl-keyfile", str(self.pki.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str(state / "superlink.db"),
            "--host", self.host, "--port", str(self.port),
        ]
        write_flwr_home(self.flwr_home, address=self.address, ca_cert=self.pki.ca_cert)
        env = self.env()
        if metrics_dir is not None:
            env[MULTIPROC_ENV] = str(fresh_dir(metrics_dir))
        self.superlink = self.procs.start("superlink", argv, env=env, cwd=self.workdir)
        wait_until(f"SuperLink listening on {self.address}",
                   lambda: port_open(self.host, self.port),
                   timeout_s=self.timeouts.superlink_start,
                   alive=lambda: self.procs.check_alive(["superlink"]))
        return self.superlink

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

    @property
    def node_ids_file(self) -> Path:
        return self.workdir / "state" / "node-ids.json"

    def node_ids(self) -> dict[str, int]:
        """Site name -> node id of its registered key (as registered by this federation)."""
        f = self.node_ids_file
        return {k: int(v) for k, v in json.loads(f.read_text()).items()} if f.is_file() else {}

    def register(self, site: SiteKeys) -> dict[str, Any]:
        """Register a site's public key so its SuperNode may connect."""
        res = dict(self.flwr_json("supernode", "register", str(site.public_key), CONNECTION,
                                  "--name", site.name))
        ids = self.node_ids() | {site.name: int(res["node-id"])}
        self.node_ids_file.parent.mkdir(parents=True, exist_ok=True)
        self.node_ids_file.write_text(json.dumps(ids, indent=1))
        return res

    def unregister(self, node_id: int) -> None:
        self.flwr("supernode", "unregister", str(node_id), CONNECTION)

    def revoke(self, name: str) -> int:
        """Revoke one site: the SuperLink forgets its key (its SuperNode is refused from
        now on), its daemon is stopped and its key files are retired. Returns the node id."""
        ids = self.node_ids()
        if name not in ids:
            raise ProcessError(f"site {name!r} was not registered by this federation "
                               f"(registered: {', '.join(sorted(ids)) or 'none'})")
        node_id = ids.pop(name)
        self.unregister(node_id)
        self.node_ids_file.write_text(json.dumps(ids, indent=1))
        proc = self.nodes.pop(name, None)
        if proc is not None:
            self.procs.stop(proc, grace_s=self.timeouts.stop_grace)
            self.procs.procs.remove(proc)
        revoke_site_key(self.pki, name)
        return node_id

    def rotate(self, name: str) -> SiteKeys:
        """Revoke one site's key and register a new one for it; returns the new keys (the
        site restarts its daemon with the new private key)."""
        self.revoke(name)
        keys = create_site_key(self.pki, name)
        self.register(keys)
        return keys

    def list_nodes(self) -> list[dict[str, Any]]:
        return list(self.flwr_json("supernode", "list", CONNECTION).get("nodes", []))

    # ---------------------------------------------------------------- SuperNodes
    def start_supernode(self, site: SiteKeys, *, site_config: Path,
                        max_wait_s: float | None = None, metrics_port: int = 0) -> Proc:
        """Start the site daemon (``fedpacs site start``), which validates the site config
        and runs the site's SuperNode (and serves its metrics when ``metrics_port``)."""
        argv = [
            tool("fedpacs"), "site", "start",
            "--config", str(site_config.resolve()),
            "--superlink", self.address,
            "--root-certificates", str(self.pki.ca_cert),
            "--auth-key", str(site.private_key),
            "--runtime-port", str(free_port(self.host)),
            "--state-dir", str(self.workdir / "site-state" / site.name),
            "--metrics-port", str(metrics_port),
        ]
        if max_wait_s is not None:
            argv += ["--max-wait", str(max_wait_s)]
        proc = self.procs.start(f"supernode-{site.name}", argv, env=self.env(), cwd=self.workdir)
        self.nodes[site.name] = proc
        return proc

    def wait_nodes_online(self, count: int) -> None:
        def online() -> bool:
            nodes = self.list_nodes()
            return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online") >= count

        wait_until(f"{count} SuperNode(s) online", online, timeout_s=self.timeouts.nodes_online,
                   interval_s=1.0, alive=self.procs.check_alive)

    # ---------------------------------------------------------------- runs
    def start_run(self, app_dir: Path, *, sign: bool = True) -> int:
        """Sign the app with the coordinator's key (sites refuse unsigned apps), run it."""
        if sign:
            sign_app(app_dir, self.pki.signing_key)
        res = self.flwr_json("run", str(app_dir), CONNECTION)
        if not res.get("success"):
            raise ProcessError(f"flwr run refused the app: {res}")
        return int(res["run-id"])

    def run_status(self, run_id: int) -> str:
        res = self.flwr_json("list", "--run-id", str(run_id), CONNECTION)
        runs = res.get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def stop_run(self, run_id: int) -> None:
        self.flwr("stop", str(run_id), CONNECTION)

    def logs(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show")

    def stop(self) -> None:
        self.procs.stop_all(grace_s=self.timeouts.stop_grace)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
