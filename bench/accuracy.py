"""What federation costs in accuracy (issue #15): per data set, split and method, the
held-out metric over seeds, against the centralized and local-only baselines.

Per data set (MSD hippocampus, BreastMNIST, PneumoniaMNIST, AdrenalMNIST3D), per split
(IID; Dirichlet label skew alpha 0.5 and 0.1; "by source" where a data set carries one:
none in shared/data does) and per seed, the pooled data set is cut into ``--sites`` sites
by :func:`fedpacs.deploy.simulate.prepare` (``split.json`` and one site config per site,
``[data] split``: what ``fedpacs simulate`` writes), and every method trains on those same
sites and is evaluated on the same held-out split (MedMNIST: the official test split;
hippocampus: the 20 % of cases no site has):

* ``centralized``: the sites' training splits pooled (fedpacs.server.baseline.run_centralized,
  its sites read from the generated site configs as ``fedpacs baseline`` reads them);
* ``local``: each site alone, the mean over sites of its held-out metric (run_local);
* ``fedavg``, ``fedprox`` (mu ``--proximal-mu``), ``fedbn`` (normalisation layers kept
  local; only on a network with learned normalisation), ``finetune`` (FedAvg, then each
  site fine-tunes the final model; the held-out metric is the global model's, the sites'
  validation gain is shown apart), ``secagg`` (FedAvg under SecAgg+), ``dp-epsN`` (FedAvg
  with Flower's LocalDpMod on every site, ``--dp-clip``, epsilon N, ``--dp-delta``).

The federated arms are the real ServerApp body (``run_federation``) and ClientApp over
``tests/loopback.py``'s in-memory grid (one process per arm, the sites in turn; ``--jobs``
arms at a time). ``--check-sim`` runs, per data set, the FedAvg arm of the lowest seed on the first
split once more on Flower's Simulation Engine (``fedpacs.deploy.simulate.simulate``, Ray)
on the same split and compares the two runs' global weights round by round (the server
aggregates in site-name order, so the same seed gives bit-identical weights).

Targets (issue #15), checked on the means over seeds: FedAvg >= 99 % of centralized on
IID; the best federated method >= 97 % of centralized at Dirichlet alpha 0.5; every
federated method above the local-only mean; DP cost <= 4 % at the recommended epsilon
(``--dp-recommended``); SecAgg+ within 0.005 of plain FedAvg.

Usage: python bench/accuracy.py [--quick] [--datasets breastmnist,...] [--splits iid,dir0.5]
           [--methods fedavg,...] [--seeds 3] [--rounds N] [--sites 3] [--jobs 2]
           [--check-sim] [--readme README.md] [--json runs/bench/accuracy.json]
       python bench/accuracy.py --from-json runs/bench/accuracy.json --readme README.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.round_overhead import command_line, describe_machine, machine  # noqa: E402
from bench.zoo import rewrite_section, round_seconds, short_machine, write_json  # noqa: E402
from fedpacs.common.tasks import TASK_PRESETS, training_defaults  # noqa: E402
from fedpacs.deploy.demo import DEMO_DATA, resolve_data_dir  # noqa: E402

BEGIN, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
DEFAULT_SITES = 3
DEFAULT_ROUNDS = 5
PROXIMAL_MU = 0.01
DP_CLIP = 1.0
DP_DELTA = 1e-5
DP_EPSILONS = (10.0, 1000.0)
IID_RATIO, SKEW_RATIO, DP_COST, SECAGG_TOL = 0.99, 0.97, 0.04, 0.005


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class DataSet:
    """A data set of the table: its task preset (network, recipe), the metric read."""

    name: str
    label: str
    metric: str  # the held-out record's key
    metric_label: str
    has_source: bool = False  # a source per case (scanner, hospital, subset): none here


DATASETS: dict[str, DataSet] = {
    "hippocampus": DataSet("hippocampus", "MSD hippocampus (3D U-Net)", "dice-mean",
                           "mean foreground Dice"),
    "breastmnist": DataSet("breastmnist", "BreastMNIST (ResNet-18)", "auc", "AUC"),
    "pneumoniamnist": DataSet("pneumoniamnist", "PneumoniaMNIST (ResNet-18)", "auc", "AUC"),
    "adrenalmnist3d": DataSet("adrenalmnist3d", "AdrenalMNIST3D (3D ResNet-18)", "auc",
                              "AUC"),
}

# split name -> (partitioner, alpha)
SPLITS: dict[str, tuple[str, float]] = {
    "iid": ("iid", 0.0), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1),
    "source": ("source", 0.0)}
SPLIT_LABELS = {"iid": "IID", "dir0.5": "Dirichlet α=0.5", "dir0.1": "Dirichlet α=0.1",
                "source": "by source"}

BASELINES = ("centralized", "local")


def same_curve(sha: list[str], ref_sha: list[str], curve: list[float],
               ref_curve: list[float]) -> dict[str, Any]:
    """How far a run's rounds (weight hashes, held-out curve) are from the reference
    run's: rounds with identical weights, all identical, the largest metric difference."""
    return {"identical_rounds": sum(a == b for a, b in zip(sha, ref_sha, strict=False)),
            "all_identical": sha == ref_sha and bool(sha),
            "max_abs_diff": max((abs(a - b) for a, b in zip(curve, ref_curve, strict=False)),
                                default=0.0)}

def dp_method(eps: float) -> str:
    return f"dp-eps{eps:g}"


SECAGG_CLIP_PREFIX = "secagg-clip"  # secagg-clipN: FedAvg under SecAgg+ at --secagg-clip N


def variant_clip(method: str) -> float | None:
    """The clip of a SecAgg+ variant (``secagg-clipN``, N > 0), None for any other method."""
    if not method.startswith(SECAGG_CLIP_PREFIX):
        return None
    try:
        clip = float(method.removeprefix(SECAGG_CLIP_PREFIX))
    except ValueError:
        return None
    return clip if clip > 0 else None


def is_variant(method: str) -> bool:
    """A method run only when asked by name (--methods): SecAgg+ at another clip."""
    return variant_clip(method) is not None


def all_methods(epsilons: Sequence[float] = DP_EPSILONS) -> list[str]:
    return [*BASELINES, "fedavg", "fedprox", "fedbn", "finetune", "secagg",
            *(dp_method(e) for e in epsilons)]


