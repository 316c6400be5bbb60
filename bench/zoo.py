"""Every registered network trained in a 3-site federation: one row per network and data set.

Each row is a short federated run of the real fedpacs ServerApp (``run_federation``) and
the real ClientApp over ``tests.loopback.LoopbackGrid`` (one process, the sites in turn):
plain FedAvg (no SecAgg+, no cross-site validation), 3 sites on disjoint partitions of a
real data set, the server's held-out split evaluated after every round. Classifiers run
on BreastMNIST (2D) and AdrenalMNIST3D (3D), segmenters on the MSD hippocampus volumes
(3D) and their axial slices (2D, the ``hippocampus-slices`` preset). Each row's task is
its data set's preset with the row's network and width (a custom task, as a run's
``[task]`` table), small enough for a 2-core CPU (seconds to tens of seconds a round).

Per row: parameters (trainable), MB sent per site per round (the model's packed float32
state, as ``common/wire.py`` sends it), seconds per round (the rounds' timing records,
wall clock in this process, mean of rounds >= 2: round 1 is warm-up), the sites'
aggregated training loss in rounds 1 and N, the held-out metric before training and
after the last round (mean foreground Dice; AUC and accuracy), and
the parameters at the paper's width when the row's width differs. A row counts only when
every round aggregated all 3 sites and the held-out metric is finite; the script exits 1
when a registered network (``common/models.py`` MODELS) has no such row.

``--hippocampus-recipe`` instead runs the ``make demo`` configuration (hippocampus 3D
U-Net, width 16, 3 sites on the full data set, 5 rounds, the preset's epochs) twice in
one invocation: today's recipe, then augmentation (flip, rotate, scale, intensity,
elastic) + a cosine learning-rate schedule with one warm-up round, and prints both
held-out Dice curves and their difference.

Usage: python bench/zoo.py [--rounds 3] [--only NET[,NET...]] [--data NAME[,NAME...]]
           [--threads 1] [--data-dir DIR] [--readme README.md] [--json OUT]
       python bench/zoo.py --from-json OUT [--readme README.md]   (train nothing: show OUT)
       python bench/zoo.py --hippocampus-recipe [--recipe-rounds 5]
           [--recipe-augment flip,rotate,scale,intensity,elastic] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.round_overhead import command_line, describe_machine, machine  # noqa: E402
from fedpacs.common.config import RunConfig  # noqa: E402
from fedpacs.common.datasets import list_nifti_cases  # noqa: E402
from fedpacs.common.errors import FedpacsError  # noqa: E402
from fedpacs.common.models import MODELS  # noqa: E402
from fedpacs.common.tasks import TASK_PRESETS, TaskConfig, training_defaults  # noqa: E402
from fedpacs.deploy.demo import DEMO_DATA, resolve_data_dir, site_names  # noqa: E402

SITES = 3
WARMUP_ROUNDS = 1  # round 1 loads and allocates what later rounds reuse
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ZooData:
    """A data set rows train on: the preset their task derives from, the shared data set
    it reads (a key of deploy.demo.DEMO_DATA), and the share the zoo keeps of it: every
    ``every``-th sample of each MedMNIST split (test included: the held-out split), or
    every ``every``-th case of the NIfTI set (sorted by name) before the split."""

    preset: str
    source: str
    every: int
    epochs: int  # local epochs a round
    label: str  # as the table names it


DATASETS: dict[str, ZooData] = {
    "breastmnist": ZooData("breastmnist", "breastmnist", 1, 2, "BreastMNIST"),
    "adrenalmnist3d": ZooData("adrenalmnist3d", "adrenalmnist3d", 4, 1, "AdrenalMNIST3D"),
    "hippocampus": ZooData("hippocampus", "hippocampus", 4, 2, "MSD hippocampus"),
    "hippocampus-slices": ZooData("hippocampus-slices", "hippocampus", 4, 1,
                                  "MSD hippocampus, axial slices"),
}


@dataclass(frozen=True)
class Entry:
    """One row: a network on a data set at a width. ``input_shape`` () keeps the preset's;
    the sites take partitions 0..2 of ``num_partitions`` (above 3: each site a smaller
    share of the pool); ``batch_size`` 0 takes the preset's; ``recipe``: RunConfig recipe
    fields that differ from today's defaults (fedpacs.common.recipe)."""

    network: str
    data: str
    width: int
    input_shape: tuple[int, ...] = ()
    num_partitions: int = SITES
    batch_size: int = 0
    recipe: tuple[tuple[str, str], ...] = ()  # RunConfig recipe fields (name, value)
    note: str = ""


