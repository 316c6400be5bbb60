"""Where a federated round's time goes: a real federation beside the same code in one process.

For one task and N sites, in one invocation, per privacy mode (plain FedAvg, SecAgg+):

* ``real``: real processes (SuperLink + N site daemons, TLS, SuperNode auth, signed app),
  through ``fedpacs.deploy.demo.run_once`` as ``fedpacs demo`` runs it;
* ``in-process``: the same ServerApp/ClientApp code over ``tests.loopback.LoopbackGrid``
  (no transport, no process start-up; the sites run one after another).

Per mode it prints the seconds per round (mean over rounds >= 2, round 1 is warm-up), the
slowest site's training seconds (its ``t-train`` phase from the round's timing record, else
its ``train-seconds``; both are shown), the overhead (round minus the
training on the critical path: the slowest site for real processes, the sum of the sites in
one process, where they run in turn) and its fraction, the ratios real / in-process and
SecAgg+ / plain, then every figure of the rounds' ``timing`` records (per exchange, the
slowest site's phases, the server's own work), averaged over the same rounds. A round's
time is its ``timing`` record's round seconds when the ServerApp wrote one, else the gap
between two successive round records' ``time`` stamps.

Usage: python bench/round_overhead.py [--task breastmnist|hippocampus] [--sites 3]
           [--rounds 4] [--modes plain,secagg] [--local-epochs 0] [--no-heldout]
           [--skip-federation] [--skip-inprocess] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpacs.common.config import RunConfig  # noqa: E402
from fedpacs.common.errors import FedpacsError  # noqa: E402
from fedpacs.deploy.demo import (  # noqa: E402
    DEMO_DATA,
    demo_data_path,
    demo_sites,
    run_once,
    site_names,
)
from fedpacs.server.coordinator.federation import SiteSpec  # noqa: E402
from fedpacs.server.coordinator.pki import Pki, provision  # noqa: E402

MODES = {"plain": False, "secagg": True}
MODE_LABEL = {"plain": "plain", "secagg": "SecAgg+"}
KINDS = ("real", "in-process")
WARMUP_ROUNDS = 1  # round 1 loads, imports and compiles what later rounds reuse

# Names the round's timing record may give its round time (the first present is used).
ROUND_KEYS = ("round_s", "round_seconds", "seconds", "total_s", "wall_s")
# Fields of a timing record that are labels, not figures.
LABEL_KEYS = ("kind", "stage", "name", "type", "message_type", "phase")


# --------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """What the figures were measured on (a time means nothing without its machine)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    import flwr
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "cpu": model, "memory_gib": round(mem_gib, 1), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "flwr": flwr.__version__, "host": platform.node()}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def describe_machine(m: dict[str, Any]) -> str:
    return (f"{m['usable_cores']} usable cores of {m['cores']} ({m['cpu'] or 'cpu ?'}), "
            f"{m['memory_gib']} GiB, GPU {m['gpu']}; python {m['python']}, torch {m['torch']}, "
            f"flwr {m['flwr']}")