def method_label(method: str) -> str:
    fixed = {"centralized": "centralized (pooled)", "local": "local only (mean over sites)",
             "fedavg": "FedAvg", "fedprox": f"FedProx (μ={PROXIMAL_MU:g})", "fedbn": "FedBN",
             "finetune": "FedAvg + local fine-tuning", "secagg": "FedAvg under SecAgg+"}
    if method.startswith("dp-eps"):
        return f"FedAvg + local DP ε={method.removeprefix('dp-eps')}"
    if is_variant(method):
        return f"FedAvg under SecAgg+, clip {method.removeprefix(SECAGG_CLIP_PREFIX)}"
    return fixed.get(method, method)


def is_federated(method: str) -> bool:
    return method not in BASELINES


@dataclass(frozen=True)
class Arm:
    """One run of the grid: a method on one data set's split with one seed."""

    dataset: str
    split: str
    seed: int
    method: str
    rounds: int
    sites: int
    local_epochs: int = 0  # 0: the task's default (training_defaults)


def epochs_of(dataset: str, local_epochs: int) -> int:
    """Local epochs per round of a run (``local_epochs``, 0: the task's default)."""
    return local_epochs or training_defaults(dataset).local_epochs


def not_applicable(dataset: str, split: str, method: str) -> str:
    """Why a cell of the grid cannot run ('' when it can)."""
    ds = DATASETS[dataset]
    if split == "source" and not ds.has_source:
        return "no source per case in this data set (shared/data PROVENANCE.md)"
    if SPLITS[split][0] == "dirichlet" and TASK_PRESETS[dataset].kind != "classification":
        return "label skew needs one class per case (segmentation: iid, quantity or source)"
    if method == "fedbn" and not has_learned_norm(dataset):
        return (f"the {TASK_PRESETS[dataset].network} has no learned normalisation: "
                "FedBN is refused (see fine-tuning)")
    return ""


def has_learned_norm(dataset: str) -> bool:
    from fedpacs.common.models import norm_state_count

    return norm_state_count(TASK_PRESETS[dataset]) > 0


def grid(*, datasets: Sequence[str], splits: Sequence[str], methods: Sequence[str],
         seeds: Sequence[int], rounds: dict[str, int], sites: int, local_epochs: int = 0
         ) -> tuple[list[Arm], dict[tuple[str, str, str], str]]:
    """The arms to run, and the (data set, split, method) cells that cannot run, why."""
    arms: list[Arm] = []
    skipped: dict[tuple[str, str, str], str] = {}
    for d in datasets:
        for s in splits:
            for m in methods:
                why = not_applicable(d, s, m)
                if why:
                    skipped[(d, s, m)] = why
                    continue
                arms += [Arm(d, s, seed, m, rounds[d], sites, local_epochs) for seed in seeds]
    return arms, skipped


# quick: ~30 min on this 2-core machine with --jobs 2
QUICK: tuple[tuple[str, tuple[str, ...], tuple[str, ...] | None, tuple[int, ...], int], ...] = (
    ("breastmnist", ("iid", "dir0.5", "dir0.1"), None, (0, 1, 2), 5),
    ("pneumoniamnist", ("iid", "dir0.5"), None, (0, 1), 3),
    ("hippocampus", ("iid",), ("centralized", "local", "fedavg"), (0,), 3),
)

QUICK_CHECKS = ("breastmnist", "pneumoniamnist")  # simulation and deployed run, --quick


def quick_grid(sites: int, epsilons: Sequence[float]
               ) -> tuple[list[Arm], dict[tuple[str, str, str], str]]:
    arms: list[Arm] = []
    skipped: dict[tuple[str, str, str], str] = {}
    for d, splits, methods, seeds, rounds in QUICK:
        a, s = grid(datasets=[d], splits=splits, methods=methods or all_methods(epsilons),
                    seeds=seeds, rounds={d: rounds}, sites=sites)
        arms += a
        skipped |= s
    return arms, skipped


# --------------------------------------------------------------------------- one arm
@dataclass
class Result:
    dataset: str
    split: str
    seed: int
    method: str
    rounds: int
    sites: int
    local_epochs: int = 0  # 0: the task's default
    value: float = math.nan  # the held-out metric after the last round
    accuracy: float = math.nan
    curve: list[float] = field(default_factory=list)  # held-out metric, rounds 0..N
    weights_sha256: list[str] = field(default_factory=list)
    local_spread: dict[str, float] = field(default_factory=dict)  # local: over sites
    personal_gain: float = math.nan  # finetune: site validation metric after - before
    diverged: bool = False  # the held-out loss after the last round is not finite
    # site-rounds that added nothing to the global model: a site dropped under SecAgg+,
    # failed, sent no reply, or was rejected (sites minus the round's training sites)
    lost: int = 0
    round_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    error: str = ""


def data_spec(dataset: str, data_dir: Path) -> Any:
    from fedpacs.common.config import DataSpec

    td = DEMO_DATA[dataset]
    return DataSpec(format=td.format, root=(data_dir / td.relpath).resolve(),
                    holdout_fraction=0.2, seed=0)


def base_config(arm: Arm) -> Any:
    """The run config of ``arm`` (before the split's held-out data and run folder)."""
    from fedpacs.common.config import RunConfig

    d = training_defaults(arm.dataset)
    epochs = epochs_of(arm.dataset, arm.local_epochs)
    cfg = RunConfig(task=arm.dataset, rounds=arm.rounds, local_epochs=epochs,
                    batch_size=d.batch_size, lr=d.lr, min_sites=arm.sites, seed=arm.seed,
                    secagg=False, cross_site=False)
    m = arm.method
    if m == "fedprox":
        cfg = replace(cfg, strategy="fedprox", proximal_mu=PROXIMAL_MU)
    elif m == "fedbn":
        cfg = replace(cfg, fedbn=True)
    elif m == "finetune":
        cfg = replace(cfg, personalize="finetune", personalize_epochs=epochs)
    elif m == "secagg":
        cfg = replace(cfg, secagg=True)
    elif (clip := variant_clip(m)) is not None:
        cfg = replace(cfg, secagg=True, secagg_clip=clip)
    elif m.startswith("dp-eps"):
        cfg = replace(cfg, dp_clip=DP_CLIP, dp_epsilon=float(m.removeprefix("dp-eps")),
                      dp_delta=DP_DELTA)
    return cfg


