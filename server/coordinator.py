"""The coordinator: bring a federation up or down, and start, watch and stop runs on it.

A federation's state (SuperLink address, PIDs, run directories) lives in
``WORKDIR/federation.json``, so every command is a short-lived process.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpacs.common.artifacts import write_json
from fedpacs.common.config import RunConfig, load_site_config
from fedpacs.common.errors import ConfigError, FieldError, ProcessError
from fedpacs.deploy.federation import LocalFederation, write_app
from fedpacs.deploy.pki import Pki, create_site_key, provision
from fedpacs.deploy.procs import child_env, free_port, tool

STATE_FILE = "federation.json"


@dataclass
class FederationState:
    workdir: str
    port: int
    superlink_pid: int
    site_pids: dict[str, int]
    site_configs: dict[str, str]
    metrics: dict[str, str] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> run directory
    exporter_pid: int = 0

    @classmethod
    def load(cls, workdir: Path) -> FederationState:
        path = workdir / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(str(workdir), [FieldError(
                "workdir", f"a federation started by `fedpacs federation up` ({STATE_FILE})",
                "no federation state", "run `fedpacs federation up --workdir DIR` first")]
            ) from None

    def save(self) -> None:
        write_json(Path(self.workdir) / STATE_FILE, asdict(self))

    def federation(self) -> LocalFederation:
        work = Path(self.workdir)
        return LocalFederation(work, Pki(work / "pki"), port=self.port)


def federation_up(workdir: Path, sites: dict[str, Path], *, metrics_ports: dict[str, int]
                  ) -> FederationState:
    """Start a SuperLink (TLS, node auth) and one site daemon per site config, detached."""
    if (workdir / STATE_FILE).is_file():
        raise ConfigError(str(workdir), [FieldError(
            "workdir", "no running federation", "a federation.json",
            "run `fedpacs federation down` first, or use another --workdir")])
    for cfg in sites.values():
        load_site_config(cfg)  # refuse bad site files before starting anything
    work = workdir.resolve()
    pki = provision(work / "pki", sites=list(sites))
    fed = LocalFederation(work, pki)
    fed.reset_state()
    server_port = free_port()
    try:
        fed.start_superlink(metrics_dir=work / "server-metrics")
        exporter = fed.procs.start("metrics-exporter", [
            tool("fedpacs"), "metrics", "serve", "--dir", str(work / "server-metrics"),
            "--port", str(server_port)], env=child_env())
        for name in sites:
            fed.register(pki.site(name))
        for name, cfg in sites.items():
            fed.start_supernode(pki.site(name), site_config=cfg,
                                metrics_port=metrics_ports.get(name, 0))
        fed.wait_nodes_online(len(sites))
    except BaseException:
        fed.stop()
        raise
    assert fed.superlink is not None
    state = FederationState(
        workdir=str(work), port=fed.port, superlink_pid=fed.superlink.pid,
        site_pids={n: p.pid for n, p in fed.nodes.items()},
        site_configs={n: str(p.resolve()) for n, p in sites.items()},
        metrics={"server": f"http://127.0.0.1:{server_port}/metrics"} | {
            n: f"http://127.0.0.1:{p}/metrics" for n, p in metrics_ports.items() if p},
        exporter_pid=exporter.pid)
    state.save()
    return state


def federation_down(workdir: Path, *, grace_s: float = 10.0) -> list[int]:
    """Stop every process of the federation by PID (process group); returns the PIDs."""
    state = FederationState.load(workdir)
    pids = [*state.site_pids.values(), state.superlink_pid, state.exporter_pid]
    pids = [p for p in pids if p]
    for pid in pids:
        _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(process_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        _kill_group(pid, signal.SIGKILL)
    (workdir / STATE_FILE).unlink()
    return pids


def _stop_pid(pid: int, grace_s: float = 10.0) -> None:
    _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.2)
    _kill_group(pid, signal.SIGKILL)


def revoke_site(workdir: Path, name: str) -> int:
    """Revoke one site of a running federation: the SuperLink forgets its key, its daemon
    stops, its key files are retired. Other sites keep running. Returns the node id."""
    state = FederationState.load(workdir)
    node_id = state.federation().revoke(name)
    pid = state.site_pids.pop(name, 0)
    if pid:
        _stop_pid(pid)
    state.save()
    return node_id


def rotate_site(workdir: Path, name: str) -> int:
    """Give one site a new key: revoke the old one, register the new one and restart the
    site's daemon with it. Other sites keep running. Returns the new daemon's PID."""
    state = FederationState.load(workdir)
    if name not in state.site_configs:
        raise ConfigError(str(workdir), [FieldError(
            "site", f"one of {', '.join(sorted(state.site_configs))}", repr(name),
            "name a site of this federation")])
    revoke_site(workdir, name)
    state = FederationState.load(workdir)
    fed = state.federation()
    keys = create_site_key(fed.pki, name)
    fed.register(keys)
    port = int(state.metrics.get(name, ":0/").rsplit(":", 1)[1].split("/")[0])
    proc = fed.start_supernode(keys, site_config=Path(state.site_configs[name]),
                               metrics_port=port)
    fed.wait_nodes_online(len(state.site_pids) + 1)
    state.site_pids[name] = proc.pid
    state.save()
    return proc.pid


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False


def _kill_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_run(workdir: Path, cfg: RunConfig) -> tuple[int, Path]:
    """Validate ``cfg`` against the federation, then submit it; returns (run id, run dir)."""
    state = FederationState.load(workdir)
    errs = cfg.validate()
    tasks = {n: load_site_config(Path(p)).task for n, p in state.site_configs.items()}
    serving = [n for n, t in tasks.items() if t == cfg.task]
    if cfg.min_sites > len(serving):
        errs.append(FieldError("min-sites", f"<= {len(serving)} (sites serving task "
                               f"{cfg.task!r}: {', '.join(serving) or 'none'})",
                               str(cfg.min_sites), "lower min-sites or add sites"))
    if errs:
        raise ConfigError("run config", errs)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
    run_dir = Path(state.workdir) / "runs" / stamp
    cfg = replace(cfg, run_dir=str(run_dir),
                  signing_key=cfg.signing_key or str(Pki(Path(state.workdir) / "pki").signing_key))
    fed = state.federation()
    run_id = fed.start_run(write_app(Path(state.workdir) / "apps" / stamp, cfg))
    state = FederationState.load(workdir)  # re-read: another command may have written
    state.runs[str(run_id)] = str(run_dir)
    state.save()
    return run_id, run_dir


def run_status(workdir: Path, run_id: int) -> dict[str, Any]:
    """Flower's status of the run plus fedpacs' round progress and latest metrics."""
    state = FederationState.load(workdir)
    out: dict[str, Any] = {"run_id": run_id, "status": state.federation().run_status(run_id)}
    run_dir = state.runs.get(str(run_id))
    if run_dir:
        out["run_dir"] = run_dir
        try:
            st = json.loads((Path(run_dir) / "status.json").read_text())
            out.update(round=st.get("round"), rounds=st.get("rounds"))
            rounds = json.loads((Path(run_dir) / "metrics.json").read_text())["rounds"]
            out["latest"] = {k: rounds[-1].get(k) for k in ("heldout", "train", "evaluate")}
        except (OSError, ValueError, KeyError, IndexError):
            pass
    return out


def stop_run(workdir: Path, run_id: int) -> None:
    state = FederationState.load(workdir)
    if str(run_id) not in state.runs:
        raise ProcessError(f"run {run_id} was not started on the federation in {workdir}")
    state.federation().stop_run(run_id)


def run_logs(workdir: Path, run_id: int) -> str:
    return FederationState.load(workdir).federation().logs(run_id)
