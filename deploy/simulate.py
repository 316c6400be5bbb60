"""`fedpacs simulate`: the run's ServerApp and the sites' ClientApp on Flower's Simulation
Engine (Ray backend), N virtual sites on this machine or on an existing Ray cluster.

What runs is what a deployment runs: the server side is
:func:`fedpacs.server.app.run_federation` (the deployed ServerApp's body: the same
FederatedRun, run directory, checkpoints, metrics.json, final model, model card, report),
given the run config directly instead of reading it from Flower's run config and the
run's server.json; the site side is the deployed ClientApp object
(``fedpacs.client.app:app``) with all its mods (site boundary, SecAgg+ policy, local DP).

The virtual sites' data: the pooled data set (``--data``) partitioned by
:mod:`fedpacs.common.partition` (``split.json`` in the run directory), and one generated
site config per virtual site (``RUN_DIR/sites/site-NNN.toml``) pointing at the pooled
data with ``[data] split`` and ``partition = NNN``. Which file a virtual node reads is
decided on the site side only (fedpacs.client.app.simulated_site_config): the Ray workers
are started with ``$FEDPACS_SIM_SITES`` (that folder) in their environment, and Flower's
Simulation Engine gives each node its ``partition-id`` when it creates it; no message and
no run config value takes part.

Before anything starts, each virtual site's cases and cases per class are printed, and a
split on which training cannot work is refused (fedpacs.common.partition.check_sites).

Memory: a sampler thread reads the resident memory (``/proc``) of this process's Ray
workers running the ClientApp (``ray::ClientAppActor``, local Ray only; on a remote
cluster the figure is not measured) and the machine's available memory. Ray runs at most
``cpus / cpus_per_site`` ClientApps at once (one actor each, reused across virtual sites),
so memory grows with the actors, not the site count; the virtual sites' state lives in
this process. When Ray reports an out-of-memory kill, or an actor dies while the
machine's available memory is below :data:`LOW_MEMORY_FRACTION`, the simulation ends with
a SimulationError naming the site count and the memory per virtual site measured.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpacs.common.config import DataSpec, RunConfig
from fedpacs.common.errors import ConfigError, FedpacsError, FieldError, SimulationError
from fedpacs.common.partition import (
    DEFAULT_ALPHA,
    SPLIT_FILE,
    Split,
    check_sites,
    format_summary,
    make_split,
    pool_cases,
    read_sources,
    summarize,
)
from fedpacs.common.procs import process_parents

log = logging.getLogger("fedpacs.simulate")

SITES_DIR = "sites"  # RUN_DIR/sites/site-NNN.toml: the generated virtual site configs
SIMULATION_FILE = "simulation.json"  # RUN_DIR/simulation.json: sites, memory, wall time
SITE_PREFIX = "sim"  # virtual site names: sim-000, sim-001, ...
DEFAULT_CONNECT_TIMEOUT_S = 10.0  # deadline to reach a --ray-address
DEFAULT_CPUS_PER_SITE = 1.0  # Ray CPUs per running ClientApp (one torch thread each)
MEMORY_POLL_S = 0.5
LOW_MEMORY_FRACTION = 0.05  # an actor death below this much free memory counts as OOM
ACTOR_MARK = "ClientAppActor"  # Ray's process title of a ClientApp worker
OOM_MARKS = ("OutOfMemoryError", "memory pressure", "OOM")
# Ray's memory monitor names what each worker it killed held: "actual memory used=0.05GB"
RAY_KILLED_USED = re.compile(r"actual memory used=([0-9.]+)\s*GB")


@dataclass(frozen=True)
class SimulationOptions:
    """How the virtual sites are made and where they run. ``data``: the pooled data set
    (format, root, and the held-out split's fraction and seed, as a site config's
    ``[data]``); ``split_file``: reuse a saved split instead of partitioning."""

    data: DataSpec
    sites: int = 3
    partition: str = "iid"
    alpha: float = DEFAULT_ALPHA
    split_seed: int = 0
    sources: Path | None = None
    split_file: Path | None = None
    require_all_classes: bool = False
    ray_address: str = ""  # "": a Ray runtime started here for the run
    cpus_per_site: float = DEFAULT_CPUS_PER_SITE
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S


@dataclass(frozen=True)
class MemoryReport:
    """Resident memory of the Ray workers that ran ClientApps (MiB; local Ray only)."""

    actors: int = 0
    peak_rss_mib: dict[int, float] = field(default_factory=dict)  # worker pid -> peak
    min_available_mib: float = 0.0
    total_mib: float = 0.0

    @property
    def per_site_mib(self) -> float:
        """The largest worker's peak: what one running virtual site needs."""
        return max(self.peak_rss_mib.values(), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"actors": self.actors, "per_site_mib": round(self.per_site_mib, 1),
                "peak_rss_mib": {str(k): round(v, 1) for k, v in self.peak_rss_mib.items()},
                "min_available_mib": round(self.min_available_mib, 1),
                "total_mib": round(self.total_mib, 1)}


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    final_model: Path
    split: Path
    sites: int
    wall_s: float
    memory: MemoryReport
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- Ray address
def check_ray_address(address: str, *, timeout_s: float) -> None:
    """A ConfigError for an address Ray cannot take, a SimulationError naming it when
    nothing answers at HOST:PORT within ``timeout_s`` (so that ``ray.init`` never waits on
    an address that cannot be reached). ``""``/``local``: a new local runtime; ``auto``:
    the cluster `ray start` left on this machine (Ray checks it)."""
    if address in ("", "local", "auto"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port_s = hostport.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError("simulate", [FieldError(
            "--ray-address", "HOST:PORT of a Ray cluster's head (GCS, e.g. 10.0.0.5:6379), "
            "ray://HOST:PORT, auto or local", repr(address), "give the address `ray start "
            "--head` printed")])
    fix = (f"Fix: start it (`ray start --head --port {port_s}` on {host}), check the "
           "address and firewall, or leave out --ray-address to run on this machine")
    try:
        answers = speaks_grpc(host.strip("[]"), int(port_s), timeout_s=timeout_s)
    except OSError as exc:
        raise SimulationError(
            f"Ray cluster at {address} cannot be reached within {timeout_s:g} s "
            f"({type(exc).__name__}: {exc}). {fix}") from exc
    if not answers:
        raise SimulationError(f"Ray cluster at {address} cannot be reached: something "
                              "listens there but does not answer as a Ray head (gRPC) "
                              f"within {timeout_s:g} s. {fix}")


GRPC_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def speaks_grpc(host: str, port: int, *, timeout_s: float) -> bool:
    """Whether HOST:PORT answers an HTTP/2 client preface with a SETTINGS frame (as a Ray
    head's GCS and Ray Client servers, gRPC, do) within ``timeout_s`` overall; OSError
    when it cannot be connected to."""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(GRPC_PREFACE)
        head = b""
        while len(head) < 9:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            try:
                chunk = sock.recv(9 - len(head))
            except TimeoutError:
                return False
            if not chunk:
                return False
            head += chunk
    return head[3] == 4  # frame type SETTINGS


def ray_runtime_env(sites_dir: Path) -> dict[str, Any]:
    """The Ray workers' environment: this interpreter's import path and the virtual
    sites' folder (the only way a virtual site finds its config), Flower quiet."""
    from fedpacs.client.app import SIM_SITES_ENV

    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                         SIM_SITES_ENV: str(sites_dir), "FLWR_TELEMETRY_ENABLED": "0",
                         "FLWR_DISABLE_UPDATE_CHECK": "1"}}