def prepare_cell(arm: Arm, data_dir: Path, work: Path) -> Any:
    """The split of ``arm``'s (data set, split, seed) and its sites' configs, written once
    under ``work`` by the simulation's own preparation (split.json, sites/site-NNN.toml)."""
    from fedpacs.deploy.simulate import SimulationOptions, prepare

    partitioner, alpha = SPLITS[arm.split]
    cell = work / f"{arm.dataset}-{arm.split}-s{arm.seed}"
    return prepare(cfg=base_config(replace(arm, method="fedavg")), options=SimulationOptions(
        data=data_spec(arm.dataset, data_dir), sites=arm.sites, partition=partitioner,
        alpha=alpha or 0.5, split_seed=arm.seed), run_dir=cell)


def heldout_value(record: dict[str, Any], key: str) -> float:
    v = (record.get("heldout") or {}).get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def site_rounds_lost(rows: Sequence[dict[str, Any]], sites: int) -> int:
    """Site-rounds of a run's metrics.json rounds (after round 0) that added nothing to the
    global model: ``sites`` minus the round's training sites."""
    return sum(max(0, sites - len(r.get("train_sites") or {})) for r in rows[1:])


def is_finite_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def run_arm(arm: Arm, data_dir: str, work: str) -> Result:
    """One arm in this (worker) process; a failure is a Result with its error."""
    import logging

    import torch

    from fedpacs.common.errors import FedpacsError

    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    res = Result(arm.dataset, arm.split, arm.seed, arm.method, arm.rounds, arm.sites,
                 arm.local_epochs)
    key = DATASETS[arm.dataset].metric
    t0 = time.monotonic()
    try:
        cell = Path(work) / f"{arm.dataset}-{arm.split}-s{arm.seed}"
        files = sorted((cell / "sites").glob("*.toml"))
        cfg = json.loads((cell / "prepared-config.json").read_text())
        from fedpacs.common.config import RunConfig

        prepared = RunConfig.from_flat(cfg, check=False)
        own = base_config(arm)
        out = cell / arm.method
        cfg_run = replace(own, eval_format=prepared.eval_format, eval_root=prepared.eval_root,
                          eval_holdout_fraction=prepared.eval_holdout_fraction,
                          eval_seed=prepared.eval_seed, run_dir=str(out))
        if arm.method in BASELINES:
            from fedpacs.deploy.cli.baseline import sites_from_configs
            from fedpacs.server.baseline import run_centralized, run_local

            sites = sites_from_configs(files, cfg_run)
            run = run_centralized if arm.method == "centralized" else run_local
            run(cfg=cfg_run, sites=sites, out=out, device="cpu")
        else:
            from bench.zoo import federate

            problems = cfg_run.validate()
            if problems:
                raise ValueError("; ".join(map(str, problems)))
            federate(cfg_run, {i + 1: p for i, p in enumerate(files)})
        metrics = json.loads((out / "metrics.json").read_text())
        rows = metrics["rounds"]
        res.curve = [heldout_value(r, key) for r in rows]
        res.value = res.curve[-1]
        res.accuracy = heldout_value(rows[-1], "accuracy")
        res.weights_sha256 = [str(r.get("weights_sha256", "")) for r in rows]
        res.round_s = round_seconds(rows)
        if arm.method not in BASELINES:
            res.lost = site_rounds_lost(rows, arm.sites)
            idle = [r["round"] for r in rows[1:] if not r.get("train_sites")]
            if idle:
                res.error = f"no site trained in round(s) {idle}: the sites' logs say why"
        if arm.method == "local":
            res.local_spread = rows[-1].get("heldout_spread", {}).get(key, {})
        if arm.method == "finetune":
            gain = (metrics.get("personalization") or {}).get("gain", {})
            g = gain.get(f"val-{key}")  # (None: NaN, a site whose validation split has
            res.personal_gain = float(g) if is_finite_number(g) else math.nan  # one class)
        res.diverged = not is_finite_number((rows[-1].get("heldout") or {}).get("loss"))
        if not math.isfinite(res.value) and not res.diverged and not res.error:
            res.error = f"held-out {key} after the last round is {res.value}"
    except (FedpacsError, RuntimeError, ValueError, OSError, KeyError, TypeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:600]
    res.wall_s = time.monotonic() - t0
    return res


# --------------------------------------------------------------------------- simulation
def check_simulation(arm: Arm, data_dir: Path, work: Path, loop: Result) -> dict[str, Any]:
    """``arm`` (FedAvg) once more on Flower's Simulation Engine on the same split; its
    global weights round by round against the loopback run's."""
    from fedpacs.common.errors import FedpacsError
    from fedpacs.deploy.simulate import SimulationOptions, simulate

    cell = work / f"{arm.dataset}-{arm.split}-s{arm.seed}"
    partitioner, alpha = SPLITS[arm.split]
    t0 = time.monotonic()
    out: dict[str, Any] = {"dataset": arm.dataset, "split": arm.split, "seed": arm.seed,
                           "rounds": arm.rounds}
    try:
        res = simulate(cfg=base_config(arm), options=SimulationOptions(
            data=data_spec(arm.dataset, data_dir), sites=arm.sites, partition=partitioner,
            alpha=alpha or 0.5, split_seed=arm.seed, split_file=cell / "split.json"),
            run_dir=work / f"sim-{arm.dataset}", echo=lambda s: None)
        rows = json.loads((res.run_dir / "metrics.json").read_text())["rounds"]
        sim_sha = [str(r.get("weights_sha256", "")) for r in rows]
        key = DATASETS[arm.dataset].metric
        sim_curve = [heldout_value(r, key) for r in rows]
        out |= {"sim_curve": sim_curve, "loop_curve": loop.curve,
                **same_curve(sim_sha, loop.weights_sha256, sim_curve, loop.curve),
                "sim_wall_s": res.wall_s}
    except (FedpacsError, RuntimeError, ValueError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:600]
    out["wall_s"] = time.monotonic() - t0
    return out


