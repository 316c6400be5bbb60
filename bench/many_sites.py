"""Many site daemons against one SuperLink: does every round complete with all of them, how
long does a round take, and what does the SuperLink hold (memory, TCP connections)?

For each N in ``--sites``, one federation on this host (SuperLink with TLS + SuperNode auth,
N site daemons on disjoint partitions of the smallest task's data, signed app), then one
run per mode (plain FedAvg, SecAgg+) of ``--rounds`` rounds at one local epoch, then down.
Per run it reports the sites in each round (from the run's metrics.json: trained,
evaluated, summed under SecAgg+), the round seconds, the SuperLink's peak RSS (sampled
VmRSS, and VmHWM: the process's own high-water mark since it started), its open TCP
connections (established sockets among its file descriptors, peak) and the memory of the
site daemons (RSS and PSS of each daemon's process tree: daemon, SuperNode, SuperExec and
the ClientApp processes of the moment), idle and at peak. It exits 1 unless every round
of every run had all N sites.

The machine is shared and small: before starting N sites it estimates their memory
(``--site-mib`` per idle site plus one ClientApp process per site at once) and refuses
when that would leave less than ``--min-free-gib``; during a run, when the system's
MemAvailable falls below ``--min-free-gib`` the run is stopped and reported as such.

Usage: python bench/many_sites.py [--sites 10,30] [--rounds 3] [--modes plain,secagg]
           [--task breastmnist] [--local-epochs 1] [--batch-size 0] [--round-timeout 900]
           [--run-timeout 3600] [--site-mib 660] [--min-free-gib 2] [--force]
           [--workdir DIR] [--keep] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from round_overhead import (  # noqa: E402
    command_line,
    describe_machine,
    machine,
    round_seconds,
)

from fedpacs.common.config import RunConfig  # noqa: E402
from fedpacs.common.errors import FedpacsError  # noqa: E402
from fedpacs.common.procs import process_parents
from fedpacs.deploy.demo import DEMO_DATA, demo_sites, site_names  # noqa: E402
from fedpacs.server.coordinator.federation import (  # noqa: E402
    FINISHED,
    Federation,
    Timeouts,
)
from fedpacs.server.coordinator.pki import provision  # noqa: E402
from fedpacs.server.rundir import read_rounds  # noqa: E402

MODES = {"plain": False, "secagg": True}
MODE_LABEL = {"plain": "plain", "secagg": "SecAgg+"}
SMALLEST_TASK = "breastmnist"  # 28x28 images, ResNet-18 (702,790 values), 546 train images
SAMPLE_EVERY_S = 1.0
# What one ClientApp process adds to its site while it runs (measured with 4 breastmnist
# sites, warm parent forking it: 935 MiB PSS per site at peak against 655 idle)
CLIENTAPP_MIB = 300
TCP_STATES = {"01": "established", "06": "time-wait", "08": "close-wait", "0A": "listen"}


# --------------------------------------------------------------------------- /proc readers
def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process in KiB ({} once it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Vm") and line.endswith("kB"):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree(root: int, ppid: dict[int, int]) -> list[int]:
    """``root`` and all its descendants (among ``ppid``'s processes)."""
    kids: dict[int, list[int]] = {}
    for pid, parent in ppid.items():
        kids.setdefault(parent, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in ppid:
            out.append(pid)
            todo.extend(kids.get(pid, []))
    return out


def kind_of(pid: int) -> str:
    """Which part of a site daemon or the SuperLink a process is (from its command line)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    line = " ".join(a.decode(errors="replace") for a in argv)
    for needle, kind in (("flwr-clientapp", "clientapp"), ("flwr-serverapp", "serverapp"),
                         ("fedpacs.client.warm", "warm-parent"), ("superexec", "superexec"),
                         ("flower-supernode", "supernode"), ("client.supernode", "supernode"),
                         ("flower-superlink", "superlink"), ("site start", "site-daemon")):
        if needle in line:
            return kind
    return Path(argv[0].decode(errors="replace")).name or "?"


def tcp_table() -> dict[int, tuple[str, int]]:
    """socket inode -> (state, local port) for every TCP socket of this network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9:
                out[int(f[9])] = (TCP_STATES.get(f[3], f[3]), int(f[1].rsplit(":", 1)[1], 16))
    return out


def tcp_of(pids: list[int], table: dict[int, tuple[str, int]]) -> dict[str, int]:
    """Count of ``pids``' TCP sockets by state, and established ones by local port."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            inode = int(target[8:-1])
            if inode in seen or inode not in table:
                continue
            seen.add(inode)
            state, port = table[inode]
            counts[state] = counts.get(state, 0) + 1
            if state == "established":
                counts[f"established:{port}"] = counts.get(f"established:{port}", 0) + 1
    return counts


def host_tcp(table: dict[int, tuple[str, int]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state, _ in table.values():
        counts[state] = counts.get(state, 0) + 1
    return counts


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


# --------------------------------------------------------------------------- sampling
@dataclass
class Sample:
    t: float
    superlink_rss_mib: float
    superlink_tree_rss_mib: float  # SuperLink + the ServerApp processes it started
    superlink_tcp: dict[str, int]
    host_tcp: dict[str, int]  # every TCP socket of the host by state (time-wait: ports used up)
    sites_rss_mib: float
    sites_pss_mib: float
    by_kind_pss_mib: dict[str, float]
    processes: int
    mem_available_gib: float


def sample(superlink: int, sites: list[int]) -> Sample:
    ppid = process_parents()
    table = tcp_table()
    link_tree = tree(superlink, ppid)
    site_pids = [p for s in sites for p in tree(s, ppid)]
    by_kind: dict[str, float] = {}
    rss = pss = 0.0
    for pid in site_pids:
        p = pss_kib(pid) / 1024
        rss += status_kib(pid).get("VmRSS", 0) / 1024
        pss += p
        k = kind_of(pid)
        by_kind[k] = by_kind.get(k, 0.0) + p
    return Sample(
        t=time.monotonic(),
        superlink_rss_mib=status_kib(superlink).get("VmRSS", 0) / 1024,
        superlink_tree_rss_mib=sum(status_kib(p).get("VmRSS", 0) for p in link_tree) / 1024,
        superlink_tcp=tcp_of([superlink], table),
        host_tcp=host_tcp(table),
        sites_rss_mib=rss, sites_pss_mib=pss, by_kind_pss_mib=by_kind,
        processes=len(site_pids) + len(link_tree), mem_available_gib=mem_available_gib())


class Sampler:
    """Samples the federation every ``SAMPLE_EVERY_S`` in a thread; calls ``on_low_memory``
    once when MemAvailable falls below ``min_free_gib``."""

    def __init__(self, superlink: int, sites: list[int], *, min_free_gib: float,
                 on_low_memory: Callable[[float], None]) -> None:
        self.superlink, self.sites = superlink, sites
        self.min_free_gib, self.on_low_memory = min_free_gib, on_low_memory
        self.samples: list[Sample] = []
        self.low_memory = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            s = sample(self.superlink, self.sites)
            self.samples.append(s)
            if s.mem_available_gib < self.min_free_gib and not self.low_memory:
                self.low_memory = s.mem_available_gib
                self.on_low_memory(s.mem_available_gib)
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# --------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    sites: int
    mode: str
    status: str = ""
    seconds: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: sites, seconds
    complete: bool = False  # every round had every site
    superlink_peak_rss_mib: float = 0.0
    superlink_hwm_mib: float = 0.0  # VmHWM after the run (since the SuperLink started)
    superlink_tree_peak_rss_mib: float = 0.0
    superlink_tcp_peak: dict[str, int] = field(default_factory=dict)
    host_time_wait_peak: int = 0  # TCP sockets in TIME_WAIT on the host (ephemeral ports held)
    sites_peak_rss_mib: float = 0.0
    sites_peak_pss_mib: float = 0.0
    min_mem_available_gib: float = 0.0
    low_memory_stop: float = 0.0
    error: str = ""


def round_rows(rounds: list[dict[str, Any]], n: int, secagg: bool) -> tuple[list[dict[str, Any]],
                                                                            bool]:
    """Per round: sites trained / evaluated / summed, seconds; and whether all had n."""
    rows, ok = [], True
    for i, r in enumerate(rounds):
        if int(r.get("round", i)) < 1:
            continue
        secs, source = round_seconds(rounds, i)
        sec = r.get("secagg") or {}
        row = {"round": int(r["round"]), "seconds": secs, "source": source,
               "trained": len(r.get("train_sites") or {}),
               "evaluated": len(r.get("evaluate_sites") or {}),
               "summed": sec.get("sites_summed") if secagg else None,
               "dropped": sec.get("sites_dropped") if secagg else None,
               "rejected": sorted(r.get("rejected") or {}),
               "exchanges": exchanges_of(r), "site_max": site_max_of(r)}
        ok &= row["trained"] == n and row["evaluated"] == n and not row["rejected"] \
            and (not secagg or row["summed"] == n)
        rows.append(row)
    return rows, ok


def exchanges_of(record: dict[str, Any]) -> list[tuple[str, float]]:
    """(kind/stage, seconds) of each exchange the round's timing record lists."""
    t = record.get("timing") or {}
    out = []
    for e in t.get("exchanges") or [] if isinstance(t, dict) else []:
        if isinstance(e, dict) and isinstance(e.get("seconds"), int | float):
            label = "/".join(x for x in (str(e.get("kind") or ""), str(e.get("stage") or ""))
                             if x) or "?"
            out.append((label, float(e["seconds"])))
    return out


def site_max_of(record: dict[str, Any]) -> dict[str, float]:
    """The slowest site's seconds per phase (t-*), as the round's timing record keeps them."""
    t = record.get("timing") or {}
    m = t.get("site_max") if isinstance(t, dict) else None
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float)} \
        if isinstance(m, dict) else {}