# Why a network's held-out prediction can be the same for every case after a short run
# (shown in the README's notes only for a row where that happened: AUC exactly 0.5).
CONSTANT_CAUSE: dict[str, str] = {
    "googlenet": "its batch norms' running variances still hold most of their initial 1.0 "
    "after so few steps, against activations of ~1e-3 under torchvision's std-0.01 "
    "initialisation, so in evaluation mode the signal fades layer by layer (training, on "
    "batch statistics, is unaffected)",
}

# Widths: small enough for a 2-core CPU, the presets' width where that fits; a costly row
# gives each site a smaller share of the pool (num_partitions), noted in the row.
ENTRIES: tuple[Entry, ...] = (
    # classification, 2D (BreastMNIST 28x28)
    Entry("resnet18", "breastmnist", 16),
    Entry("resnet34", "breastmnist", 16),
    Entry("densenet121", "breastmnist", 8),
    Entry("alexnet", "breastmnist", 16),
    Entry("vgg16", "breastmnist", 16),
    Entry("googlenet", "breastmnist", 16),
    # classification, 3D (AdrenalMNIST3D 28^3)
    Entry("resnet18", "adrenalmnist3d", 8, num_partitions=6,
          note="full-resolution 28^3 stages (no stem pooling below 64): each site 1/6 of the pool"),
    Entry("resnet34", "adrenalmnist3d", 8, num_partitions=6,
          note="as resnet18: each site 1/6 of the pool"),
    Entry("densenet121", "adrenalmnist3d", 4, num_partitions=12,
          note="stride-1 stem below 64 voxels a side, full-resolution first block: each site "
          "1/12 of the pool"),
    Entry("alexnet", "adrenalmnist3d", 8),
    Entry("vgg16", "adrenalmnist3d", 8),
    Entry("googlenet", "adrenalmnist3d", 4),
    # segmentation, 3D (hippocampus 48x64x48)
    Entry("unet", "hippocampus", 16),
    Entry("resunet", "hippocampus", 8),
    Entry("segresnet", "hippocampus", 8, num_partitions=6,
          note="its smallest width (GroupNorm of 8 groups): each site 1/6 of the pool"),
    Entry("vnet", "hippocampus", 16, input_shape=(32, 48, 32), num_partitions=12,
          batch_size=2, recipe=(("loss", "dice"),),
          note="fixed width (16 in its first stage, as published), 45.6 M parameters: input "
          "centre-cropped to 32x48x32 (sides multiples of 16), each site 1/12 of the pool, "
          "its paper's pure Dice loss"),
    Entry("fcn8s", "hippocampus", 8, num_partitions=6, note="each site 1/6 of the pool"),
    Entry("segnet", "hippocampus", 8, num_partitions=6, note="each site 1/6 of the pool"),
    Entry("pspnet", "hippocampus", 8),
    # segmentation, 2D (hippocampus axial slices 48x64)
    Entry("unet", "hippocampus-slices", 16),
    Entry("resunet", "hippocampus-slices", 16),
    Entry("segresnet", "hippocampus-slices", 8),
    Entry("fcn8s", "hippocampus-slices", 8),
    Entry("segnet", "hippocampus-slices", 8),
    Entry("pspnet", "hippocampus-slices", 8),
)