def check_deployed(arm: Arm, data_dir: Path, work: Path, loop: Result) -> dict[str, Any]:
    """``arm`` (FedAvg, its ``rounds``) on a real federation on this machine (SuperLink,
    one SuperNode and site daemon per site, TLS, signed app: fedpacs.deploy.demo.run_once)
    whose sites read the same split (the generated site configs, renamed site-a, site-b,
    ... in the same order, so the server aggregates them in the same order); its global
    weights and held-out curve against the loopback run's first rounds."""
    import tomllib

    import tomli_w

    from fedpacs.common.config import RunConfig
    from fedpacs.common.errors import FedpacsError
    from fedpacs.deploy.demo import run_once, site_names, site_specs
    from fedpacs.server.coordinator.pki import provision

    cell = work / f"{arm.dataset}-{arm.split}-s{arm.seed}"
    dep = work / f"deployed-{arm.dataset}"
    out: dict[str, Any] = {"dataset": arm.dataset, "split": arm.split, "seed": arm.seed,
                           "rounds": arm.rounds}
    t0 = time.monotonic()
    try:
        names = site_names(arm.sites)
        pki = provision(dep / "pki", sites=names)
        (dep / "sites").mkdir(parents=True, exist_ok=True)
        files = []
        for name, src in zip(names, sorted((cell / "sites").glob("*.toml")), strict=True):
            doc = tomllib.loads(src.read_text(encoding="utf-8"))
            doc["site"]["name"] = name
            doc["security"] = {"require_secagg": False,
                               "trusted_app_keys": [str(pki.app_pub.resolve())]}
            path = dep / "sites" / f"{name}.toml"
            path.write_text(tomli_w.dumps(doc), encoding="utf-8")
            files.append(path)
        prepared = RunConfig.from_flat(
            json.loads((cell / "prepared-config.json").read_text()), check=False)
        cfg = replace(base_config(arm), eval_format=prepared.eval_format,
                      eval_root=prepared.eval_root,
                      eval_holdout_fraction=prepared.eval_holdout_fraction,
                      eval_seed=prepared.eval_seed)
        res = run_once(dep, pki, site_specs(files), cfg, timeout_s=1800.0,
                       echo=lambda s: None)
        rows = json.loads((res.run_dir / "metrics.json").read_text())["rounds"]
        sha = [str(r.get("weights_sha256", "")) for r in rows]
        curve = [heldout_value(r, DATASETS[arm.dataset].metric) for r in rows]
        ref = loop.weights_sha256[: len(sha)]
        out |= {"sim_curve": curve, "loop_curve": loop.curve[: len(curve)],
                **same_curve(sha, ref, curve, loop.curve),
                "sim_wall_s": res.seconds}
    except (FedpacsError, RuntimeError, ValueError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:600]
    out["wall_s"] = time.monotonic() - t0
    return out


# --------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class Cell:
    """A (data set, split, method) over its seeds."""

    mean: float
    std: float
    n: int
    wall_s: float
    failed: int = 0
    diverged: int = 0  # of the seeds (not in the mean: see Result.diverged)
    lost: int = 0  # site-rounds that added nothing, over the seeds (Result.lost)

    def text(self) -> str:
        if self.n == 0:
            return f"diverged ({self.diverged})" if self.diverged else "failed"
        spread = f" ± {self.std:.3f}" if self.n > 1 else ""
        more = f" [{self.diverged} diverged]" if self.diverged else ""
        lost = f" [{self.lost} site-rounds lost]" if self.lost else ""
        return f"{self.mean:.3f}{spread} ({self.n}){more}{lost}"


def load_result(record: dict[str, Any]) -> Result:
    """A Result from its JSON record. A diverged run is its own count, not a failure
    (records written before that was so carry the metric's NaN as an error)."""
    r = Result(**record)
    if r.diverged and r.error.startswith("held-out "):
        r.error = ""
    return r


def summarize(results: Sequence[Result]) -> dict[tuple[str, str, str], Cell]:
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.split, r.method), []).append(r)
    out = {}
    for k, rs in groups.items():
        ok = [r.value for r in rs if not r.error and not r.diverged]
        diverged = sum(1 for r in rs if r.diverged and not r.error)
        out[k] = Cell(statistics.mean(ok) if ok else math.nan,
                      statistics.pstdev(ok) if len(ok) > 1 else 0.0, len(ok),
                      statistics.mean(r.wall_s for r in rs), len(rs) - len(ok) - diverged,
                      diverged, sum(r.lost for r in rs if not r.error))
    return out


@dataclass(frozen=True)
class Verdict:
    target: str
    scope: str  # data set (and split)
    status: str  # PASS | MISS | n/a
    detail: str