def one_run(fed: Federation, cfg: RunConfig, *, n: int, min_free_gib: float,
            timeout_s: float) -> RunResult:
    mode = "secagg" if cfg.secagg else "plain"
    res = RunResult(n, mode)
    site_pids = [s.pid for s in fed.state.sites.values()]
    t0 = time.monotonic()
    holder: dict[str, Any] = {}

    def low(gib: float) -> None:
        print(f"    MemAvailable {gib:.1f} GiB < {min_free_gib} GiB: stopping the run",
              flush=True)
        if "run" in holder:
            fed.stop_run(holder["run"])

    def show(r: dict[str, Any]) -> None:
        if int(r.get("round", 0)) >= 1:
            sec = r.get("secagg") or {}
            recs = read_rounds(holder["dir"]) if "dir" in holder else []
            at = [i for i, x in enumerate(recs) if x.get("round") == r["round"]]
            secs = round_seconds(recs, at[0])[0] if at else None
            print(f"    [{time.monotonic() - t0:6.0f}s] round {r['round']}/{cfg.rounds}: trained "
                  f"{len(r.get('train_sites') or {})}"
                  + (f", SecAgg+ sum of {sec.get('sites_summed')}" if sec else "")
                  + (f", {secs:.1f}s" if secs is not None else ""), flush=True)

    with Sampler(fed.state.superlink_pid, site_pids, min_free_gib=min_free_gib,
                 on_low_memory=low) as sampler:
        try:
            holder["run"], holder["dir"] = fed.start_run(cfg)
            res.status = fed.watch(holder["run"], timeout_s=timeout_s, on_round=show)
        except FedpacsError as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:3000]
    if "dir" in holder:  # what the rounds recorded, also of a failed run
        res.rounds, res.complete = round_rows(read_rounds(holder["dir"]), n, cfg.secagg)
    res.seconds = time.monotonic() - t0
    res.complete = (res.complete and res.status == FINISHED and not sampler.low_memory
                    and len(res.rounds) == cfg.rounds)
    res.low_memory_stop = sampler.low_memory
    ss = sampler.samples
    if ss:
        res.superlink_peak_rss_mib = max(s.superlink_rss_mib for s in ss)
        res.superlink_tree_peak_rss_mib = max(s.superlink_tree_rss_mib for s in ss)
        res.superlink_tcp_peak = max((s.superlink_tcp for s in ss),
                                     key=lambda c: c.get("established", 0))
        res.host_time_wait_peak = max(s.host_tcp.get("time-wait", 0) for s in ss)
        res.sites_peak_rss_mib = max(s.sites_rss_mib for s in ss)
        res.sites_peak_pss_mib = max(s.sites_pss_mib for s in ss)
        res.min_mem_available_gib = min(s.mem_available_gib for s in ss)
    res.superlink_hwm_mib = status_kib(fed.state.superlink_pid).get("VmHWM", 0) / 1024
    return res