# --------------------------------------------------------------------------- round records
def number(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def timing_of(record: dict[str, Any]) -> dict[str, Any]:
    t = record.get("timing")
    return t if isinstance(t, dict) else {}


def exchange_label(item: dict[str, Any], index: int) -> str:
    parts = [str(item[k]) for k in LABEL_KEYS if isinstance(item.get(k), str) and item[k]]
    return "/".join(dict.fromkeys(parts)) or f"#{index}"


def flatten_timing(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a timing record under a readable dotted name, whatever its layout:
    nested objects by key, a list of exchanges by each item's kind/stage (a repeated label
    gets #2, #3...); ``seconds``/``s`` fields of an exchange stand for the exchange."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if (x := number(v)) is not None:
                out[name] = x
            elif isinstance(v, dict | list):
                out |= flatten_timing(v, name)
    elif isinstance(obj, list):
        seen: dict[str, int] = {}
        for i, item in enumerate(obj):
            if (x := number(item)) is not None:
                out[f"{prefix}[{i}]"] = x
                continue
            if not isinstance(item, dict):
                continue
            label = exchange_label(item, i)
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}#{seen[label]}"
            base = f"{prefix}[{label}]"
            for k, v in item.items():
                if k in LABEL_KEYS:
                    continue
                name = base if k in ("seconds", "s") else f"{base}.{k}"
                if (x := number(v)) is not None:
                    out[name] = x
                elif isinstance(v, dict | list):
                    out |= flatten_timing(v, name)
    return out


def round_seconds(rounds: list[dict[str, Any]], i: int) -> tuple[float | None, str]:
    """Round ``i``'s seconds and where they came from ("timing" or "stamps")."""
    t = timing_of(rounds[i])
    for key in ROUND_KEYS:
        if (x := number(t.get(key))) is not None:
            return x, "timing"
    if i > 0:
        a, b = number(rounds[i - 1].get("time")), number(rounds[i].get("time"))
        if a is not None and b is not None and a > 0 and b > 0:
            return b - a, "stamps"
    return None, "none"


def site_metric(record: dict[str, Any], key: str) -> list[float]:
    """Each trained site's ``key`` from its train reply's metrics."""
    sites = record.get("train_sites") or {}
    vals = (number(m.get(key)) for m in sites.values() if isinstance(m, dict)) \
        if isinstance(sites, dict) else iter(())
    return [v for v in vals if v is not None]


def timing_site_train(record: dict[str, Any]) -> list[float]:
    """Each site's ``t-train`` as the round's timing record keeps it."""
    sites = timing_of(record).get("sites") or {}
    vals = (number(p.get("t-train")) for p in sites.values() if isinstance(p, dict)) \
        if isinstance(sites, dict) else iter(())
    return [v for v in vals if v is not None]


def mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.mean(vals) if vals else None


@dataclass
class RoundRow:
    """One round's figures as read from its record."""

    round: int
    round_s: float | None
    source: str  # where round_s came from: "timing", "stamps" or "none"
    slowest_train_s: float | None  # the timing record's slowest site (t-train), else ...
    sum_train_s: float | None
    trainer_max_s: float | None  # ... the sites' train-seconds (the training loop alone)
    sites: int
    timing: dict[str, float]


@dataclass
class Summary:
    """One measurement (kind x mode), averaged over rounds > WARMUP_ROUNDS."""

    kind: str
    mode: str
    rounds_used: list[int] = field(default_factory=list)
    round_s: float | None = None
    round_source: str = "none"
    slowest_train_s: float | None = None
    sum_train_s: float | None = None
    trainer_max_s: float | None = None
    critical_train_s: float | None = None  # slowest (parallel sites) or sum (in turn)
    overhead_s: float | None = None
    overhead_fraction: float | None = None
    sites_per_round: list[int] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)
    per_round: list[RoundRow] = field(default_factory=list)
    wall_s: float = 0.0
    error: str = ""


def read_rows(rounds: list[dict[str, Any]]) -> list[RoundRow]:
    rows = []
    for i, rec in enumerate(rounds):
        rnd = int(rec.get("round", i))
        if rnd < 1:  # round 0: the initial model
            continue
        secs, source = round_seconds(rounds, i)
        loop = site_metric(rec, "train-seconds")
        phase = timing_site_train(rec)
        recorded = number(timing_of(rec).get("slowest_train_s"))
        slowest = recorded if recorded else max(phase or loop, default=None)
        total = sum(phase or loop) if phase or loop else None
        rows.append(RoundRow(rnd, secs, source, slowest, total, max(loop, default=None),
                             len(rec.get("train_sites") or {}), breakdown_of(rec)))
    return rows


def breakdown_of(record: dict[str, Any]) -> dict[str, float]:
    """The timing record's figures, less each site's own (their maximum is ``site_max``)."""
    t = {k: v for k, v in timing_of(record).items() if k != "sites"}
    return flatten_timing(t)


