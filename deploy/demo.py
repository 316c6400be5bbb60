"""``fedpacs demo``: a whole federation on loopback with real data, start to finish.

The demo plays every role on one host: it provisions (CA, SuperLink TLS, one key per site),
writes one site config per site on its own partition of a real data set, then runs the
coordinator's ``Federation``: up, start_run, watch (one line per round), down. It prints
where the global model, card, metrics, report and signed manifest are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpacs.client.config import load_site_config
from fedpacs.common.config import RunConfig
from fedpacs.common.errors import ConfigError, FieldError, ProcessError
from fedpacs.common.procs import free_port
from fedpacs.server.coordinator.federation import FINISHED, Federation, SiteSpec
from fedpacs.server.coordinator.pki import Pki, provision
from fedpacs.server.rundir import read_rounds

DATA_DIR_ENV = "FEDPACS_DATA_DIR"


@dataclass(frozen=True)
class TaskData:
    """Where a preset's real data lies under the shared data folder (training defaults
    live with the preset: fedpacs.common.tasks.PRESET_TRAINING)."""

    format: str
    relpath: str


DEMO_DATA: dict[str, TaskData] = {
    "hippocampus": TaskData("nifti", "msd_hippocampus_udacity"),
    "hippocampus-slices": TaskData("nifti", "msd_hippocampus_udacity"),
    "breastmnist": TaskData("medmnist", "medmnist_breast/breastmnist.npz"),
    "pneumoniamnist": TaskData(
        "medmnist", "medmnist_pneumonia/pneumoniamnist_balanced_aksufatih.npz"),
    "adrenalmnist3d": TaskData("medmnist", "medmnist_adrenal3d/adrenalmnist3d.npz"),
}


@dataclass(frozen=True)
class DemoOptions:
    task: str = "hippocampus"
    sites: int = 3
    rounds: int = 5
    local_epochs: int = 0  # 0: the task preset's
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
    """site-a ... site-z, site-aa, site-ab, ... (as spreadsheet columns)."""
    def letters(i: int) -> str:
        out = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            out = chr(ord("a") + r) + out
        return out

    return [f"site-{letters(i)}" for i in range(n)]


def write_site_configs(folder: Path, *, task: str, data: Path, fmt: str, names: list[str],
                       threads: int, seed: int, trusted_keys: Sequence[Path] = (),
                       require_secagg: bool = True, share_local_model: bool = False
                       ) -> list[Path]:
    """One site file per site: same data set, disjoint partitions (the server never sees it).
    Each site runs only apps signed by ``trusted_keys`` (none: unsigned apps allowed), with
    ``require_secagg`` trains only in SecAgg+ runs, and with ``share_local_model`` takes part
    in exchanging local models for cross-site validation."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = ", ".join(f'"{k.resolve()}"' for k in trusted_keys)
    security = (f"[security]\nrequire_secagg = {str(require_secagg).lower()}\n"
                f"share_local_model = {str(share_local_model).lower()}\n"
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


def demo_sites(work: Path, pki: Pki, *, task: str, data_dir: Path | None, names: list[str],
               threads: int = 1, seed: int = 0, require_secagg: bool = True,
               share_local_model: bool = False) -> list[SiteSpec]:
    """Site configs for ``names`` on disjoint partitions of a preset's shared data set,
    each trusting the coordinator's app key: the sites of ``fedpacs demo`` and of
    ``fedpacs federation up --task``."""
    if task not in DEMO_DATA:
        raise ConfigError("demo", [FieldError("task", f"one of {', '.join(DEMO_DATA)}",
                                              repr(task), "choose a demo task")])
    td = DEMO_DATA[task]
    files = write_site_configs(work / "sites", task=task, data=demo_data_path(task, data_dir),
                               fmt=td.format, names=names, threads=threads, seed=seed,
                               trusted_keys=[pki.app_pub], require_secagg=require_secagg,
                               share_local_model=share_local_model)
    return [SiteSpec(n, f, task, free_port()) for n, f in zip(names, files, strict=True)]


def site_specs(files: list[Path], *, metrics: bool = True) -> list[SiteSpec]:
    """SiteSpecs for site config files, each validated here first (named by its file stem)."""
    return [SiteSpec(p.stem, p, load_site_config(p).task, free_port() if metrics else 0)
            for p in files]


def demo_data_path(task: str, data_dir: Path | None) -> Path:
    return resolve_data_dir(data_dir) / DEMO_DATA[task].relpath


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
    if r.get("dropped"):
        parts.append(f"{r['dropped']} site(s) did not answer in time (dropped)")
    for site, reason in (r.get("rejected") or {}).items():
        parts.append(f"REJECTED {site}: {reason[:120]}")
    return "  ".join(parts)


def run_demo(opts: DemoOptions, *, echo: Callable[[str], None] = print,
             on_round: Callable[[dict[str, Any], dict[str, str]], None] | None = None,
             ) -> DemoResult:
    """Provision, write one site config per site, then ``run_once``."""
    if opts.sites < 1:
        raise ConfigError("demo", [FieldError("sites", ">= 1", str(opts.sites), "use 3")])
    if opts.task not in DEMO_DATA:
        raise ConfigError("demo", [FieldError("task", f"one of {', '.join(DEMO_DATA)}",
                                              repr(opts.task), "choose a demo task")])
    data = demo_data_path(opts.task, opts.data_dir)
    cfg = RunConfig(task=opts.task, rounds=opts.rounds, local_epochs=opts.local_epochs,
                    min_sites=opts.sites, seed=opts.seed, eval_format=DEMO_DATA[opts.task].format,
                    eval_root=str(data), eval_seed=opts.seed, secagg=opts.secagg,
                    dp_clip=opts.dp_clip)
    problems = cfg.validate()
    if problems:
        raise ConfigError("demo run config", problems)
    work = opts.workdir.resolve()
    names = site_names(opts.sites)
    pki = provision(work / "pki", sites=names)
    sites = demo_sites(work, pki, task=opts.task, data_dir=opts.data_dir, names=names,
                       threads=opts.threads_per_site, seed=opts.seed,
                       require_secagg=opts.secagg)
    privacy = "SecAgg+" if opts.secagg else "plain FedAvg (secure aggregation off)"
    echo(f"fedpacs demo: {opts.task}, {opts.sites} sites, {opts.rounds} rounds, {privacy}, "
         f"data {data}")
    return run_once(work, pki, sites, cfg, timeout_s=opts.timeout_s, echo=echo,
                    on_round=on_round)


def run_once(work: Path, pki: Pki, sites: list[SiteSpec], cfg: RunConfig, *, timeout_s: float,
             echo: Callable[[str], None] = print,
             on_round: Callable[[dict[str, Any], dict[str, str]], None] | None = None,
             ) -> DemoResult:
    """One run on a federation of its own: ``Federation.up`` + ``start_run`` + ``watch`` +
    ``down``. ``on_round(record, metrics_urls)`` is called as each round's record appears."""
    echo(f"  workdir {work} (logs in {work / 'logs'})")
    t0 = time.monotonic()
    with Federation.up(work, pki, sites) as fed:
        urls = fed.state.metrics_urls()
        echo(f"  SuperLink up (TLS, SuperNode auth): sites dial https://{fed.address} "
             f"(Fleet API only), control https://{fed.control_address}, "
             f"pid {fed.state.superlink_pid}")
        for name, site in fed.state.sites.items():
            echo(f"  site daemon {name} pid {site.pid} (site config {Path(site.config).name}, "
                 f"metrics {urls.get(name, '-')})")
        echo(f"  {len(sites)} authenticated SuperNodes online after {time.monotonic() - t0:.0f}s")
        run_id, run_dir = fed.start_run(cfg)
        echo(f"  run {run_id} started; server metrics {urls.get('server', '-')}; streaming "
             "rounds (held-out = data never given to a site)")

        def show(r: dict[str, Any]) -> None:
            echo(f"  [{time.monotonic() - t0:6.0f}s] {format_round(r, cfg.rounds)}")
            if on_round:
                on_round(r, urls)

        status = fed.watch(run_id, timeout_s=timeout_s, on_round=show,
                           on_gone=lambda g: echo(f"  WARNING {g.describe()}; the run goes "
                                                  "on while Flower runs it"))
    seconds = time.monotonic() - t0
    final = run_dir / "final" / "model.pt"
    if status != FINISHED or not final.is_file():
        raise ProcessError(f"run {run_id} ended as {status!r}; see {work / 'logs'}")
    echo(f"done in {seconds:.0f}s: status {status}")
    echo(f"  global model  {final}  (python -c \"import fedpacs; "
         f"m, card = fedpacs.load_model('{final}')\")")
    echo(f"  model card    {run_dir / 'final' / 'model_card.json'}")
    echo(f"  metrics       {run_dir / 'metrics.json'}")
    echo(f"  report        {run_dir / 'report' / 'index.html'}")
    echo(f"  signed        fedpacs models verify {run_dir} --public-key {pki.artifact_pub}")
    return DemoResult(run_id, run_dir, final, read_rounds(run_dir), status, seconds, urls)