def verdicts(cells: dict[tuple[str, str, str], Cell], *, recommended_eps: float
             ) -> list[Verdict]:
    """The issue's targets on the means over seeds, each with the figures behind it."""
    out: list[Verdict] = []

    def get(d: str, s: str, m: str) -> Cell | None:
        c = cells.get((d, s, m))
        return c if c is not None and c.n > 0 else None

    datasets = sorted({d for d, _, _ in cells}, key=list(DATASETS).index)
    for d in datasets:
        label = DATASETS[d].label.split(" (")[0]
        central, fedavg = get(d, "iid", "centralized"), get(d, "iid", "fedavg")
        t = "FedAvg ≥ 99 % of centralized (IID)"
        if central and fedavg:
            r = fedavg.mean / central.mean
            out.append(Verdict(t, label, "PASS" if r >= IID_RATIO else "MISS",
                               f"{fedavg.mean:.3f} / {central.mean:.3f} = {100 * r:.1f} %"))
        else:
            out.append(Verdict(t, label, "n/a", "not run"))
        t = "best federated ≥ 97 % of centralized (α=0.5)"
        central = get(d, "dir0.5", "centralized")
        fed = {m: c for (dd, s, m), c in cells.items() if dd == d and s == "dir0.5"
               and is_federated(m) and c.n > 0}
        if central and fed:
            best = max(fed, key=lambda m: fed[m].mean)
            r = fed[best].mean / central.mean
            out.append(Verdict(t, label, "PASS" if r >= SKEW_RATIO else "MISS",
                               f"{method_label(best)} {fed[best].mean:.3f} / "
                               f"{central.mean:.3f} = {100 * r:.1f} %"))
        else:
            out.append(Verdict(t, label, "n/a", "not run (label skew: classification only)"
                               if TASK_PRESETS[d].kind != "classification" else "not run"))
        for s in [s for s in SPLITS if any(k[:2] == (d, s) for k in cells)]:
            local = get(d, s, "local")
            fed = {m: c for (dd, ss, m), c in cells.items() if dd == d and ss == s
                   and is_federated(m) and c.n > 0}
            t = "every federated method > local-only mean"
            scope = f"{label}, {SPLIT_LABELS[s]}"
            if local and fed:
                below = [f"{method_label(m)} {c.mean:.3f}" for m, c in fed.items()
                         if c.mean <= local.mean]
                below += [f"{method_label(m)} diverged in {c.diverged} seed(s)"
                          for (dd, ss, m), c in cells.items() if dd == d and ss == s
                          and is_federated(m) and c.diverged]
                lowest = min(c.mean for c in fed.values())
                out.append(Verdict(t, scope, "MISS" if below else "PASS",
                                   f"local {local.mean:.3f}; " + (
                                       "at or below: " + ", ".join(below) if below else
                                       f"lowest federated {lowest:.3f}")))
            plain, sec = get(d, s, "fedavg"), get(d, s, "secagg")
            if plain and sec:
                diff = sec.mean - plain.mean
                out.append(Verdict("SecAgg+ within 0.005 of FedAvg", scope,
                                   "PASS" if abs(diff) <= SECAGG_TOL else "MISS",
                                   f"{sec.mean:.3f} − {plain.mean:.3f} = {diff:+.4f}"))
        plain = get(d, "iid", "fedavg")
        dps = sorted((float(m.removeprefix("dp-eps")), c) for (dd, s, m), c in cells.items()
                     if dd == d and s == "iid" and m.startswith("dp-eps")
                     and (c.n > 0 or c.diverged))
        for eps, dp in dps:
            if plain is None:
                break
            judged = " (judged)" if eps == recommended_eps else " (shown)"
            if dp.diverged:
                out.append(Verdict(f"DP cost ≤ 4 % at ε={eps:g}{judged} (IID)", label, "MISS",
                                   f"diverged (held-out loss NaN) in {dp.diverged} of "
                                   f"{dp.n + dp.diverged} seeds"))
                continue
            cost = (plain.mean - dp.mean) / plain.mean
            out.append(Verdict(f"DP cost ≤ 4 % at ε={eps:g}{judged} (IID)", label,
                               "PASS" if cost <= DP_COST else "MISS",
                               f"{dp.mean:.3f} vs FedAvg {plain.mean:.3f}: cost "
                               f"{100 * cost:.1f} %"))
    return out


def dp_noise_note(dataset: str, epsilons: Sequence[float]) -> str:
    """How large LocalDpMod's noise is against the clipped update, for the network."""
    import torch

    from fedpacs.common.models import MODELS

    task = TASK_PRESETS[dataset]
    with torch.device("meta"):
        d = sum(v.numel() for v in MODELS[task.network].build(task).state_dict().values())
    parts = []
    for eps in epsilons:
        sigma = DP_CLIP * math.sqrt(2 * math.log(1.25 / DP_DELTA)) / eps
        parts.append(f"ε={eps:g}: σ={sigma:.2g} per entry, noise norm ≈ σ·√d = "
                     f"{sigma * math.sqrt(d):.3g}")
    return (f"{DATASETS[dataset].label.split(' (')[0]}: d = {d:,} values sent; the clipped "
            f"update's norm ≤ {DP_CLIP:g}; " + "; ".join(parts))