# The paper's width in the registry's terms (task.width), per network; per dims where the
# 2D and 3D papers differ. None: the network has no width (MONAI's VNet is the paper's).
PUBLISHED_WIDTH: dict[str, dict[int, int | None]] = {
    "resnet18": {2: 64, 3: 64},  # He 2016: 64-128-256-512
    "resnet34": {2: 64, 3: 64},
    "densenet121": {2: 32, 3: 32},  # Huang 2017: growth rate 32, 64 initial features
    "alexnet": {2: 64, 3: 64},  # conv1 64 channels (torchvision layout)
    "vgg16": {2: 64, 3: 64},
    "googlenet": {2: 64, 3: 64},
    "unet": {2: 64, 3: 32},  # Ronneberger 2015: 64 first level; Cicek 2016 (3D): 32
    "resunet": {2: 16, 3: 16},  # Kerfoot 2018: 16-32-64-128-256
    "segresnet": {2: 32, 3: 32},  # Myronenko 2018: 32 initial filters
    "vnet": {2: None, 3: None},  # Milletari 2016: 16 first stage, fixed in MONAI's VNet
    "fcn8s": {2: 64, 3: 64},  # VGG-16 encoder
    "segnet": {2: 64, 3: 64},
    "pspnet": {2: 64, 3: 64},
}

def zoo_networks() -> set[str]:
    """The networks the plan trains (a test checks that this is every registered one)."""
    return {e.network for e in ENTRIES}


def zoo_task(entry: Entry) -> TaskConfig:
    """The row's task: its data set's preset with the row's network, width and input."""
    base = TASK_PRESETS[DATASETS[entry.data].preset]
    d = base.to_dict() | {"name": f"zoo-{entry.data}", "network": entry.network,
                          "width": entry.width}
    if entry.input_shape:
        d["input_shape"] = list(entry.input_shape)
    return TaskConfig.from_dict(d, source=f"zoo row {entry.network}/{entry.data}")


def published_width(entry: Entry, task: TaskConfig) -> int | None:
    return PUBLISHED_WIDTH[entry.network][task.spatial_dims]


def count_values(task: TaskConfig) -> tuple[int, int]:
    """(trainable parameters, values in the state a site sends) of the task's network,
    built on the meta device (no memory, no time: a 3D FCN-8s at width 64 is 100 M)."""
    with torch.device("meta"):
        model = MODELS[task.network].build(task)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() for v in model.state_dict().values())
    return int(params), int(state)


# --------------------------------------------------------------------------- data subsets
def subset_data(data: ZooData, data_dir: Path, work: Path) -> Path:
    """The zoo's share of a data set, under ``work``: a MedMNIST .npz with every k-th
    sample of each split, or a folder of links to every k-th NIfTI case (every=1: the
    shared file itself). Same name, same format: the fedpacs readers take it as is."""
    src = data_dir / DEMO_DATA[data.source].relpath
    if data.every == 1:
        return src
    out = work / "data" / data.source
    if DEMO_DATA[data.source].format == "medmnist":
        target = out / src.name
        if not target.is_file():
            out.mkdir(parents=True, exist_ok=True)
            with np.load(src) as npz:
                np.savez(target, **{k: npz[k][:: data.every] for k in npz.files})
        return target
    if not (out / "images").is_dir():
        cases, _ = list_nifti_cases(src)
        for sub in ("images", "labels"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for case in cases[:: data.every]:
            assert case.label is not None
            (out / "images" / case.image.name).symlink_to(case.image)
            (out / "labels" / case.label.name).symlink_to(case.label)
    return out


# --------------------------------------------------------------------------- one run
def write_sites(folder: Path, *, task: TaskConfig, custom: bool, fmt: str, root: Path,
                num_partitions: int, threads: int, seed: int = 0) -> dict[int, Path]:
    """Site configs for LoopbackGrid (node id -> file): partitions 0..2 of
    ``num_partitions``, plain mode allowed, ``custom``: the task as the site's [task]."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(site_names(SITES)):
        doc: dict[str, Any] = {
            "site": {"name": name, "task": task.name},
            "data": {"format": fmt, "root": str(root), "partition": i,
                     "num_partitions": num_partitions, "holdout_fraction": 0.2, "seed": seed},
            "compute": {"device": "cpu", "threads": threads, "warm": False},
            "security": {"require_secagg": False, "allow_unsigned_apps": True},
        }
        if custom:
            doc["task"] = task.to_dict()
        p = folder / f"{name}.toml"
        p.write_text(tomli_w.dumps(doc), encoding="utf-8")
        out[i + 1] = p
    return out


class ErrorLog(logging.Handler):
    """Keeps the ERROR records of fedpacs' loggers (a site's failure is logged on the
    site and sent to the server as a bare code): a failed row then says why."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f": {type(exc).__name__}: {exc}"
        self.lines.append(line[:500])