def summarise(kind: str, mode: str, rounds: list[dict[str, Any]], *, sequential: bool,
              wall_s: float) -> Summary:
    rows = read_rows(rounds)
    s = Summary(kind, mode, wall_s=wall_s, per_round=rows,
                sites_per_round=[r.sites for r in rows])
    used = [r for r in rows if r.round > WARMUP_ROUNDS] or rows  # 1 round: keep it
    s.rounds_used = [r.round for r in used]
    s.round_s = mean(r.round_s for r in used)
    s.round_source = "+".join(sorted({r.source for r in used if r.round_s is not None})) \
        or "none"
    s.slowest_train_s = mean(r.slowest_train_s for r in used)
    s.sum_train_s = mean(r.sum_train_s for r in used)
    s.trainer_max_s = mean(r.trainer_max_s for r in used)
    s.critical_train_s = s.sum_train_s if sequential and s.sum_train_s is not None \
        else s.slowest_train_s
    if s.round_s is not None and s.critical_train_s is not None:
        s.overhead_s = s.round_s - s.critical_train_s
        s.overhead_fraction = s.overhead_s / s.round_s if s.round_s > 0 else None
    keys: dict[str, None] = {}
    for r in used:
        keys |= dict.fromkeys(r.timing)
    for k in keys:
        m = mean(r.timing.get(k) for r in used)
        if m is not None:
            s.breakdown[k] = m
    return s


# --------------------------------------------------------------------------- runs
def run_config(work: Path, *, task: str, sites: int, rounds: int, secagg: bool,
               local_epochs: int, heldout: bool) -> RunConfig:
    data = demo_data_path(task, None)
    extra: dict[str, Any] = dict(eval_format=DEMO_DATA[task].format, eval_root=str(data),
                                 eval_seed=0) if heldout else {}
    return RunConfig(task=task, rounds=rounds, local_epochs=local_epochs, min_sites=sites,
                     secagg=secagg, cross_site=False, run_dir=str(work / "run"), **extra)


def site_setup(work: Path, task: str, sites: int, secagg: bool) -> tuple[Pki, list[SiteSpec]]:
    names = site_names(sites)
    pki = provision(work / "pki", sites=names)
    specs = demo_sites(work, pki, task=task, data_dir=None, names=names,
                       require_secagg=secagg)
    return pki, specs


def real(work: Path, cfg: RunConfig, sites: int, log: Callable[[str], None]
         ) -> list[dict[str, Any]]:
    pki, specs = site_setup(work, cfg.task, sites, cfg.secagg)
    res = run_once(work, pki, specs, cfg, timeout_s=3600, echo=log)
    return res.rounds


def in_process(work: Path, cfg: RunConfig, sites: int, log: Callable[[str], None]
               ) -> list[dict[str, Any]]:
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpacs.client.app import app as client_app
    from fedpacs.server.app import run_federation
    from tests.loopback import LoopbackGrid

    if log is quiet:  # Flower logs every round at INFO
        logging.getLogger("flwr").setLevel(logging.WARNING)
    # SecAgg+'s client mod reads the task's identity, which a real SuperNode sets
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    _, specs = site_setup(work, cfg.task, sites, cfg.secagg)
    grid = LoopbackGrid(client_app, {i + 1: s.config for i, s in enumerate(specs)})
    run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    rounds = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["rounds"]
    for r in rounds:
        log(f"  round {r.get('round')}: sites {len(r.get('train_sites') or {})}")
    return list(rounds)


def quiet(_: str) -> None:
    pass


