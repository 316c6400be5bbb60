"""``fedpacs demo``: a whole federation on loopback with real data, start to finish.

Provisions a CA, a SuperLink TLS certificate and one key per site; starts a SuperLink
(TLS, SuperNode authentication, on-disk state) and one SuperNode per site, each with its
own site config and its own partition of a real data set; runs FedAvg; streams one line
per round; tears everything down by PID; prints where the global model and metrics are.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedpacs.common.config import RunConfig, load_site_config
from fedpacs.common.errors import ConfigError, DeadlineError, FieldError, ProcessError
from fedpacs.common.telemetry import serve_multiprocess
from fedpacs.deploy.federation import LocalFederation, Timeouts, write_app
from fedpacs.deploy.pki import provision
from fedpacs.deploy.procs import free_port

DATA_DIR_ENV = "FEDPACS_DATA_DIR"


@dataclass(frozen=True)
class TaskData:
    format: str
    relpath: str
    batch_size: int
    lr: float
    local_epochs: int


# Where each preset's real data lies under the shared data folder, and its defaults.
DEMO_DATA: dict[str, TaskData] = {
    "hippocampus": TaskData("nifti", "msd_hippocampus_udacity", 4, 3e-3, 2),
    "breastmnist": TaskData("medmnist", "medmnist_breast/breastmnist.npz", 32, 1e-3, 2),
    "pneumoniamnist": TaskData(
        "medmnist", "medmnist_pneumonia/pneumoniamnist_balanced_aksufatih.npz", 32, 1e-3, 1),
    "adrenalmnist3d": TaskData("medmnist", "medmnist_adrenal3d/adrenalmnist3d.npz", 16, 1e-3, 2),
}


@dataclass(frozen=True)
class DemoOptions:
    task: str = "hippocampus"
    sites: int = 3
    rounds: int = 5
    local_epochs: int = 0  # 0: the task's default
    workdir: Path = Path("runs/demo")
    data_dir: Path | None = None  # None: $FEDPACS_DATA_DIR, then ../shared/data
    threads_per_site: int = 1
    timeout_s: float = 1800.0
    seed: int = 0
    secagg: bool = True  # SecAgg+: the server sees only the sum of the sites' updates
    dp_clip: float = 0.0  # > 0: local differential privacy on each site's update


@dataclass(frozen=True)
class DemoResult:
    run_id: int
    run_dir: Path
    final_model: Path
    rounds: list[dict[str, Any]]
    status: str
    seconds: float
    metrics_urls: dict[str, str]


def resolve_data_dir(flag: Path | None) -> Path:
    """Flag, then $FEDPACS_DATA_DIR, then ../shared/data beside the checkout or the cwd."""
    candidates = [flag] if flag else []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]))
    if not candidates:
        candidates += [Path.cwd().parent / "shared" / "data",
                       Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise ConfigError("demo", [FieldError(
        "data-dir", "a folder holding the shared data sets", ", ".join(map(str, candidates)),
        f"pass --data-dir or set ${DATA_DIR_ENV}")])


def site_names(n: int) -> list[str]:
    return [f"site-{chr(ord('a') + i)}" for i in range(n)]


def write_site_configs(folder: Path, *, task: str, data: Path, fmt: str, names: list[str],
                       threads: int, seed: int, trusted_keys: Sequence[Path] = (),
                       require_secagg: bool = True) -> list[Path]:
    """One site file per site: same data set, disjoint partitions (the server never sees it).
    Each site runs only apps signed by ``trusted_keys`` (none: unsigned apps allowed) and,
    with ``require_secagg``, trains only in SecAgg+ runs."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = ", ".join(f'"{k.resolve()}"' for k in trusted_keys)
    security = (f"[security]\nrequire_secagg = {str(require_secagg).lower()}\n"
                + (f"trusted_app_keys = [{keys}]\n" if trusted_keys
                   else "allow_unsigned_apps = true\n"))
    paths = []
    for i, name in enumerate(names):
        p = folder / f"{name}.toml"
        p.write_text(
            f'[site]\nname = "{name}"\ntask = "{task}"\n\n'
            f'[data]\nformat = "{fmt}"\nroot = "{data}"\npartition = {i}\n'
            f"num_partitions = {len(names)}\nholdout_fraction = 0.2\nseed = {seed}\n\n"
            f'[compute]\ndevice = "auto"\nthreads = {threads}\n\n{security}',
            encoding="utf-8")
        load_site_config(p)  # fail here, before any process starts
        paths.append(p)
    return paths