def federate(cfg: RunConfig, sites: dict[int, Path]) -> list[dict[str, Any]]:
    """The real ServerApp and ClientApp over an in-memory grid; the rounds' records."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpacs.client.app import app as client_app
    from fedpacs.server.app import run_federation
    from tests.loopback import LoopbackGrid

    # what a real SuperNode / SuperLink sets for the processes it starts
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    grid = LoopbackGrid(client_app, sites)
    run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    rounds = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["rounds"]
    return list(rounds)


def headline(held: dict[str, Any], kind: str) -> dict[str, float]:
    keys = ("dice-mean",) if kind == "segmentation" else ("auc", "accuracy")
    out = {}
    for k in keys:
        v = held.get(k)
        out[k] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) \
            else math.nan
    return out


def round_seconds(rounds: list[dict[str, Any]]) -> list[float]:
    """Each trained round's seconds (its timing record: from the previous round's end to
    its own, the server's held-out evaluation and checkpoint included)."""
    out = []
    for r in rounds:
        t = r.get("timing") or {}
        if int(r.get("round", 0)) >= 1 and isinstance(t.get("round_s"), int | float):
            out.append(float(t["round_s"]))
    return out


@dataclass
class Row:
    network: str
    data: str
    dims: int
    kind: str
    width: int
    input_shape: list[int]
    epochs: int
    batch_size: int
    train_samples: list[int] = field(default_factory=list)  # per site (last round)
    heldout_samples: int = 0
    params: int = 0
    published_width: int | None = None
    published_params: int | None = None
    mb_per_update: float = 0.0
    round_s: list[float] = field(default_factory=list)
    mean_round_s: float | None = None
    sites_per_round: list[int] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # held-out, rounds 0..N
    train_loss: list[float] = field(default_factory=list)  # aggregated, rounds 1..N
    recipe: dict[str, str] = field(default_factory=dict)  # beyond today's defaults
    wall_s: float = 0.0
    note: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def check_row(row: Row, rounds: int) -> str:
    """Why a finished run does not count ('' when it does)."""
    if len(row.sites_per_round) != rounds or any(n != SITES for n in row.sites_per_round):
        return f"sites aggregated per round {row.sites_per_round}, expected {SITES} in " \
               f"each of {rounds} rounds"
    if not row.curve or not all(math.isfinite(v) for v in row.curve[-1].values()):
        return f"held-out metric after the last round is {row.curve[-1] if row.curve else {}}"
    return ""