# --------------------------------------------------------------------------- output
def dataset_table(d: str, cells: dict[tuple[str, str, str], Cell],
                  skipped: dict[tuple[str, str, str], str], results: Sequence[Result],
                  methods: Sequence[str]) -> list[str]:
    splits = [s for s in SPLITS if any(k[0] == d and k[1] == s for k in (*cells, *skipped))]
    head = ["method", *(SPLIT_LABELS[s] for s in splits), "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in methods:
        if not any(k[0] == d and k[2] == m for k in (*cells, *skipped)):
            continue
        row = [method_label(m)]
        walls = []
        for s in splits:
            c = cells.get((d, s, m))
            if c is not None:
                extra = ""
                if m == "local":
                    spreads = [r.local_spread for r in results if (r.dataset, r.split,
                               r.method) == (d, s, m) and r.local_spread]
                    if spreads:
                        lo = min(x.get("min", math.nan) for x in spreads)
                        hi = max(x.get("max", math.nan) for x in spreads)
                        extra = f"; sites {lo:.3f}–{hi:.3f}"
                if m == "finetune":
                    gains = [r.personal_gain for r in results if (r.dataset, r.split,
                             r.method) == (d, s, m) and math.isfinite(r.personal_gain)]
                    if gains:
                        extra = f"; site val {statistics.mean(gains):+.3f}"
                row.append(c.text() + extra + (f" [{c.failed} failed]" if c.failed and c.n
                                               else ""))
                walls.append(c.wall_s)
            elif (d, s, m) in skipped:
                row.append("n/a")
            else:
                row.append("–")
        row.append(f"{statistics.mean(walls):.0f}" if walls else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


FULL_SEEDS = 3  # the grid: every cell over 3 seeds


def spoken_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def grid_gaps(results: Sequence[Result], skipped: dict[tuple[str, ...], str],
              methods: Sequence[str] | None = None) -> list[str]:
    """What the full grid (every data set, split and method over FULL_SEEDS seeds) has
    that ``results`` lack, per data set and split: 'not run', or the methods with fewer
    seeds. Failed runs do not count; diverged ones do (they ran)."""
    methods = list(methods or all_methods())
    seeds: dict[tuple[str, str, str], set[int]] = {}
    for r in results:
        if not r.error:
            seeds.setdefault((r.dataset, r.split, r.method), set()).add(r.seed)
    gaps = []
    for d, ds in DATASETS.items():
        for s in SPLITS:
            cells = [m for m in methods if (d, s, m) not in skipped and not is_variant(m)
                     and not not_applicable(d, s, m)]
            if not cells or (s == "source" and not ds.has_source):
                continue
            scope = f"{ds.label.split(' (')[0]} {SPLIT_LABELS[s]}"
            have = {m: len(seeds.get((d, s, m), ())) for m in cells}
            if not any(have.values()):
                gaps.append(f"{scope}: not run")
                continue
            by_n: dict[int, list[str]] = {}
            for m, n in have.items():
                if n < FULL_SEEDS:
                    by_n.setdefault(n, []).append(method_label(m))
            if by_n:
                gaps.append(f"{scope}: " + "; ".join(
                    (f"{n} of {FULL_SEEDS} seeds for " if n else "not run: ") + ", ".join(ms)
                    for n, ms in sorted(by_n.items())))
    return gaps


def merge_docs(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' documents as one: their results (a run repeated in a later document
    replaces the earlier: the same seed gives the same weights), checks, commands and
    times. The earlier documents' ``left`` and notes are dropped (the gaps are computed
    from the merged results; reasons are given again with --note)."""
    if len(docs) == 1:
        return docs[0]
    results: dict[tuple[Any, ...], dict[str, Any]] = {}
    sims: dict[tuple[str, str], dict[str, Any]] = {}
    out: dict[str, Any] = dict(docs[-1])
    commands: list[str] = []
    for doc in docs:
        for r in doc["results"]:
            key = (r["dataset"], r["split"], r["seed"], r["method"], r["rounds"],
                   r.get("local_epochs", 0))
            results[key] = r
        for sim in doc.get("simulation", []):
            sims[(sim.get("kind", "simulation"), sim["dataset"])] = sim
        c = doc["command"]
        commands += c if isinstance(c, list) else [c]
    out["results"] = [asdict(r) for r in sorted((load_result(r) for r in results.values()),
                                                key=order_key)]
    out["simulation"] = list(sims.values())
    out["command"] = list(dict.fromkeys(commands))
    out["total_s"] = sum(float(d["total_s"]) for d in docs)
    out["jobs"] = max(int(d["jobs"]) for d in docs)
    out["methods"] = with_variants(
        all_methods([float(m.removeprefix("dp-eps")) for d in docs for m in d["methods"]
                     if m.startswith("dp-eps")]), [m for d in docs for m in d["methods"]])
    out["skipped"] = {k: v for d in docs for k, v in d["skipped"].items()}
    out["dp_notes"] = list(dict.fromkeys(n for d in docs for n in d.get("dp_notes", [])))
    out["left"], out["notes"] = [], []
    return out


def readme_body(doc: dict[str, Any]) -> str:
    results = [load_result(r) for r in doc["results"]]
    skipped = {tuple(k.split("|")): v for k, v in doc["skipped"].items()}
    cells = summarize(results)
    methods = doc["methods"]
    eps = float(doc["dp_recommended"])
    commands = doc["command"] if isinstance(doc["command"], list) else [doc["command"]]
    said = spoken_list([f"`{c}`" for c in commands]) if len(commands) <= 2 else (
        f"{len(commands)} commands, merged with `--from-json` (listed below the tables)")
    out = [f"{said}: {len(results)} runs "
           f"({sum(1 for r in results if r.error)} failed), {doc['total_s'] / 60:.1f} min in "
           f"all on {doc['machine_line']}, {doc['jobs']} runs at a time (each one process, "
           "one torch thread). Federated arms: the real ServerApp and ClientApp over the "
           "in-memory grid (`tests/loopback.py`), the sites in turn; baselines: `fedpacs "
           "baseline`'s library functions on the same generated site configs (`[data] "
           "split`). s / run: one run's wall time, mean over seeds (local: the sites in "
           "turn).", ""]
    for d in [d for d in DATASETS if any(k[0] == d for k in (*cells, *skipped))]:
        rs = [r for r in results if r.dataset == d]
        seeds = sorted({r.seed for r in rs})
        td = training_defaults(d)
        rounds = sorted({r.rounds for r in rs})
        sites = sorted({r.sites for r in rs})
        epochs = sorted({epochs_of(d, r.local_epochs) for r in rs})
        out += [f"**{DATASETS[d].label}**: held-out {DATASETS[d].metric_label} "
                f"(mean ± std over seeds, number of seeds in brackets); "
                f"{'/'.join(map(str, sites))} sites, "
                f"{'/'.join(map(str, rounds))} rounds × {'/'.join(map(str, epochs))} "
                "local epochs "
                f"(baselines: the same epoch budget), batch {td.batch_size}, lr {td.lr:g}, "
                f"seeds {', '.join(map(str, seeds))} (the seed draws the split and the "
                "initial weights).", ""]
        out += dataset_table(d, cells, skipped, results, methods)
        notes = sorted({v for k, v in skipped.items() if k[0] == d})
        out += [""] + [f"n/a: {n}." for n in notes] + [""]
    missing = [*doc.get("left", []), *grid_gaps(results, skipped, methods)]
    if missing:
        out += ["Not in this run: " + "; ".join(missing) + ".", ""]
    out += ["Targets of issue #15, on the means over seeds:", "",
            "| target | scope | verdict | figures |", "| --- | --- | --- | --- |"]
    for v in verdicts(cells, recommended_eps=eps):
        out.append(f"| {v.target} | {v.scope} | **{v.status}** | {v.detail} |")
    out += ["", "Diverged: a run whose held-out loss after the last round is not finite "
            "(the network's outputs are NaN); it is left out of the mean, whatever metric "
            "was recorded for it (`common/metrics.auc` gives NaN for NaN scores; records of "
            "earlier runs, which read AUC 1.000 for them, are read as diverged too)."]
    out += ["", "FedBN and fine-tuning: the held-out figure is the server's global model "
            "(under FedBN with its normalisation layers averaged, which no site uses); a "
            "site's own model is measured on its validation split only (fine-tuning: `site "
            "val`, the mean gain of the sites' validation metric after fine-tuning)."]
    out += ["", f"Local DP: Flower's LocalDpMod on each site's update, clip {DP_CLIP:g} "
            f"(L2, also the sensitivity), δ = {DP_DELTA:g}, Gaussian noise on every value "
            "sent, each round (the ε is per round; over R rounds it composes). The README "
            f"recommends no ε; the DP target is judged at ε = {eps:g}, the weaker privacy "
            "of the two measured (both are shown). "
            + " ".join(f"{n}." for n in doc.get("dp_notes", []))]
    for sim in doc.get("simulation", []):
        kind = sim.get("kind", "simulation")
        what = ("Simulation engine (Ray)" if kind == "simulation" else
                "Deployed run (SuperLink, one SuperNode and site daemon per site, TLS, "
                "signed app; sites renamed site-a.., the same split)")
        if "error" in sim:
            out += ["", f"{what} ({sim['dataset']}): failed: {sim['error']}"]
            continue
        out += ["", f"{what} vs in-memory grid ({DATASETS[sim['dataset']].label}, "
                f"FedAvg, {SPLIT_LABELS[sim['split']]}, seed {sim['seed']}, {sim['rounds']} "
                f"rounds): global weights identical in {sim['identical_rounds']} of "
                f"{len(sim['sim_curve'])} rounds (round 0 included) "
                f"({'bit-identical' if sim['all_identical'] else 'NOT identical'}); held-out "
                "curve " + " → ".join(f"{v:.3f}" for v in sim["sim_curve"]) +
                f" (largest difference {sim['max_abs_diff']:.2g}); "
                f"{'Ray run' if kind == 'simulation' else 'federation up, run and down'} "
                f"{sim['sim_wall_s']:.0f} s."]
    for line in doc.get("notes", []):
        out += ["", line]
    if len(commands) > 2:
        out += ["", "The commands:", ""] + [f"- `{c}`" for c in commands]
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--splits", default="iid,dir0.5,dir0.1,source")
    ap.add_argument("--methods", default="", help="default: all")
    ap.add_argument("--seeds", type=int, default=FULL_SEEDS)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds FIRST .. FIRST+SEEDS-1 (add seeds to an earlier run)")
    ap.add_argument("--local-epochs", type=int, default=0,
                    help="local epochs per round (default 0: the task's)")
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--sites", type=int, default=DEFAULT_SITES)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    ap.add_argument("--dp-epsilons", default=",".join(f"{e:g}" for e in DP_EPSILONS))
    ap.add_argument("--dp-recommended", type=float, default=max(DP_EPSILONS))
    ap.add_argument("--quick", action="store_true", help="the reduced grid (QUICK)")
    ap.add_argument("--check-sim", action="store_true",
                    help="per data set, FedAvg (lowest seed) once more on the Simulation Engine "
                    "(--quick: on)")
    ap.add_argument("--check-deployed", type=int, default=None, metavar="ROUNDS",
                    help="per data set, FedAvg (lowest seed) for ROUNDS rounds on a real "
                    "federation of this machine's processes (default 0: off; --quick: 2)")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here")
    ap.add_argument("--readme", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="train nothing: show (and with --readme/--json write) earlier runs, "
                    "merged")
    ap.add_argument("--note", action="append", default=[],
                    help="with --from-json: a paragraph to add below the table (reasons)")
    ap.add_argument("--deadline-min", type=float, default=None,
                    help="start no new run after this many minutes (default: none; "
                    "--quick: 26)")
    args = ap.parse_args(argv)
    errs = []
    args.dataset_list = parse_list(args.datasets)
    args.split_list = parse_list(args.splits)
    args.epsilons = [float(e) for e in parse_list(args.dp_epsilons)]
    args.method_list = parse_list(args.methods) or all_methods(args.epsilons)
    errs += [f"--datasets: {d!r} is not one of {', '.join(DATASETS)}"
             for d in args.dataset_list if d not in DATASETS]
    errs += [f"--splits: {s!r} is not one of {', '.join(SPLITS)}"
             for s in args.split_list if s not in SPLITS]
    known = all_methods(args.epsilons)
    errs += [f"--methods: {m!r} is not one of {', '.join(known)} or secagg-clipN"
             for m in args.method_list if m not in known and not is_variant(m)]
    if args.seeds < 1 or args.rounds < 1 or args.sites < 1 or args.jobs < 1:
        errs.append("--seeds, --rounds, --sites, --jobs: expected >= 1")
    if args.first_seed < 0 or args.local_epochs < 0:
        errs.append("--first-seed, --local-epochs: expected >= 0")
    if args.note and not args.from_json:
        errs.append("--note: only with --from-json (a note reads the figures of a run)")
    if args.dp_recommended not in args.epsilons:
        errs.append(f"--dp-recommended: expected one of --dp-epsilons {args.epsilons}")
    if errs:
        ap.error("; ".join(errs))
    if args.deadline_min is None:
        args.deadline_min = 26.0 if args.quick else 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        doc = merge_docs([json.loads(p.read_text(encoding="utf-8"))
                          for p in args.from_json])
        doc["notes"] = [*doc.get("notes", []), *args.note]
        return report(doc, args)
    if args.quick:
        arms, skipped = quick_grid(args.sites, args.epsilons)
    else:
        arms, skipped = grid(datasets=args.dataset_list, splits=args.split_list,
                             methods=args.method_list,
                             seeds=range(args.first_seed, args.first_seed + args.seeds),
                             rounds=dict.fromkeys(args.dataset_list, args.rounds),
                             sites=args.sites, local_epochs=args.local_epochs)
    left: list[str] = []  # (the full grid's gaps are computed from the results)
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)  # (the simulation's round logs)
    data_dir = resolve_data_dir(args.data_dir)
    m = machine()
    print(f"command: {command_line()}\nmachine: {describe_machine(m)}", flush=True)
    print(f"{len(arms)} runs, {len(skipped)} cells n/a", flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedpacs-accuracy-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results, refused = prepare_all(arms, data_dir, work)
        runnable = [a for a in arms if not any(r.dataset == a.dataset and r.split == a.split
                                               and r.seed == a.seed for r in refused)]
        results += execute(runnable, data_dir, work, jobs=args.jobs,
                           deadline_s=args.deadline_min * 60 or math.inf, started=t0)
        if args.json:  # (the grid's figures are kept should a check below fail)
            write_json(args.json.with_suffix(".partial.json"),
                       {"results": [asdict(r) for r in sorted(results, key=order_key)],
                        "skipped": {"|".join(k): v for k, v in skipped.items()}})
        not_run = len(runnable) + len(refused) - len(results)
        if not_run > 0:
            left.append(f"{not_run} runs not started before the deadline")
        sims: list[dict[str, Any]] = []
        deployed_rounds = args.check_deployed if args.check_deployed is not None else (
            2 if args.quick else 0)
        for d in dict.fromkeys(a.dataset for a in arms):
            if args.quick and d not in QUICK_CHECKS:
                continue
            loop = sorted((r for r in results if r.dataset == d and r.method == "fedavg"
                           and not r.error), key=order_key)  # IID first, lowest seed
            if not loop:
                continue
            first = loop[0]
            arm = Arm(d, first.split, first.seed, "fedavg", first.rounds, first.sites,
                      first.local_epochs)
            if args.check_sim or args.quick:
                print(f"simulation check: {d} {first.split}", flush=True)
                sims.append({"kind": "simulation"} | check_simulation(arm, data_dir, work,
                                                                      first))
                print(f"  {sims[-1]}", flush=True)
            if deployed_rounds > 0:
                print(f"deployed check: {d} {first.split}", flush=True)
                sims.append({"kind": "deployed"} | check_deployed(
                    replace(arm, rounds=min(deployed_rounds, arm.rounds)), data_dir, work,
                    first))
                print(f"  {sims[-1]}", flush=True)
    total = time.monotonic() - t0
    datasets = list(dict.fromkeys(a.dataset for a in arms))
    doc = {"command": command_line(), "machine": m, "machine_line": short_machine(m),
           "jobs": args.jobs, "total_s": total,
           "methods": with_variants(all_methods(args.epsilons), args.method_list),
           "dp_recommended": args.dp_recommended, "dp_clip": DP_CLIP, "dp_delta": DP_DELTA,
           "dp_notes": [dp_noise_note(d, args.epsilons) for d in datasets],
           "proximal_mu": PROXIMAL_MU,
           "skipped": {"|".join(k): v for k, v in skipped.items()},
           "results": [asdict(r) for r in sorted(results, key=order_key)],
           "simulation": sims, "left": left, "notes": []}
    return report(doc, args)


def with_variants(methods: Sequence[str], asked: Sequence[str]) -> list[str]:
    """``methods`` and, after its SecAgg+ row, the variants among ``asked`` (once each)."""
    extra = list(dict.fromkeys(m for m in asked if is_variant(m)))
    out = list(dict.fromkeys(methods))
    at = out.index("secagg") + 1 if "secagg" in out else len(out)
    return out[:at] + [m for m in extra if m not in out] + out[at:]


def order_key(r: Result) -> tuple[int, int, int, int]:
    order = with_variants(all_methods(), [r.method])
    return (list(DATASETS).index(r.dataset), list(SPLITS).index(r.split),
            order.index(r.method) if r.method in order else 99, r.seed)


def prepare_all(arms: Sequence[Arm], data_dir: Path, work: Path
                ) -> tuple[list[Result], list[Result]]:
    """Each (data set, split, seed)'s split and site configs, once; a split that cannot
    train (refused by the partition checks) is a failed Result for each of its arms."""
    from fedpacs.common.errors import FedpacsError

    failed: list[Result] = []
    done: set[tuple[str, str, int]] = set()
    for a in arms:
        key = (a.dataset, a.split, a.seed)
        if key in done:
            continue
        done.add(key)
        try:
            prep = prepare_cell(a, data_dir, work)
            cell = work / f"{a.dataset}-{a.split}-s{a.seed}"
            (cell / "prepared-config.json").write_text(json.dumps(prep.cfg.to_flat()))
            sizes = [s.get("train", "?") for s in prep.split.summary]
            print(f"  split {a.dataset} {a.split} seed {a.seed}: train cases per site "
                  f"{sizes}" + (f"; {'; '.join(prep.warnings)}" if prep.warnings else ""),
                  flush=True)
        except FedpacsError as exc:
            why = f"split refused: {exc}"[:600]
            print(f"  {why}", flush=True)
            failed += [Result(b.dataset, b.split, b.seed, b.method, b.rounds, b.sites,
                              b.local_epochs, error=why) for b in arms
                       if (b.dataset, b.split, b.seed) == key]
    return list(failed), failed


def execute(arms: Sequence[Arm], data_dir: Path, work: Path, *, jobs: int,
            deadline_s: float, started: float) -> list[Result]:
    """Run the arms, ``jobs`` processes at a time, the costliest first; none started
    after the deadline."""
    import multiprocessing as mp

    cost = {"hippocampus": 4.0, "adrenalmnist3d": 4.0, "pneumoniamnist": 2.0,
            "breastmnist": 1.0}
    # the costliest data sets first, seed by seed: a deadline leaves out whole seeds
    todo = sorted(arms, key=lambda a: (-cost[a.dataset] * a.rounds, a.seed))
    results: list[Result] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        pending = {}
        it = iter(todo)

        def submit() -> None:
            if time.monotonic() - started > deadline_s:
                return
            a = next(it, None)
            if a is not None:
                pending[pool.submit(run_arm, a, str(data_dir), str(work))] = a

        for _ in range(jobs):
            submit()
        while pending:
            fut = next(as_completed(pending))
            pending.pop(fut)
            r = fut.result()
            results.append(r)
            status = f"FAILED {r.error}" if r.error else f"{r.value:.3f}"
            print(f"  [{len(results)}/{len(todo)} {time.monotonic() - started:5.0f} s] "
                  f"{r.dataset} {r.split} s{r.seed} {r.method}: {status} "
                  f"({r.wall_s:.0f} s)", flush=True)
            submit()
    return results


def report(doc: dict[str, Any], args: argparse.Namespace) -> int:
    body = readme_body(doc)
    print("\n" + body)
    if args.json:
        write_json(args.json, doc)
    if args.readme:
        text = args.readme.read_text(encoding="utf-8")
        args.readme.write_text(rewrite_section(text, body, source=str(args.readme),
                                               begin=BEGIN, end=END), encoding="utf-8")
        print(f"  {args.readme}: accuracy section rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