def format_round(r: dict[str, Any], total: int) -> str:
    parts = [f"round {r['round']}/{total}"]
    held = r.get("heldout") or {}
    if "dice-mean" in held:
        per = ", ".join(f"{k[5:]} {v:.3f}" for k, v in held.items()
                        if k.startswith("dice-") and k != "dice-mean" and v is not None)
        parts.append(f"held-out Dice {held['dice-mean']:.3f} ({per})")
    elif "accuracy" in held:
        parts.append(f"held-out accuracy {held['accuracy']:.3f} AUC {held.get('auc') or 0:.3f}")
    train = r.get("train") or {}
    if "train-loss" in train:
        parts.append(f"train loss {train['train-loss']:.3f}")
    sites = r.get("train_sites") or {}
    if sites:
        parts.append("sites " + " ".join(f"{k}:{int(v.get('num-examples', 0))}"
                                         for k, v in sorted(sites.items())))
    sec = r.get("secagg")
    if sec:
        parts.append(f"SecAgg+ sum of {sec['sites_summed']}"
                     + (f" ({sec['sites_dropped']} dropped)" if sec["sites_dropped"] else ""))
    for site, reason in (r.get("rejected") or {}).items():
        parts.append(f"REJECTED {site}: {reason[:120]}")
    return "  ".join(parts)


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((run_dir / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return []


def run_demo(opts: DemoOptions, *, echo: Callable[[str], None] = print,
             on_round: Callable[[dict[str, Any], dict[str, str]], None] | None = None,
             ) -> DemoResult:
    if opts.task not in DEMO_DATA:
        raise ConfigError("demo", [FieldError("task", f"one of {', '.join(DEMO_DATA)}",
                                              repr(opts.task), "choose a demo task")])
    if opts.sites < 1:
        raise ConfigError("demo", [FieldError("sites", ">= 1", str(opts.sites), "use 3")])
    td = DEMO_DATA[opts.task]
    data = resolve_data_dir(opts.data_dir) / td.relpath
    work = opts.workdir.resolve()
    names = site_names(opts.sites)
    run_dir = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    cfg = RunConfig(task=opts.task, rounds=opts.rounds,
                    local_epochs=opts.local_epochs or td.local_epochs, batch_size=td.batch_size,
                    lr=td.lr, min_sites=opts.sites, seed=opts.seed, run_dir=str(run_dir),
                    eval_format=td.format, eval_root=str(data), eval_seed=opts.seed,
                    secagg=opts.secagg, dp_clip=opts.dp_clip)
    problems = cfg.validate()
    if problems:
        raise ConfigError("demo run config", problems)
    pki = provision(work / "pki", sites=names)
    site_files = write_site_configs(work / "sites", task=opts.task, data=data, fmt=td.format,
                                    names=names, threads=opts.threads_per_site, seed=opts.seed,
                                    trusted_keys=[pki.signing_pub], require_secagg=opts.secagg)
    privacy = "SecAgg+" if opts.secagg else "plain FedAvg (secure aggregation off)"
    echo(f"fedpacs demo: {opts.task}, {opts.sites} sites, {opts.rounds} rounds, {privacy}, "
         f"data {data}")
    return run_local_federation(work, dict(zip(names, site_files, strict=True)), cfg,
                                timeout_s=opts.timeout_s, echo=echo, on_round=on_round)


def run_local_federation(work: Path, sites: dict[str, Path], cfg: RunConfig, *,
                         timeout_s: float, echo: Callable[[str], None] = print,
                         on_round: Callable[[dict[str, Any], dict[str, str]], None] | None = None,
                         ) -> DemoResult:
    """Provision, start a SuperLink and one site daemon per site file, run ``cfg`` (with a
    Prometheus endpoint for the server and each site), tear everything down.

    ``on_round(record, metrics_urls)`` is called as each round's record appears.
    """
    names = list(sites)
    site_ports = {name: free_port() for name in names}
    if not cfg.metrics_port:
        cfg = replace(cfg, metrics_port=free_port())
    metrics_urls = {"server": f"http://127.0.0.1:{cfg.metrics_port}/metrics"} | {
        name: f"http://127.0.0.1:{p}/metrics" for name, p in site_ports.items()}
    run_dir = Path(cfg.run_dir)
    pki = provision(work / "pki", sites=names)
    if not cfg.signing_key:
        cfg = replace(cfg, signing_key=str(pki.signing_key))
    echo(f"  workdir {work} (logs in {work / 'logs'})")
    t0 = time.monotonic()
    fed = LocalFederation(work, pki, timeouts=Timeouts())
    fed.reset_state()
    exporter = None
    try:
        fed.start_superlink(metrics_dir=work / "server-metrics")
        exporter, _ = serve_multiprocess(work / "server-metrics", cfg.metrics_port)
        echo(f"  SuperLink up on https://{fed.address} (TLS, SuperNode auth), "
             f"pid {fed.superlink.pid if fed.superlink else '?'}")
        for name in names:
            fed.register(pki.site(name))
        for name, sf in sites.items():
            proc = fed.start_supernode(pki.site(name), site_config=sf,
                                       metrics_port=site_ports[name])
            echo(f"  site daemon {name} pid {proc.pid} (site config {sf.name}, metrics "
                 f"{metrics_urls[name]})")
        fed.wait_nodes_online(len(names))
        echo(f"  {len(names)} authenticated SuperNodes online after {time.monotonic() - t0:.0f}s")
        run_id = fed.start_run(write_app(work / "app", cfg))
        echo(f"  run {run_id} started; server metrics {metrics_urls['server']}; streaming "
             "rounds (held-out = data never given to a site)")
        status, seen, next_status = "pending", 0, 0.0
        deadline = time.monotonic() + timeout_s
        while True:
            fed.procs.check_alive()
            rounds = read_rounds(run_dir)
            for r in rounds[seen:]:
                echo(f"  [{time.monotonic() - t0:6.0f}s] {format_round(r, cfg.rounds)}")
                if on_round:
                    on_round(r, metrics_urls)
            seen = len(rounds)
            if time.monotonic() >= next_status:
                status = fed.run_status(run_id)
                next_status = time.monotonic() + 10
                if status.startswith("finished"):
                    for r in read_rounds(run_dir)[seen:]:
                        echo(f"  [{time.monotonic() - t0:6.0f}s] {format_round(r, cfg.rounds)}")
                    break
            if time.monotonic() >= deadline:
                fed.stop_run(run_id)
                raise DeadlineError(f"run {run_id} did not finish within {timeout_s:.0f}s; "
                                    f"logs in {work / 'logs'}")
            time.sleep(2)
        (work / "logs" / f"run-{run_id}.log").write_text(fed.logs(run_id), encoding="utf-8")
    finally:
        fed.stop()
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
    seconds = time.monotonic() - t0
    final = run_dir / "final" / "model.pt"
    if status != "finished:completed" or not final.is_file():
        raise ProcessError(f"run {run_id} ended as {status!r}; see {work / 'logs'}")
    echo(f"done in {seconds:.0f}s: status {status}")
    echo(f"  global model  {final}  (python -c \"import fedpacs; "
         f"m, card = fedpacs.load_model('{final}')\")")
    echo(f"  model card    {run_dir / 'final' / 'model_card.json'}")
    echo(f"  metrics       {run_dir / 'metrics.json'}")
    echo(f"  report        {run_dir / 'report' / 'index.html'}")
    echo(f"  signed        fedpacs models verify {run_dir} --public-key {pki.signing_pub}")
    return DemoResult(run_id, run_dir, final, read_rounds(run_dir), status, seconds,
                      metrics_urls)