def run_entry(entry: Entry, *, rounds: int, threads: int, data_dir: Path, work: Path,
              seed: int = 0) -> Row:
    data = DATASETS[entry.data]
    defaults = training_defaults(data.preset)
    batch = entry.batch_size or defaults.batch_size
    preset = TASK_PRESETS[data.preset]
    row = Row(entry.network, entry.data, preset.spatial_dims, preset.kind, entry.width,
              list(entry.input_shape or preset.input_shape), data.epochs, batch,
              recipe=dict(entry.recipe), note=entry.note)
    try:  # a network the registry refuses for this task is a failed row, not a crash
        task = zoo_task(entry)
        params, state = count_values(task)
        pw = published_width(entry, task)
        row.params, row.mb_per_update, row.published_width = params, 4 * state / 1e6, pw
        if pw is not None and pw != task.width:
            row.published_params = count_values(replace(task, width=pw))[0]
    except (FedpacsError, RuntimeError, ValueError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:1000]
        return row
    t0 = time.monotonic()
    errors = ErrorLog()
    logging.getLogger("fedpacs").addHandler(errors)
    try:
        with tempfile.TemporaryDirectory(prefix="fedpacs-zoo-", dir=work) as tmp:
            run_root = Path(tmp)
            root = subset_data(data, data_dir, work)
            fmt = DEMO_DATA[data.source].format
            sites = write_sites(run_root / "sites", task=task, custom=True, fmt=fmt, root=root,
                                num_partitions=entry.num_partitions, threads=threads,
                                seed=seed)
            cfg = RunConfig(task=task.name, task_json=json.dumps(task.to_dict()),
                            rounds=rounds, local_epochs=data.epochs, batch_size=batch,
                            lr=defaults.lr, min_sites=SITES, seed=seed, secagg=False,
                            cross_site=False, run_dir=str(run_root / "run"), eval_format=fmt,
                            eval_root=str(root), eval_seed=seed, **dict(entry.recipe))
            problems = cfg.validate()
            if problems:
                raise ValueError("; ".join(str(p) for p in problems))
            records = federate(cfg, sites)
    except (FedpacsError, RuntimeError, ValueError, OSError, KeyError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:1000]
    finally:
        logging.getLogger("fedpacs").removeHandler(errors)
        row.wall_s = time.monotonic() - t0
        gc.collect()
    if not row.error:
        trained = [r for r in records if int(r.get("round", 0)) >= 1]
        row.sites_per_round = [len(r.get("train_sites") or {}) for r in trained]
        row.train_loss = [float((r.get("train") or {}).get("train-loss", math.nan))
                          for r in trained]
        row.curve = [headline(r.get("heldout") or {}, task.kind) for r in records]
        row.heldout_samples = int((records[-1].get("heldout") or {}).get("num-examples", 0))
        last = trained[-1].get("train_sites") or {} if trained else {}
        row.train_samples = [int(m.get("num-examples", 0)) for _, m in sorted(last.items())]
        row.round_s = round_seconds(records)
        used = row.round_s[WARMUP_ROUNDS:] or row.round_s
        row.mean_round_s = statistics.mean(used) if used else None
        row.error = check_row(row, rounds)
    if row.error and errors.lines:
        row.error += " | site/server log: " + " / ".join(dict.fromkeys(errors.lines))[:1000]
    return row


# --------------------------------------------------------------------------- output
def fmt_metric(m: dict[str, float]) -> str:
    if "dice-mean" in m:
        return f"{m['dice-mean']:.3f}"
    return f"{m.get('auc', math.nan):.3f} / {m.get('accuracy', math.nan):.3f}"


