"""Baselines for a federated run: the same network, recipe and epoch budget trained on
pooled data (centralized) or on each site's data alone (local), evaluated on the same
held-out cases and recorded in the same run-directory format.

What they answer: how much accuracy federation costs against training on every site's
cases in one place (``centralized``), and how much it gains over each hospital training
alone (``local``, reported per site and as the mean over sites with its spread).

**Data access.** A baseline reads every site's training and validation split itself, as
each site would (its site config's ``[data]``, read by fedpacs.client.data, preprocessed
alike; the CLI, fedpacs.deploy.cli.baseline.sites_from_configs, reads them: server code
imports no site code): only a research simulation, where one party holds the pooled
data, can run it. In a real federation the data never leave the hospitals and no one can.

**The same optimisation.** A federated run trains ``rounds`` blocks of ``local_epochs``
epochs: each round a site calls :func:`fedpacs.common.engine.train` once with the round's
learning rate (:func:`fedpacs.common.recipe.round_lr`), a fresh optimiser and the site's
round seed (:func:`fedpacs.common.recipe.round_seed`). A baseline does exactly that on
its data, block by block, one "round" per block: the total budget is
``rounds x local_epochs`` epochs, its curves compare round for round with the federated
run's, and the only difference left is where the data are (pooled, alone, or federated
and averaged). So a centralized baseline over the data of a single site equals a
one-site FedAvg run with the same seed (FedAvg of one update is that update: weight
factor 1.0), which tests/test_baseline.py checks. FedProx's proximal term, FedBN,
SecAgg+ and DP are federation mechanisms and have no part here.

Run directory (the layout of fedpacs.server.rundir, as a federated run's)::

    OUT/                          centralized
      metrics.json                round 0 (the initial model) .. rounds: "train" (the
                                  block's loss), "evaluate"/"evaluate_sites" (the model on
                                  each site's validation split, weighted as FedAvg's
                                  evaluation), "heldout" (the run's held-out split), lr,
                                  timing, hashes: the keys of a federated run's records
      rounds/round-NNN/model.pt   checkpoints;  final/model.pt, final/model_card.json
      baseline.json               kind, sites, epoch budget, held-out case ids
      report/index.html

    OUT/                          local
      sites/SITE/...              one such run directory per site (its own data alone)
      metrics.json                per round: "heldout" the mean over sites,
                                  "heldout_sites" each site's, "heldout_spread" per metric
                                  (std, min, max over sites); "evaluate" each site's model
                                  on its own validation split (weighted mean)
      baseline.json, report/
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from fedpacs.common import wire
from fedpacs.common.artifacts import write_json
from fedpacs.common.config import DataSpec, RunConfig, infer_eval_format
from fedpacs.common.contract import FEDBN_RESTORED, NUM_EXAMPLES, VAL_PREFIX
from fedpacs.common.datasets import SiteData, load_holdout
from fedpacs.common.engine import TrainParams, evaluate, train
from fedpacs.common.errors import ConfigError, FieldError
from fedpacs.common.models import build_model, pick_device
from fedpacs.common.patches import PatchDataset
from fedpacs.common.preprocess import preprocessed
from fedpacs.common.recipe import Recipe, round_lr, round_seed
from fedpacs.common.tasks import TaskConfig
from fedpacs.common.transfer import load_init_model, weights_sha256
from fedpacs.server.recorder import Phase, RoundRecord, Timing, evaluation_phase
from fedpacs.server.report import write_report
from fedpacs.server.rundir import METRICS_FILE, STATUS_FILE, RunDirectory

log = logging.getLogger("fedpacs.baseline")

BASELINE_FILE = "baseline.json"
BASELINE_KINDS = ("centralized", "local")
POOLED_NAME = "pooled"  # the centralized run's one "site" in its train records
DATA_ACCESS = ("reads every site's training and validation data in one place: possible "
               "only in a research simulation that holds the pooled data")


@dataclass(frozen=True)
class BaselineSite:
    """One site's data as the baseline reads it: its name (the site config's), its
    partition (which seeds its blocks, as the site's rounds are seeded) and its splits."""

    name: str
    partition: int
    data: SiteData


# --------------------------------------------------------------------------- inputs
def sites_from_pool(root: Path, cfg: RunConfig, *, partitions: int, fmt: str = "",
                    holdout_fraction: float | None = None) -> list[BaselineSite]:
    """``partitions`` sites sharing one pooled data set, partition ``i`` named
    ``site-i``, each read as a site with ``[data] root, partition = i, num_partitions``
    (and the data's defaults) reads it. ``holdout_fraction`` (default: the run's
    ``eval-holdout-fraction``) must be the sites' own for the held-out cases to stay
    out of every partition."""
    from fedpacs.common.datasets import load_partition

    if partitions < 1:
        raise ConfigError("baseline", [FieldError("--partitions", ">= 1", str(partitions),
                                                  "e.g. --partitions 3")])
    task = cfg.task_config()
    fraction = cfg.eval_holdout_fraction if holdout_fraction is None else holdout_fraction
    out = []
    for i in range(partitions):
        spec = DataSpec(format=(fmt or infer_eval_format(str(root))),  # type: ignore[arg-type,unused-ignore]
                        root=root, partition=i, num_partitions=partitions,
                        holdout_fraction=fraction)
        out.append(BaselineSite(f"site-{i}", i, preprocessed(load_partition(spec, task), task)))
    return out


def check_baseline_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` validated as a run (every problem at once), with the held-out split a
    baseline needs; federation-only rules that do not apply (sites per round, SecAgg+'s
    minimum) are checked on a copy that leaves them out."""
    errs = replace(cfg, secagg=False, min_sites=max(cfg.min_sites, 1)).validate()
    if not cfg.eval_format:
        errs.append(FieldError("[evaluation] root", "the run's held-out data on this host",
                               "nothing", "set [evaluation] root in the run.toml (or "
                               "--eval-root): a baseline is compared on the held-out cases"))
    if errs:
        raise ConfigError("baseline run config", errs)
    return cfg


# --------------------------------------------------------------------------- data
def pooled(sets: Sequence[Dataset]) -> Dataset:
    """The union of the sites' training splits: one TensorDataset when every split is
    one (so that class counts and samplers read its labels at once), one PatchDataset of
    every site's cases for streamed volumes, else a ConcatDataset."""
    if all(isinstance(s, TensorDataset) for s in sets):
        tensors = [s.tensors for s in sets]  # type: ignore[attr-defined]
        return TensorDataset(*(torch.cat(parts) for parts in zip(*tensors, strict=True)))
    if all(isinstance(s, PatchDataset) for s in sets):
        first = sets[0]
        assert isinstance(first, PatchDataset)
        readers = [r for s in sets for r in s.readers]  # type: ignore[attr-defined]
        return PatchDataset(readers, first.task, pos=first.pos, neg=first.neg)
    return ConcatDataset(sets)


def heldout_case_ids(spec: DataSpec, task: TaskConfig) -> list[str]:
    """The held-out split's case ids (``test:INDEX`` for MedMNIST's official test split),
    the same function of the spec the ServerApp's held-out split is."""
    from fedpacs.common import datasets as ds

    if spec.format == "medmnist":
        return [f"test:{i}" for i in range(len(ds.read_medmnist(spec.root)["test_labels"]))]
    if spec.format in ("images", "image-masks"):
        images, _ = ds.list_image_cases(spec, task)
        return [c.case_id for c in ds._holdout_cases(images, spec)]
    cases, _ = ds.list_nifti_cases(spec.root)
    return [c.case_id for c in ds._holdout_cases(cases, spec)]


# --------------------------------------------------------------------------- training
def initial_model(cfg: RunConfig, task: TaskConfig) -> tuple[nn.Module, str]:
    """The federated run's round-0 model: the network's seeded weights, or --init-model's
    (and where they came from)."""
    torch.manual_seed(cfg.seed)
    model = build_model(task, seed=cfg.seed)
    if not cfg.init_model:
        return model, ""
    init = load_init_model(cfg.init_model, task, registry_root=Path(cfg.init_registry)
                           if cfg.init_registry else None)
    model.load_state_dict(init.state_dict)
    return model, f"{init.kind}: {Path(init.source).name}"


def validation(model: nn.Module, vals: dict[str, Dataset], *, task: TaskConfig,
               device: torch.device, recipe: Recipe, seed: int, server_round: int,
               partitions: dict[str, int]) -> Phase:
    """``model`` on each site's validation split, as a site's evaluate reply has it
    (``num-examples``, ``fedbn-restored``, ``val-*``; seeded as the site seeds the message
    that brings round ``server_round``'s evaluation), with the mean weighted by the
    sites' counts as the ServerApp computes it (fedpacs.server.recorder)."""
    records = []
    for name, val in vals.items():
        with torch.random.fork_rng(devices=[]):
            values = evaluate(model, val, task=task, device=device, recipe=recipe,
                              seed=round_seed(seed, server_round, partitions[name]))
        metrics: dict[str, float] = {NUM_EXAMPLES: float(size(val)), FEDBN_RESTORED: 0.0,
                                     **{f"{VAL_PREFIX}{k}": float(v) for k, v in values.items()}}
        records.append(RecordDict({wire.METRICS_KEY: MetricRecord(metrics),  # type: ignore[arg-type]
                                   wire.SITE_KEY: ConfigRecord({"name": name})}))
    return evaluation_phase(records, NUM_EXAMPLES)[1]


@dataclass(frozen=True)
class Block:
    """What one baseline trains: a name (the site's, or "pooled"), the seed partition,
    the training split, and the validation splits it is evaluated on."""

    name: str
    partition: int
    train: Dataset
    vals: dict[str, Dataset]
    val_partitions: dict[str, int]


def train_blocks(cfg: RunConfig, block: Block, *, root: Path, kind: str,
                 holdout: Dataset, device: torch.device) -> RunDirectory:
    """Train ``block`` for the run's ``rounds`` blocks of ``local_epochs`` epochs as a
    site trains its rounds (see the module docstring) and record every block in a run
    directory at ``root``, as the ServerApp records its rounds."""
    task, recipe = cfg.task_config(), cfg.recipe()
    model, init_source = initial_model(cfg, task)
    flat = cfg.to_flat() | {"run-dir": str(root), "baseline": kind}
    run_dir = RunDirectory(root, task=task, config=flat)
    run_dir.write_run_config(flat)
    run_dir.set_status("running", round_=0, total=cfg.rounds)
    n_train = size(block.train)
    try:
        for server_round in range(cfg.rounds + 1):
            started = time.monotonic()
            record = RoundRecord(round=server_round, init_model=init_source
                                 if server_round == 0 else "")
            sites_t: dict[str, dict[str, float]] = {}
            if server_round > 0:
                lr = round_lr(cfg.lr, server_round, cfg.rounds, recipe)
                res = train(model, block.train, task=task, device=device, recipe=recipe,
                            seed=round_seed(cfg.seed, server_round, block.partition),
                            params=TrainParams(epochs=cfg.local_epochs,
                                               batch_size=cfg.batch_size, lr=lr))
                own = {NUM_EXAMPLES: float(res.num_examples), "train-loss": res.loss,
                       "train-seconds": res.seconds}
                record.train = Phase(dict(own), {block.name: dict(own)})
                record.lr = lr
                sites_t = {block.name: {"t-train": res.seconds}}
            record.evaluate = validation(
                model, block.vals, task=task, device=device, recipe=recipe, seed=cfg.seed,
                server_round=min(server_round + 1, cfg.rounds),
                partitions=block.val_partitions)
            held = time.monotonic()
            with torch.random.fork_rng(devices=[]):
                record.heldout = evaluate(model, holdout, task=task, device=device,
                                          recipe=recipe, seed=cfg.seed + server_round)
            record.heldout[NUM_EXAMPLES] = float(size(holdout))
            heldout_s = time.monotonic() - held
            record.weights_sha256 = weights_sha256(model.state_dict())
            record.time = time.time()
            saved = time.monotonic()
            run_dir.save_checkpoint(model, record)
            record.timing = Timing.build(round_s=time.monotonic() - started, exchanges=(),
                                         sites=sites_t, heldout_s=heldout_s,
                                         checkpoint_s=time.monotonic() - saved)
            run_dir.append_round(record)
            run_dir.set_status("running", round_=server_round, total=cfg.rounds)
            log.info("%s baseline %s: block %d/%d (%d epochs on %d samples): %s", kind,
                     block.name, server_round, cfg.rounds, cfg.local_epochs, n_train,
                     record.heldout)
        run_dir.save_final(model, {
            "baseline": kind, "strategy": kind, "num_rounds": cfg.rounds,
            "epochs": cfg.rounds * cfg.local_epochs,
            "sites": {block.name: n_train}, "data_access": DATA_ACCESS})
        write_report(root)
    except BaseException as exc:
        run_dir.set_status("failed", round_=len(run_dir.rounds) - 1, total=cfg.rounds,
                           error=type(exc).__name__)
        raise
    run_dir.set_status("finished", round_=cfg.rounds, total=cfg.rounds)
    return run_dir


def size(data: Dataset) -> int:
    """A data set's length (every set here is sized; torch's Dataset type does not say)."""
    return len(data)  # type: ignore[arg-type]


def describe_sites(sites: Sequence[BaselineSite]) -> dict[str, dict[str, int]]:
    return {s.name: {"partition": s.partition, "train": size(s.data.train),
                     "val": size(s.data.val)} for s in sites}


def _common(cfg: RunConfig, sites: Sequence[BaselineSite], kind: str
            ) -> tuple[TaskConfig, Dataset, dict[str, Any]]:
    """The task, the held-out split (the ServerApp's, from the run's [evaluation]) and
    what baseline.json says of both."""
    if not sites:
        raise ConfigError(f"{kind} baseline", [FieldError(
            "--sites", "at least one site config (or --data with --partitions)", "none",
            "pass the site configs of the federated run")])
    task = cfg.task_config()
    spec = cfg.eval_spec()
    assert spec is not None  # check_baseline_config
    holdout = preprocessed(load_holdout(spec, task), task)
    about = {"kind": kind, "task": task.name, "network": task.network,
             "rounds": cfg.rounds, "local_epochs": cfg.local_epochs,
             "epochs": cfg.rounds * cfg.local_epochs, "sites": describe_sites(sites),
             "heldout": {"format": spec.format, "root": str(spec.root),
                         "holdout_fraction": spec.holdout_fraction, "seed": spec.seed,
                         "num-examples": size(holdout),
                         "case_ids": heldout_case_ids(spec, task)},
             "data_access": DATA_ACCESS}
    return task, holdout, about


def run_centralized(*, cfg: RunConfig, sites: Sequence[BaselineSite], out: Path,
                    device: str = "auto") -> Path:
    """The centralized baseline: the sites' training splits pooled, trained for the
    run's budget, evaluated every block on each site's validation split and on the
    held-out split; returns the run directory (``out``)."""
    cfg = check_baseline_config(cfg)
    _, holdout, about = _common(cfg, sites, "centralized")
    block = Block(POOLED_NAME, 0, pooled([s.data.train for s in sites]),
                  {s.name: s.data.val for s in sites}, {s.name: s.partition for s in sites})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / BASELINE_FILE, about | {"pooled_train": size(block.train)})
    train_blocks(cfg, block, root=out, kind="centralized", holdout=holdout,
                 device=pick_device(device))
    return out


def run_local(*, cfg: RunConfig, sites: Sequence[BaselineSite], out: Path,
              device: str = "auto") -> Path:
    """The local-only baseline: each site trains alone on its own training split for the
    run's budget (``out/sites/NAME``, a run directory each), evaluated on its own
    validation split and on the held-out split; ``out/metrics.json`` has the mean over
    sites and its spread per block. Returns ``out``."""
    cfg = check_baseline_config(cfg)
    task, holdout, about = _common(cfg, sites, "local")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / BASELINE_FILE, about)
    dev = pick_device(device)
    runs = {s.name: train_blocks(cfg, Block(s.name, s.partition, s.data.train,
                                            {s.name: s.data.val}, {s.name: s.partition}),
                                 root=out / "sites" / s.name, kind="local", holdout=holdout,
                                 device=dev)
            for s in sites}
    rows = [local_summary([RoundRecord.from_json(run.rounds[i]) for run in runs.values()],
                          list(runs))
            for i in range(cfg.rounds + 1)]
    write_json(out / METRICS_FILE, {"task": task.to_dict(), "baseline": "local",
                                    "sites": list(runs), "rounds": rows})
    write_json(out / STATUS_FILE, {"state": "finished", "round": cfg.rounds,
                                   "rounds": cfg.rounds, "error": "", "updated": time.time()})
    write_report(out)
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (population, over the sites), min and max."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max())}


def local_summary(records: Sequence[RoundRecord], names: Sequence[str]) -> dict[str, Any]:
    """One block of the local baseline over its sites: a round record whose ``heldout``
    is the unweighted mean over the sites' models of each held-out metric (every site is
    one hospital's model, all on the same cases), ``train``/``evaluate`` the sites'
    phases merged with FedAvg's weighting, plus ``heldout_sites`` and ``heldout_spread``."""
    first = records[0]
    held = {n: r.heldout for n, r in zip(names, records, strict=True)}
    keys = [k for k in first.heldout if all(k in h for h in held.values())]
    stats = {k: spread([h[k] for h in held.values()]) for k in keys}

    def merged(phases: list[Phase | None]) -> Phase | None:
        sites = {n: m for p in phases if p is not None for n, m in p.sites.items()}
        if not sites:
            return None
        recs = [RecordDict({wire.METRICS_KEY: MetricRecord(m),  # type: ignore[arg-type,unused-ignore]
                            wire.SITE_KEY: ConfigRecord({"name": n})}) for n, m in sites.items()]
        return evaluation_phase(recs, NUM_EXAMPLES)[1]

    row = RoundRecord(round=first.round, train=merged([r.train for r in records]),
                      evaluate=merged([r.evaluate for r in records]),
                      heldout={k: s["mean"] for k, s in stats.items()},
                      time=max(r.time for r in records), lr=first.lr)
    return row.to_json() | {"heldout_sites": held, "heldout_spread": {
        k: s for k, s in stats.items() if k != NUM_EXAMPLES and not math.isnan(s["mean"])}}


def read_baseline(out: Path) -> dict[str, Any]:
    """A baseline's ``baseline.json``."""
    return dict(json.loads((out / BASELINE_FILE).read_text()))