def init_ray(address: str, sites_dir: Path) -> None:
    """Start (or join) Ray for the simulation; Flower's backend then finds it running."""
    import ray

    kwargs: dict[str, Any] = {"runtime_env": ray_runtime_env(sites_dir),
                              "logging_level": logging.ERROR, "log_to_driver": False}
    if address in ("", "local"):
        kwargs |= {"include_dashboard": False}
    else:
        kwargs["address"] = address
    try:
        with warnings.catch_warnings():  # (a notice on GPU env vars, for num_gpus = 0)
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SimulationError(
            f"Ray cluster at {address or 'local'} could not be joined ({type(exc).__name__}:"
            f" {exc}). Fix: check that the cluster runs Ray {ray.__version__} and Python "
            f"{sys.version_info.major}.{sys.version_info.minor}, or leave out --ray-address"
        ) from exc


# --------------------------------------------------------------------------- memory


def actor_rss_mib(root_pid: int) -> dict[int, float]:
    """Resident memory (MiB) of the ClientApp workers among ``root_pid``'s descendants."""
    parents = process_parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if ACTOR_MARK.encode() not in cmd:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out[pid] = int(line.split()[1]) / 1024
    return out


def meminfo_mib() -> tuple[float, float]:
    """(available, total) memory of this machine in MiB."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) / 1024
    return values.get("MemAvailable", 0.0), values.get("MemTotal", 0.0)


class MemorySampler:
    """Peak resident memory of this process's ClientApp workers and the machine's lowest
    available memory, sampled every :data:`MEMORY_POLL_S` while the simulation runs."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.peaks: dict[int, float] = {}
        self.min_available, self.total = meminfo_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedpacs-memory", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * MEMORY_POLL_S)
        self.sample()

    def sample(self) -> None:
        for pid, mib in actor_rss_mib(self.root_pid).items():
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), mib)
        self.min_available = min(self.min_available, meminfo_mib()[0])

    def _loop(self) -> None:
        while not self._stop.wait(MEMORY_POLL_S):
            self.sample()

    def report(self) -> MemoryReport:
        return MemoryReport(actors=len(self.peaks), peak_rss_mib=dict(self.peaks),
                            min_available_mib=self.min_available, total_mib=self.total)