def measure(kind: str, mode: str, args: argparse.Namespace) -> Summary:
    secagg = MODES[mode]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"fedpacs-overhead-{kind}-{mode}-") as tmp:
        work = Path(tmp)
        cfg = run_config(work, task=args.task, sites=args.sites, rounds=args.rounds,
                         secagg=secagg, local_epochs=args.local_epochs,
                         heldout=not args.no_heldout)
        log: Callable[[str], None] = print if args.verbose else quiet
        fn = real if kind == "real" else in_process
        try:
            rounds = fn(work, cfg, args.sites, log)
        except (FedpacsError, OSError, KeyError, ValueError) as exc:  # the others still run
            s = Summary(kind, mode, wall_s=time.monotonic() - t0,
                        error=f"{type(exc).__name__}: {exc}"[:2000])
            print(f"  {kind:10s} {MODE_LABEL[mode]:8s} FAILED after {s.wall_s:.0f}s: "
                  f"{s.error}", flush=True)
            return s
    s = summarise(kind, mode, rounds, sequential=kind == "in-process",
                  wall_s=time.monotonic() - t0)
    print(f"  {kind:10s} {MODE_LABEL[mode]:8s} {fmt(s.round_s)} s/round over rounds "
          f"{s.rounds_used} ({s.round_source}); sites per round {s.sites_per_round}; "
          f"{s.wall_s:.0f}s in all", flush=True)
    return s


# --------------------------------------------------------------------------- printing
def fmt(x: float | None, spec: str = "7.2f") -> str:
    return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0] or 0))


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def table(summaries: list[Summary]) -> None:
    cols = [s for s in summaries if not s.error]
    if not cols:
        return
    heads = [f"{s.kind} {MODE_LABEL[s.mode]}" for s in cols]
    width = max([14, *(len(h) + 1 for h in heads)])
    namew = max([42, *(len(k) + 2 for s in cols for k in s.breakdown)])

    def row(name: str, vals: list[str]) -> None:
        print(f"  {name:<{namew}s}" + "".join(v.rjust(width) for v in vals))

    row("", heads)
    row("round (s, mean of rounds >= 2)", [fmt(s.round_s) for s in cols])
    row("slowest site's training (s) [1]", [fmt(s.slowest_train_s) for s in cols])
    row("sum of the sites' training (s) [1]", [fmt(s.sum_train_s) for s in cols])
    row("slowest site's training loop alone (s) [2]", [fmt(s.trainer_max_s) for s in cols])
    row("training on the critical path (s) [3]", [fmt(s.critical_train_s) for s in cols])
    row("overhead = round - critical path (s)", [fmt(s.overhead_s) for s in cols])
    row("overhead fraction of the round",
        [fmt(s.overhead_fraction * 100, "6.1f") + "%" if s.overhead_fraction is not None
         else "-" for s in cols])
    row("sites per round", [",".join(map(str, s.sites_per_round)) for s in cols])
    print("  [1] the sites' t-train phase (timing record; evaluation done to training done), "
          "else their train-seconds")
    print("  [2] the sites' train-seconds: the optimiser loop alone (no loader/optimiser set-up)")
    print("  [3] real processes: the slowest site (sites train in parallel); in one "
          "process: the sum (sites run in turn)")
    seen: dict[str, None] = {}
    for s in cols:
        seen |= dict.fromkeys(s.breakdown)
    keys = sorted(seen, key=lambda k: breakdown_rank(k, list(seen)))
    if keys:
        print("  per-phase breakdown (the rounds' timing records, mean of rounds >= 2; "
              "site phases: slowest site):")
        for k in keys:
            row(k, [fmt(s.breakdown.get(k)) for s in cols])
    else:
        print("  per-phase breakdown: no round carries a timing record (round time from the "
              "gap between round stamps)")


PHASES = ("t-start", "t-imports", "t-data", "t-evaluate", "t-train", "t-site")
SERVER = ("aggregate_s", "heldout_s", "checkpoint_s")
DERIVED = ("slowest_train_s", "overhead_s", "overhead_fraction")


def breakdown_rank(key: str, seen: list[str]) -> tuple[int, int]:
    """Round time, the exchanges in order, the slowest site's phases in order, the
    server's own work, the record's derived figures, then anything else."""
    last = key.rsplit(".", 1)[-1]
    if key in ROUND_KEYS:
        return 0, 0
    if key.startswith("exchanges"):  # each exchange's seconds, then its counts
        bases = list(dict.fromkeys(k.split("]", 1)[0] for k in seen))
        base, _, rest = key.partition("]")
        return 1, 10 * bases.index(base) + (1 if rest else 0)
    if last in PHASES:
        return 2, PHASES.index(last)
    if key in SERVER:
        return 3, SERVER.index(key)
    if key in DERIVED:
        return 4, DERIVED.index(key)
    return 5, seen.index(key)