# --------------------------------------------------------------------------- one N
@dataclass
class FederationResult:
    sites: int
    up_seconds: float = 0.0
    idle: dict[str, Any] = field(default_factory=dict)  # memory of N idle site daemons
    runs: list[RunResult] = field(default_factory=list)
    error: str = ""
    workdir: str = ""


def timeouts_for(n: int) -> Timeouts:
    """Deadlines that grow with N: N daemons start on few cores, `flwr` calls slow down."""
    return Timeouts(cli_call=max(120.0, 6.0 * n), nodes_online=max(120.0, 20.0 * n))


def check_memory(n: int, args: argparse.Namespace) -> str:
    need = n * (args.site_mib + CLIENTAPP_MIB) / 1024
    free = mem_available_gib()
    if free - need < args.min_free_gib and not args.force:
        return (f"{n} sites need about {need:.1f} GiB ({args.site_mib} MiB per idle site + "
                f"{CLIENTAPP_MIB} MiB per ClientApp process, one per site at once), "
                f"{free:.1f} GiB is available and {args.min_free_gib} GiB must stay free: "
                "lower --sites, or pass --force")
    return ""


def federation(n: int, args: argparse.Namespace) -> FederationResult:
    out = FederationResult(n)
    problem = check_memory(n, args)
    if problem:
        out.error = problem
        print(f"  {n} sites: refused: {problem}", flush=True)
        return out
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fedpacs-many-sites-"))
    work = (root / f"sites-{n}").resolve()
    out.workdir = str(work)
    names = site_names(n)
    t0 = time.monotonic()
    pki = provision(work / "pki", sites=names)
    # one federation serves both modes: a site that does not require SecAgg+ joins both
    specs = demo_sites(work, pki, task=args.task, data_dir=None, names=names,
                       require_secagg=args.modes == ["secagg"])
    print(f"  {n} sites: provisioned in {time.monotonic() - t0:.0f}s; starting the SuperLink "
          f"and {n} site daemons (workdir {work})", flush=True)
    t0 = time.monotonic()
    try:
        with Federation.up(work, pki, specs, timeouts=timeouts_for(n)) as fed:
            out.up_seconds = time.monotonic() - t0
            time.sleep(5.0)  # let the daemons settle before the idle picture
            idle = sample(fed.state.superlink_pid, [s.pid for s in fed.state.sites.values()])
            out.idle = {"sites_rss_mib": idle.sites_rss_mib, "sites_pss_mib": idle.sites_pss_mib,
                        "per_site_pss_mib": idle.sites_pss_mib / n,
                        "per_site_by_kind_pss_mib": {k: v / n for k, v in
                                                     idle.by_kind_pss_mib.items()},
                        "superlink_rss_mib": idle.superlink_rss_mib,
                        "superlink_tcp": idle.superlink_tcp,
                        "mem_available_gib": idle.mem_available_gib}
            print(f"  {n} sites online after {out.up_seconds:.0f}s (SuperLink pid "
                  f"{fed.state.superlink_pid}, {fed.address}); idle: "
                  f"{out.idle['per_site_pss_mib']:.0f} MiB PSS per site ("
                  + ", ".join(f"{k} {v:.0f}" for k, v in
                              sorted(out.idle["per_site_by_kind_pss_mib"].items()))
                  + f"), SuperLink {idle.superlink_rss_mib:.0f} MiB RSS, "
                  f"{idle.superlink_tcp.get('established', 0)} TCP established, "
                  f"MemAvailable {idle.mem_available_gib:.1f} GiB", flush=True)
            for mode in args.modes:
                cfg = RunConfig(task=args.task, rounds=args.rounds,
                                local_epochs=args.local_epochs, batch_size=args.batch_size,
                                min_sites=n, secagg=MODES[mode], cross_site=False,
                                round_timeout_s=args.round_timeout)
                print(f"  {n} sites, {MODE_LABEL[mode]}: {args.rounds} rounds", flush=True)
                r = one_run(fed, cfg, n=n, min_free_gib=args.min_free_gib,
                            timeout_s=args.run_timeout)
                out.runs.append(r)
                print(f"  {n} sites, {MODE_LABEL[mode]}: {describe_run(r)}", flush=True)
                if r.low_memory_stop:
                    break
    except FedpacsError as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:3000]
        print(f"  {n} sites: FAILED: {out.error}", flush=True)
    return out