def fmt_count(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def table_lines(rows: list[Row], rounds: int) -> list[str]:
    head = ["network", "task / data", "dims", "input", "width (paper)", "parameters",
            "at paper width", "MB / update", "s / round", f"train loss 1 → {rounds}",
            f"held-out round 0 → {rounds}", "row s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        kind = "seg" if r.kind == "segmentation" else "cls"
        task = f"{kind}, {DATASETS[r.data].label}"
        if r.train_samples:
            lo, hi = min(r.train_samples), max(r.train_samples)
            task += f" ({lo}{f'–{hi}' if hi != lo else ''} train/site)"
        width = "fixed" if r.published_width is None else f"{r.width} ({r.published_width})"
        if r.error:
            result, s_round, loss = f"**FAILED**: {r.error[:160]}", "—", "—"
        else:
            metric = "Dice" if r.kind == "segmentation" else "AUC / acc"
            result = f"{metric} {fmt_metric(r.curve[0])} → **{fmt_metric(r.curve[-1])}**"
            s_round = f"{r.mean_round_s:.1f}" if r.mean_round_s is not None else "—"
            loss = f"{r.train_loss[0]:.3f} → {r.train_loss[-1]:.3f}"
        lines.append("| " + " | ".join([
            f"`{r.network}`", task, f"{r.dims}D", "×".join(map(str, r.input_shape)),
            width, fmt_count(r.params),
            fmt_count(r.published_params) if r.published_params is not None else "same",
            f"{r.mb_per_update:.2f}", s_round, loss, result, f"{r.wall_s:.0f}"]) + " |")
    return lines


def missing_networks(rows: list[Row]) -> list[str]:
    """Registered networks without a successful row."""
    done = {r.network for r in rows if r.ok}
    return sorted(set(MODELS) - done)


def readme_body(rows: list[Row], meta: dict[str, Any]) -> str:
    rounds = meta["rounds"]
    notes = [f"- `{r.network}` on {DATASETS[r.data].label}: {r.note}" for r in rows if r.note]
    for r in rows:
        if r.ok and r.curve[-1].get("auc") == 0.5:
            cause = CONSTANT_CAUSE.get(r.network, "")
            notes.append(f"- `{r.network}` on {DATASETS[r.data].label}: AUC 0.500 after "
                         f"{rounds} rounds is one prediction for every held-out case"
                         + (f": {cause}" if cause else ""))
    epochs = "; ".join(f"{d.label} {d.epochs}" for d in DATASETS.values())
    subsets = "; ".join(
        f"{d.label}: every {d.every}{'th' if d.every > 3 else 'rd' if d.every == 3 else 'nd'}"
        f" {'case' if DEMO_DATA[d.source].format == 'nifti' else 'sample'}"
        if d.every > 1 else f"{d.label}: all" for d in DATASETS.values())
    return "\n".join([
        f"`{meta['command']}` — {sum(r.ok for r in rows)}/{len(rows)} rows trained, "
        f"{len({r.network for r in rows if r.ok})}/{len(MODELS)} registered networks, "
        f"{meta['total_s'] / 60:.1f} min in all on {meta['machine_line']}.",
        "",
        *table_lines(rows, rounds),
        "",
        f"Each row: {SITES} sites, {rounds} rounds of plain FedAvg, local epochs a round "
        f"{epochs}, the preset's batch size and learning rate, in one process (the real "
        "ServerApp and ClientApp over `tests/loopback.py`'s in-memory grid, the sites in "
        "turn, torch threads "
        f"{meta['threads']}). s / round: the rounds' timing records (the 3 sites' "
        "training and evaluation, aggregation, the server's held-out evaluation and "
        "checkpoint), mean of rounds 2.." + str(rounds) + ". MB / update: the float32 "
        "state one site sends a round (10⁶ bytes). Held-out: the server's split that no "
        "site sees, before training (round 0) and after the last round; segmentation: "
        "mean foreground Dice (2D: the mean over slices, a class absent from a slice and "
        "from its prediction counting 1, so not comparable with the 3D figure); "
        "classification: AUC / accuracy. Data kept (sites' pools and held-out split "
        f"alike): {subsets}. At paper width: the same task's network at the paper's width "
        "(in brackets). Widths here are chosen to fit this machine; a few rounds on a "
        "subset show that a network trains in a federation, not how well it can do.",
        *([""] + notes if notes else []),
    ])


def rewrite_section(text: str, body: str, *, source: str = "README.md", begin: str = BEGIN,
                    end: str = END) -> str:
    """``text`` with what lies between the markers (the zoo's by default; another
    bench's section with its own) replaced by ``body``."""
    first, last = text.find(begin), text.find(end)
    if first < 0 or last < first:
        raise ValueError(f"{source}: expected the markers {begin} ... {end} (in this order), "
                         "found none; add them where the bench's table belongs")
    return text[: first + len(begin)] + "\n" + body.strip() + "\n" + text[last:]


# --------------------------------------------------------------------------- the recipe
RECIPE_FIELDS = ("augment", "lr_schedule", "warmup_rounds")


def missing_recipe_fields() -> list[str]:
    known = {f.name for f in fields(RunConfig)}
    return [f for f in RECIPE_FIELDS if f not in known]


def recipe_comparison(args: argparse.Namespace, data_dir: Path, work: Path) -> int:
    """The ``make demo`` run (hippocampus 3D U-Net, width 16, 3 sites, 5 rounds, the
    preset's epochs) with today's recipe and with the new one, in one invocation."""
    missing = missing_recipe_fields()
    if missing:
        print(f"--hippocampus-recipe: RunConfig has no field {', '.join(missing)} yet "
              f"(fedpacs.common.config; expected {', '.join(RECIPE_FIELDS)} from "
              "fedpacs.common.recipe.Recipe). Run it once the training recipe reaches the "
              "run config.", file=sys.stderr)
        return 2
    arms: dict[str, dict[str, Any]] = {
        "today": {},
        "recipe": {"augment": args.recipe_augment, "lr_schedule": "cosine",
                   "warmup_rounds": 1},
    }
    root = data_dir / DEMO_DATA["hippocampus"].relpath
    task = TASK_PRESETS["hippocampus"]
    results: dict[str, dict[str, Any]] = {}
    for name, extra in arms.items():
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"fedpacs-recipe-{name}-", dir=work) as tmp:
            run_root = Path(tmp)
            sites = write_sites(run_root / "sites", task=task, custom=False, fmt="nifti",
                                root=root, num_partitions=SITES, threads=args.threads)
            cfg = RunConfig(task="hippocampus", rounds=args.recipe_rounds, min_sites=SITES,
                            secagg=False, cross_site=False, run_dir=str(run_root / "run"),
                            eval_format="nifti", eval_root=str(root), **extra)
            problems = cfg.validate()
            if problems:
                print(f"--hippocampus-recipe ({name}): " + "; ".join(map(str, problems)),
                      file=sys.stderr)
                return 2
            records = federate(cfg, sites)
        dice = [float((r.get("heldout") or {}).get("dice-mean", math.nan)) for r in records]
        secs = round_seconds(records)
        results[name] = {"config": extra, "dice": dice, "round_s": secs,
                         "wall_s": time.monotonic() - t0}
        print(f"  {name:7s} held-out Dice by round: " + " → ".join(f"{d:.3f}" for d in dice)
              + f"   ({statistics.mean(secs):.1f} s/round, {time.monotonic() - t0:.0f} s)",
              flush=True)
    a, b = results["today"]["dice"], results["recipe"]["dice"]
    diff = [y - x for x, y in zip(a, b, strict=True)]
    print("  recipe − today, by round: " + "  ".join(f"{d:+.3f}" for d in diff))
    print(f"  after round {len(a) - 1}: today {a[-1]:.3f}, recipe {b[-1]:.3f} "
          f"({diff[-1]:+.3f}); s/round recipe / today "
          f"{statistics.mean(results['recipe']['round_s']) / statistics.mean(results['today']['round_s']):.2f}x")  # noqa: E501
    if args.json:
        write_json(args.json, {"command": command_line(), "machine": machine(),
                               "mode": "hippocampus-recipe", "results": results,
                               "difference": diff})
    return 0


# --------------------------------------------------------------------------- main
def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"  figures written to {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated networks (default: all)")
    ap.add_argument("--data", default="", help=f"comma-separated data sets of "
                    f"{', '.join(DATASETS)} (default: all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server and the sites (1: on a busy 2-core "
                    "machine a second thread's barrier waits made training up to 10x slower)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="the shared data folder (default: $FEDPACS_DATA_DIR, ../shared/data)")
    ap.add_argument("--readme", type=Path, default=None,
                    help=f"rewrite the section between {BEGIN} and {END} of this file")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="train nothing: show (and with --readme write) an earlier --json")
    ap.add_argument("--hippocampus-recipe", action="store_true",
                    help="compare today's recipe with augmentation + cosine schedule instead")
    ap.add_argument("--recipe-augment", default="flip,rotate,scale,intensity,elastic",
                    help="the new recipe's augmentations (elastic doubles a round here)")
    ap.add_argument("--recipe-rounds", type=int, default=5)
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    data = [d.strip() for d in args.data.split(",") if d.strip()]
    errs = [f"--only: {n!r} is not a registered network (one of {', '.join(sorted(MODELS))})"
            for n in only if n not in MODELS]
    errs += [f"--data: {d!r} is not one of {', '.join(DATASETS)}" for d in data
             if d not in DATASETS]
    if args.rounds < 1 or args.threads < 0 or args.recipe_rounds < 1:
        errs.append("--rounds and --recipe-rounds: expected >= 1, --threads >= 0")
    if args.from_json and (only or data or args.hippocampus_recipe):
        errs.append("--from-json: shows a whole earlier run; drop --only/--data/"
                    "--hippocampus-recipe")
    if args.readme and (only or data):
        errs.append("--readme: the README's table is the whole zoo; drop --only/--data")
    if errs:
        ap.error("; ".join(errs))
    args.entries = [e for e in ENTRIES if (not only or e.network in only)
                    and (not data or e.data in data)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:  # the figures of an earlier run, shown and written again
        doc = json.loads(args.from_json.read_text(encoding="utf-8"))
        meta = {k: v for k, v in doc.items() if k not in ("rows", "missing", "datasets")}
        return report([Row(**r) for r in doc["rows"]], meta, args)
    # (Flower logs every round, and warns that its own federated evaluation is off: the
    # ServerApp evaluates on the server's held-out split and asks the sites itself)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if args.threads > 0:  # the server's evaluation of round 0 runs before any site's
        torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)
    m = machine()
    print(f"command: {command_line()}")
    print(f"machine: {describe_machine(m)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedpacs-zoo-") as tmp:
        work = Path(tmp)
        if args.hippocampus_recipe:
            return recipe_comparison(args, data_dir, work)
        t0 = time.monotonic()
        rows = []
        for entry in args.entries:
            row = run_entry(entry, rounds=args.rounds, threads=args.threads,
                            data_dir=data_dir, work=work)
            rows.append(row)
            status = f"FAILED: {row.error}" if row.error else (
                f"{fmt_metric(row.curve[0])} → {fmt_metric(row.curve[-1])}, "
                f"{row.mean_round_s or 0:.1f} s/round")
            print(f"  {entry.network:12s} {entry.data:19s} w{row.width:<3d} "
                  f"{fmt_count(row.params):>9s} {row.wall_s:5.0f} s  {status}", flush=True)
        total = time.monotonic() - t0
    meta = {"command": command_line(), "machine": m, "machine_line": short_machine(m),
            "rounds": args.rounds, "threads": args.threads, "total_s": total,
            "partial": bool(args.only or args.data)}
    return report(rows, meta, args)