def ratios(summaries: list[Summary]) -> dict[str, float | None]:
    by = {(s.kind, s.mode): s for s in summaries if not s.error}
    out: dict[str, float | None] = {}
    for mode in MODES:
        r, p = by.get(("real", mode)), by.get(("in-process", mode))
        if r and p:
            out[f"real/in-process round, {mode}"] = ratio(r.round_s, p.round_s)
            out[f"real/in-process overhead, {mode}"] = ratio(r.overhead_s, p.overhead_s)
    for kind in KINDS:
        a, b = by.get((kind, "secagg")), by.get((kind, "plain"))
        if a and b:
            out[f"SecAgg+/plain round, {kind}"] = ratio(a.round_s, b.round_s)
            out[f"SecAgg+/plain overhead, {kind}"] = ratio(a.overhead_s, b.overhead_s)
    return out


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--task", default="breastmnist", choices=sorted(DEMO_DATA))
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run (round 1: warm-up)")
    ap.add_argument("--modes", default="plain,secagg",
                    help="comma-separated: plain, secagg (default both)")
    ap.add_argument("--local-epochs", type=int, default=0,
                    help="0: the task preset's (as fedpacs demo); bench/secagg.py uses 1")
    ap.add_argument("--no-heldout", action="store_true",
                    help="no server-side held-out evaluation (fedpacs demo has one)")
    ap.add_argument("--skip-federation", action="store_true", help="no real processes")
    ap.add_argument("--skip-inprocess", action="store_true", help="no in-process run")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--verbose", action="store_true", help="echo the runs' own output")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: expected a comma-separated subset of {', '.join(MODES)}, got "
                 f"{args.modes!r}; e.g. --modes plain,secagg")
    if "secagg" in modes and args.sites < 3:
        ap.error(f"--sites: expected >= 3 with SecAgg+ (the sites' secagg_min_sites), got "
                 f"{args.sites}; add sites or use --modes plain")
    if args.sites < 1 or args.rounds < 1 or args.local_epochs < 0:
        ap.error("--sites and --rounds: expected >= 1, --local-epochs >= 0")
    if args.skip_federation and args.skip_inprocess:
        ap.error("--skip-federation with --skip-inprocess leaves nothing to measure; drop one")
    args.mode_list = modes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = machine()
    epochs = RunConfig(task=args.task, local_epochs=args.local_epochs).local_epochs
    print(f"command: {command_line()}")
    print(f"machine: {describe_machine(m)}")
    print(f"task {args.task}, {args.sites} sites, {args.rounds} rounds (round 1 excluded as "
          f"warm-up), {epochs} local epoch(s), held-out evaluation "
          f"{'off' if args.no_heldout else 'on'}, cross-site validation off", flush=True)
    kinds = [k for k in KINDS if not (k == "real" and args.skip_federation)
             and not (k == "in-process" and args.skip_inprocess)]
    # the in-process runs first: quick, and their figures survive a failed federation
    order = [(k, mode) for k in reversed(kinds) for mode in args.mode_list]
    summaries = [measure(k, mode, args) for k, mode in order]
    summaries.sort(key=lambda s: (KINDS.index(s.kind), list(MODES).index(s.mode)))
    print()
    table(summaries)
    rs = ratios(summaries)
    if rs:
        print("  ratios:")
        for k, v in rs.items():
            print(f"    {k:42s} {fmt(v, '6.2f')}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command_line(), "machine": m, "task": args.task, "sites": args.sites,
            "rounds": args.rounds, "local_epochs": epochs, "heldout": not args.no_heldout,
            "warmup_rounds": WARMUP_ROUNDS,
            "results": [asdict(s) for s in summaries], "ratios": rs}, indent=1) + "\n",
            encoding="utf-8")
        print(f"  figures written to {args.json}")
    return 1 if any(s.error for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