def describe_run(r: RunResult) -> str:
    if r.error and not r.rounds:
        return f"FAILED after {r.seconds:.0f}s: {r.error}"
    secs = [x["seconds"] for x in r.rounds if x["seconds"] is not None]
    return (f"{'all rounds with all sites' if r.complete else 'INCOMPLETE'} "
            f"(status {r.status}), {r.seconds:.0f}s in all; round seconds "
            + " ".join(f"{s:.1f}" for s in secs)
            + f"; SuperLink peak RSS {r.superlink_peak_rss_mib:.0f} MiB (VmHWM "
            f"{r.superlink_hwm_mib:.0f}), TCP established peak "
            f"{r.superlink_tcp_peak.get('established', 0)}, host TIME_WAIT peak "
            f"{r.host_time_wait_peak}"
            + (f"; ERROR {r.error}" if r.error else ""))


# --------------------------------------------------------------------------- printing
def table(results: list[FederationResult]) -> None:
    print()
    print("  sites  mode      round  trained evaluated summed  seconds  slowest site "
          "t-site/t-imports/t-train  exchanges (s)")
    for fr in results:
        for r in fr.runs:
            for row in r.rounds:
                sm = row["site_max"]
                phases = "/".join(f"{sm[k]:.1f}" if k in sm else "-"
                                  for k in ("t-site", "t-imports", "t-train"))
                print(f"  {fr.sites:5d}  {MODE_LABEL[r.mode]:8s} {row['round']:6d} "
                      f"{row['trained']:8d} {row['evaluated']:9d} "
                      f"{row['summed'] if row['summed'] is not None else '-':>6} "
                      f"{row['seconds'] if row['seconds'] is not None else float('nan'):8.1f}  "
                      f"{phases:>37s}  "
                      + " ".join(f"{k} {v:.1f}" for k, v in row["exchanges"]))
    print()
    print("  sites  mode      complete  s/round(>=2)  SuperLink peak RSS  VmHWM  "
          "TCP est. peak  sites peak PSS  per site  min MemAvailable")
    for fr in results:
        if fr.error and not fr.runs:
            print(f"  {fr.sites:5d}  -         {fr.error[:100]}")
        for r in fr.runs:
            later = [x["seconds"] for x in r.rounds if x["round"] >= 2 and x["seconds"]]
            per = sum(later) / len(later) if later else float("nan")
            print(f"  {fr.sites:5d}  {MODE_LABEL[r.mode]:8s}  {'yes' if r.complete else 'NO':8s}"
                  f"  {per:12.1f}  {r.superlink_peak_rss_mib:14.0f} MiB  {r.superlink_hwm_mib:5.0f}"
                  f"  {r.superlink_tcp_peak.get('established', 0):13d}"
                  f"  {r.sites_peak_pss_mib:10.0f} MiB  {r.sites_peak_pss_mib / fr.sites:5.0f} MiB"
                  f"  {r.min_mem_available_gib:10.1f} GiB")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--sites", default="10,30", help="comma-separated site counts (10,30)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="plain,secagg", help="comma-separated: plain, secagg")
    ap.add_argument("--task", default=SMALLEST_TASK, choices=sorted(DEMO_DATA))
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=0, help="0: the task preset's")
    ap.add_argument("--round-timeout", type=float, default=900.0,
                    help="the run's round-timeout-s (each exchange's deadline)")
    ap.add_argument("--run-timeout", type=float, default=3600.0,
                    help="deadline of one run, start to finish (s)")
    ap.add_argument("--site-mib", type=int, default=660,
                    help="memory of one idle site daemon, for the pre-flight check (MiB)")
    ap.add_argument("--min-free-gib", type=float, default=2.0,
                    help="refuse to start, or stop a run, below this MemAvailable (GiB)")
    ap.add_argument("--force", action="store_true", help="skip the pre-flight memory check")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the federations here (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    errs = []
    try:
        args.site_counts = [int(s) for s in args.sites.split(",") if s.strip()]
    except ValueError:
        args.site_counts = []
    if not args.site_counts or min(args.site_counts) < 1:
        errs.append(f"--sites: expected comma-separated counts >= 1, got {args.sites!r}; "
                    "e.g. --sites 10,30")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        errs.append(f"--modes: expected a subset of {', '.join(MODES)}, got {args.modes!r}")
    if "secagg" in args.modes and args.site_counts and min(args.site_counts) < 3:
        errs.append("--sites: expected >= 3 with SecAgg+ (the sites' secagg_min_sites), got "
                    f"{min(args.site_counts)}; add sites or use --modes plain")
    if args.rounds < 1 or args.local_epochs < 1 or args.batch_size < 0:
        errs.append("--rounds and --local-epochs: expected >= 1, --batch-size >= 0")
    if errs:
        ap.error("; ".join(errs))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = machine()
    cfg = RunConfig(task=args.task, local_epochs=args.local_epochs, batch_size=args.batch_size)
    print(f"command: {command_line()}")
    print(f"machine: {describe_machine(m)}")
    print(f"task {args.task} ({cfg.local_epochs} local epoch(s), batch {cfg.batch_size}), "
          f"sites {args.site_counts}, {args.rounds} rounds, modes "
          f"{', '.join(MODE_LABEL[x] for x in args.modes)}; one federation per site count, "
          "cross-site validation off, no held-out evaluation", flush=True)
    tmp_root = None
    if args.workdir is None:
        tmp_root = Path(tempfile.mkdtemp(prefix="fedpacs-many-sites-"))
        args = replace_ns(args, workdir=tmp_root)
    results = []
    for n in args.site_counts:  # one heavy thing at a time
        results.append(federation(n, args))
    table(results)
    ok = all(not fr.error and fr.runs and all(r.complete for r in fr.runs) for fr in results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command_line(), "machine": m, "task": args.task,
            "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
            "rounds": args.rounds, "modes": args.modes,
            "results": [asdict(r) for r in results], "ok": ok}, indent=1) + "\n",
            encoding="utf-8")
        print(f"  figures written to {args.json}")
    if tmp_root is not None:
        if ok and not args.keep:
            shutil.rmtree(tmp_root, ignore_errors=True)
        else:
            print(f"  logs and run folders kept in {tmp_root}")
    return 0 if ok else 1


def replace_ns(ns: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**(vars(ns) | changes))


if __name__ == "__main__":
    sys.exit(main())