def report(rows: list[Row], meta: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the table; write the README section and the JSON when asked; 1 when a
    registered network (of those asked for) has no successful row."""
    print()
    for line in table_lines(rows, meta["rounds"]):
        print(line)
    missing = missing_networks(rows) if not meta.get("partial") else sorted(
        {r.network for r in rows} - {r.network for r in rows if r.ok})
    print(f"\n{sum(r.ok for r in rows)}/{len(rows)} rows trained; total wall time "
          f"{meta['total_s']:.0f} s ({meta['total_s'] / 60:.1f} min)")
    if args.readme:
        if meta.get("partial"):
            print(f"--readme: {args.from_json} holds a partial zoo (--only/--data); the "
                  "README's table is the whole zoo: run it without them", file=sys.stderr)
            return 2
        text = args.readme.read_text(encoding="utf-8")
        args.readme.write_text(rewrite_section(text, readme_body(rows, meta),
                                               source=str(args.readme)), encoding="utf-8")
        print(f"  {args.readme}: zoo section rewritten")
    if args.json:
        write_json(args.json, meta | {"datasets": {k: asdict(v) for k, v in DATASETS.items()},
                                      "rows": [asdict(r) for r in rows],
                                      "missing": missing})
    if missing:
        print(f"networks without a successful row: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def short_machine(m: dict[str, Any]) -> str:
    return f"{m['usable_cores']} CPU cores ({m['cpu'] or 'cpu ?'}), GPU {m['gpu']}"


if __name__ == "__main__":
    sys.exit(main())