class OutOfMemoryWatch(logging.Handler):
    """Flower's simulation workers log each ClientApp failure on the ``flwr`` logger;
    this keeps those that are Ray out-of-memory kills, and actor deaths."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.oom: list[str] = []
        self.died: list[str] = []
        self.killed_mib: list[float] = []  # what Ray measured for each worker it killed

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(m in text for m in OOM_MARKS):
            self.oom.append(text[:200])
            self.killed_mib += [float(g) * 1024 for g in RAY_KILLED_USED.findall(text)]
        elif "ActorDiedError" in text or "RayActorError" in text:
            self.died.append(text[:200])


def out_of_memory(watch: OutOfMemoryWatch, memory: MemoryReport) -> bool:
    """Whether the simulation ran out of memory: Ray said so, or an actor died while
    the machine had less than LOW_MEMORY_FRACTION of its memory free."""
    low = memory.total_mib > 0 and memory.min_available_mib < LOW_MEMORY_FRACTION * \
        memory.total_mib
    return bool(watch.oom) or (bool(watch.died) and low)


def oom_error(sites: int, memory: MemoryReport, *, cpus_per_site: float,
              killed_mib: Sequence[float] = ()) -> SimulationError:
    """The coded error of a simulation out of memory: the site count and the memory per
    virtual site (the sampled peak of the ClientApp workers; else what Ray's memory
    monitor measured for the workers it killed)."""
    per = memory.per_site_mib
    if per:
        measured = f"{per:.0f} MiB per running virtual site (peak resident memory of " \
            f"{memory.actors} Ray worker(s))"
    elif killed_mib:
        measured = f"{max(killed_mib):.0f} MiB per running virtual site (what Ray " \
            f"measured for the {len(killed_mib)} worker(s) it killed)"
    else:
        measured = "no per-site figure (not measured: remote cluster, or no worker " \
            "lived long enough)"
    return SimulationError(
        f"the simulation of {sites} virtual sites ran out of memory: {measured}; lowest "
        f"available memory {memory.min_available_mib:.0f} of {memory.total_mib:.0f} MiB. "
        f"Fix: run fewer sites at once (raise --cpus-per-site above {cpus_per_site:g}), "
        "lower --batch-size or the network's width, or use a larger machine/cluster")


def mark_failed(run_dir: Path, error: FedpacsError) -> None:
    """``run_dir``'s status.json says the run failed, and why: a run whose workers Ray
    killed did not train, whatever it wrote (the ServerApp's own NoUpdateError, when no
    round changed the model, does not say that memory was the cause; this does)."""
    from fedpacs.common.artifacts import write_json
    from fedpacs.server.rundir import STATUS_FILE, read_status

    status = read_status(run_dir)
    if status:
        write_json(run_dir / STATUS_FILE, status | {
            "state": "failed", "error": type(error).__name__, "detail": str(error)[:500],
            "updated": time.time()})


# --------------------------------------------------------------------------- virtual sites
def site_config_text(*, name: str, cfg: RunConfig, spec: DataSpec, partition: int,
                     sites: int, split: Path, task_table: dict[str, Any] | None) -> str:
    """A generated virtual site's config (TOML): the pooled data with its partition of
    the saved split, one torch thread, no warm parent (Ray's worker is the process)."""
    import tomli_w

    doc: dict[str, Any] = {
        "site": {"name": name, "task": cfg.task},
        "data": {"format": spec.format, "root": str(spec.root), "partition": partition,
                 "num_partitions": sites, "holdout_fraction": spec.holdout_fraction,
                 "val_fraction": spec.val_fraction, "seed": spec.seed, "split": str(split)},
        "compute": {"threads": 1, "warm": False, "device": "cpu"},
        # (virtual sites run no signed app: the daemon's app gate is not in the path)
        "security": {"require_secagg": cfg.secagg, "allow_unsigned_apps": True,
                     "share_local_model": cfg.cross_site_local},
    }
    if task_table is not None:
        doc["task"] = task_table
    return tomli_w.dumps(doc)


def write_site_configs(folder: Path, split: Split, split_path: Path, cfg: RunConfig,
                       spec: DataSpec) -> list[Path]:
    import json

    from fedpacs.client.app import sim_site_file

    folder.mkdir(parents=True, exist_ok=True)
    task_table = json.loads(cfg.task_json) if cfg.task_json else None
    out = []
    for i, s in enumerate(split.sites):
        path = sim_site_file(folder, i)
        path.write_text(site_config_text(name=s.name, cfg=cfg, spec=spec, partition=i,
                                         sites=len(split.sites), split=split_path,
                                         task_table=task_table), encoding="utf-8")
        out.append(path)
    return out


@dataclass(frozen=True)
class Prepared:
    """A simulation ready to start: its config, split and virtual sites."""

    cfg: RunConfig
    split: Split
    split_path: Path
    site_files: list[Path]
    summary: list[str]
    warnings: list[str]


def prepare(*, cfg: RunConfig, options: SimulationOptions, run_dir: Path) -> Prepared:
    """Validate, partition, check and write the split and the virtual sites' configs;
    nothing runs yet. The run's held-out evaluation defaults to the pooled data set's
    held-out split (the cases no site has)."""
    spec = options.data
    if not cfg.eval_format:
        cfg = replace(cfg, eval_format=spec.format, eval_root=str(spec.root),
                      eval_holdout_fraction=spec.holdout_fraction, eval_seed=spec.seed)
    cfg = replace(cfg, run_dir=str(run_dir))
    errs = cfg.validate()
    if options.cpus_per_site <= 0:
        errs.append(FieldError("--cpus-per-site", "> 0", str(options.cpus_per_site),
                               "e.g. --cpus-per-site 1"))
    if (run_dir / "metrics.json").exists():
        errs.append(FieldError("--run-dir", "a new or empty run folder", str(run_dir),
                               "choose another --run-dir (a run's results are never mixed)"))
    if errs:
        raise ConfigError("simulate", errs)
    task = cfg.task_config()
    pool = pool_cases(spec, task)
    if options.split_file is not None:
        split = Split.load(options.split_file)
    else:
        min_cases = int(-(-cfg.batch_size // max(1e-9, 1 - spec.val_fraction)))
        split = make_split(pool, spec, partitioner=options.partition, sites=options.sites,
                           alpha=options.alpha, seed=options.split_seed, min_cases=min_cases,
                           sources=read_sources(options.sources) if options.sources else None,
                           site_prefix=SITE_PREFIX)
    missing = [c for s in split.sites for c in s.cases if c not in set(pool.ids)]
    if missing:
        raise ConfigError(str(options.split_file or "split"), [FieldError(
            "sites", "case IDs of this data set's pool", f"{len(missing)} unknown (e.g. "
            f"{missing[0]!r})", "use the data set and holdout setting the split was made "
            "with")])
    if cfg.min_sites > len(split.sites):
        raise ConfigError("simulate", [FieldError(
            "min-sites", f"<= the {len(split.sites)} virtual sites", str(cfg.min_sites),
            "lower --min-sites or add --sites")])
    summaries = summarize(split, pool, spec, num_classes=task.num_classes)
    refusals, warnings = check_sites(
        summaries, batch_size=cfg.batch_size, num_classes=task.num_classes,
        class_names=task.class_names, classification=task.kind == "classification",
        require_all_classes=options.require_all_classes)
    if refusals:
        raise ConfigError(f"split of {len(split.sites)} virtual sites (batch size "
                          f"{cfg.batch_size})", refusals)
    split = replace(split, summary=tuple(s.to_json() for s in summaries))
    run_dir.mkdir(parents=True, exist_ok=True)
    split_path = split.save(run_dir / SPLIT_FILE)
    files = write_site_configs(run_dir / SITES_DIR, split, split_path, cfg, spec)
    return Prepared(cfg, split, split_path, files, format_summary(summaries), warnings)


# --------------------------------------------------------------------------- the run
def simulation_server_app(cfg: RunConfig) -> Any:
    """A ServerApp whose main is the deployed one's body for ``cfg``."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from fedpacs.common.flowertune import quick_object_pulls
    from fedpacs.server.app import run_federation

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quick_object_pulls()
        run_federation(grid, cfg, context)

    return app


def simulate(*, cfg: RunConfig, options: SimulationOptions, run_dir: Path,
             echo: Callable[[str], None] = print) -> SimulationResult:
    """Run ``cfg`` with ``options.sites`` virtual sites on Flower's Simulation Engine;
    the run directory is a deployed run's (plus split.json, sites/, simulation.json)."""
    check_ray_address(options.ray_address, timeout_s=options.connect_timeout_s)
    run_dir = run_dir.resolve()
    prep = prepare(cfg=cfg, options=options, run_dir=run_dir)
    n = len(prep.split.sites)
    echo(f"{n} virtual sites, partition {prep.split.partitioner} "
         f"{dict(prep.split.params)}; split {prep.split_path}")
    for line in prep.summary:
        echo(f"  {line}")
    for w in prep.warnings:
        echo(f"  warning: {w}")
    from flwr.simulation import run_simulation

    from fedpacs.client.app import app as client_app

    watch = OutOfMemoryWatch()
    flwr_log = logging.getLogger("flwr")
    flwr_log.addHandler(watch)
    started = time.monotonic()
    failure: BaseException | None = None
    try:
        init_ray(options.ray_address, run_dir / SITES_DIR)
        with MemorySampler(os.getpid()) as sampler:
            try:
                run_simulation(
                    server_app=simulation_server_app(prep.cfg), client_app=client_app,
                    num_supernodes=n, backend_config={
                        "client_resources": {"num_cpus": options.cpus_per_site,
                                             "num_gpus": 0.0}})
            except (RuntimeError, FedpacsError, OSError) as exc:
                failure = exc
    finally:
        flwr_log.removeHandler(watch)
        import gc

        import ray

        with warnings.catch_warnings():  # (Ray leaves its processes' /dev/null handles)
            warnings.simplefilter("ignore", ResourceWarning)
            if ray.is_initialized():
                ray.shutdown()
            gc.collect()
    wall = time.monotonic() - started
    memory = sampler.report()
    if out_of_memory(watch, memory):
        error = oom_error(n, memory, cpus_per_site=options.cpus_per_site,
                          killed_mib=watch.killed_mib)
        mark_failed(run_dir, error)
        raise error from failure
    if failure is not None:
        raise failure
    final = run_dir / "final" / "model.pt"
    from fedpacs.common.artifacts import write_json
    from fedpacs.server.rundir import read_status

    state = read_status(run_dir).get("state")
    if state != "finished" or not final.is_file():
        raise SimulationError(f"the simulated run in {run_dir} did not finish (status "
                              f"{state!r}); its status.json and the log above say why")

    write_json(run_dir / SIMULATION_FILE, {
        "sites": n, "partition": prep.split.partitioner, "params": dict(prep.split.params),
        "split_seed": prep.split.seed, "ray_address": options.ray_address or "local",
        "cpus_per_site": options.cpus_per_site, "secagg": prep.cfg.secagg,
        "wall_s": round(wall, 2), "memory": memory.to_json(), "warnings": prep.warnings})
    return SimulationResult(run_dir, final, prep.split_path, n, wall, memory,
                            tuple(prep.warnings))
