"""Realistic splits: a pooled data set's training cases partitioned over N sites.

The maths are pure functions of the cases' labels (or sources), the site count, the
parameters and a seed (a fresh ``numpy.random.Generator`` per call: deterministic, no
hidden state, inputs never changed). Each returns one sorted array of case indices per
site; together they are disjoint and complete (every case on exactly one site).

* ``iid``: one random permutation cut into near-equal shards (the first ``n % sites``
  shards one case larger, as ``numpy.array_split`` cuts).
* ``dirichlet`` (label skew; Hsu et al. 2019, the FL benchmarks' usual choice): for each
  class on its own, site proportions ``p ~ Dirichlet(alpha * 1_N)`` and the class's
  shuffled cases cut by :func:`largest_remainder` counts. Small ``alpha`` (0.1): each class
  on few sites; large ``alpha`` (100): near IID. A draw that leaves a site with fewer than
  ``min_cases`` cases is drawn again from the same generator, at most ``max_tries`` times
  (then a ConfigError naming the smallest site and the fix).
* ``quantity`` (quantity skew, labels IID): site sizes ``min_cases + (n - N * min_cases)
  * p`` with ``p ~ Dirichlet(alpha * 1_N)`` (largest remainder), then one random
  permutation cut into shards of those sizes. Small ``alpha``: a few large sites and many
  small ones; every site keeps at least ``min_cases`` by construction (no redraw).
* ``source``: one site per distinct source value (a scanner, a hospital, a subset: a
  ``case_id,source`` CSV), sites in sorted source order.

Flower Datasets (flwr-datasets) has partitioners of these kinds, but they work on Hugging
Face ``datasets.Dataset`` objects (pyarrow, pandas, ...); the readers here hold numpy label
arrays and case-ID lists, so the maths live here instead, in a few lines each.

The chosen split is a :class:`Split` record saved as ``split.json`` in the run directory:
the partitioner, its parameters and seed, the data set (format, root, the held-out setting
that defined its pool) and each site's case IDs. A site config's ``[data] split`` points a
site at it (its ``partition`` indexes the split's sites); fedpacs.common.datasets then
takes that site's cases from it instead of :func:`~fedpacs.common.datasets.partition_ids`.
Case IDs are the readers' own: ``train/000123`` and ``val/000045`` (the row in that array)
for MedMNIST, the case ID (file stem) for NIfTI, ``class-folder/file`` or the image file
name for image folders.

Before a run: :func:`summarize` counts each site's cases and cases per class, and
:func:`check_sites` refuses (a ConfigError naming each site and class) a split on which
training cannot work: a site with fewer training cases than one batch, or (classification)
a site with no case at all; a site missing a class is a warning only, unless the run asks
for every class on every site (``require_all_classes``), since real hospitals do miss
classes and FedAvg still trains on them. A site with no validation case is refused too:
every round it evaluates the global model on its validation split before training.

A site's cases are split into training and validation by the site config's
``val_fraction`` (fedpacs.common.datasets.site_train_val), for MedMNIST too: a split's
site pools its rows of the official train and val arrays, so that every site validates.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpacs.common.errors import ConfigError, DataError, FieldError

if TYPE_CHECKING:
    from fedpacs.common.config import DataSpec
    from fedpacs.common.tasks import TaskConfig

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "quantity", "source")
SPLIT_FORMAT = "fedpacs-split/1"
SPLIT_FILE = "split.json"
DEFAULT_ALPHA = 0.5  # dirichlet/quantity concentration (the "realistic" skew)
DEFAULT_MAX_TRIES = 100  # dirichlet redraws before giving up on min_cases
MEDMNIST_POOL_SPLITS = ("train", "val")  # a MedMNIST pool; "test" is the held-out split


# --------------------------------------------------------------------------- pure maths
def largest_remainder(total: int, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """``total`` split into integer counts proportional to ``weights`` (Hamilton's
    largest-remainder method): each gets the floor of its share, and the cases left over
    go one each to the largest fractional parts (ties: the lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or w.ndim != 1 or len(w) == 0 or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"need total >= 0 and non-negative weights with a positive sum, "
                         f"got total={total}, weights={list(w)}")
    share = total * w / w.sum()
    counts = np.floor(share).astype(np.int64)
    left = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(share[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def chunks(indices: np.ndarray, counts: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """``indices`` cut in order into consecutive pieces of ``counts`` (summing to its
    length)."""
    if int(np.sum(counts)) != len(indices):
        raise ValueError(f"counts sum to {int(np.sum(counts))}, not {len(indices)}")
    edges = np.cumsum([0, *counts])
    return [np.asarray(indices[edges[i]:edges[i + 1]]) for i in range(len(counts))]


def _sites_ok(sites: int, n: int) -> None:
    if sites < 1:
        raise ConfigError("partition", [FieldError("--sites", ">= 1", str(sites),
                                                   "e.g. --sites 3")])
    if n < sites:
        raise ConfigError("partition", [FieldError(
            "--sites", f"at most the {n} pooled training case(s)", str(sites),
            "use fewer sites or a larger data set")])


def iid_partition(n: int, sites: int, *, seed: int) -> list[np.ndarray]:
    """Near-equal random shards of ``range(n)``."""
    _sites_ok(sites, n)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(c) for c in chunks(perm, largest_remainder(n, [1.0] * sites))]


def dirichlet_partition(labels: Sequence[int] | np.ndarray, sites: int, *, alpha: float,
                        seed: int, min_cases: int = 0,
                        max_tries: int = DEFAULT_MAX_TRIES) -> list[np.ndarray]:
    """Label skew: each class's cases spread over the sites by Dirichlet(alpha)
    proportions (see the module docstring)."""
    y = np.asarray(labels)
    _sites_ok(sites, len(y))
    if not alpha > 0:
        raise ConfigError("partition", [FieldError("--alpha", "> 0", str(alpha),
                                                   "e.g. --alpha 0.5 (0.1: strong skew)")])
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    smallest = (0, -1)
    for _ in range(max(max_tries, 1)):
        parts: list[list[np.ndarray]] = [[] for _ in range(sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(sites, float(alpha)))
            for s, piece in enumerate(chunks(idx, largest_remainder(len(idx), p))):
                parts[s].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        sizes = [len(p) for p in out]
        if min(sizes) >= min_cases:
            return out
        smallest = (min(sizes), int(np.argmin(sizes)))
    raise ConfigError("partition", [FieldError(
        "--alpha", f"a Dirichlet draw giving every one of {sites} sites >= {min_cases} "
        f"case(s) (tried {max_tries} draws)", f"alpha {alpha}: site {smallest[1]} kept "
        f"{smallest[0]} case(s) in the last draw", "raise --alpha, use fewer --sites, or "
        "lower the batch size")])


def quantity_partition(n: int, sites: int, *, alpha: float, seed: int,
                       min_cases: int = 0) -> list[np.ndarray]:
    """Quantity skew: Dirichlet(alpha) site sizes above a floor of ``min_cases``, labels
    IID (see the module docstring)."""
    _sites_ok(sites, n)
    if not alpha > 0:
        raise ConfigError("partition", [FieldError("--alpha", "> 0", str(alpha),
                                                   "e.g. --alpha 0.5")])
    if sites * min_cases > n:
        raise ConfigError("partition", [FieldError(
            "--sites", f"at most {n // max(min_cases, 1)} sites of >= {min_cases} cases "
            f"each ({n} pooled training cases)", str(sites),
            "use fewer sites or a smaller batch size")])
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(sites, float(alpha)))
    counts = min_cases + largest_remainder(n - sites * min_cases, p)
    perm = rng.permutation(n)
    return [np.sort(c) for c in chunks(perm, counts)]


def source_partition(sources: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """One site per distinct source (sorted): (the sources, each one's case indices)."""
    s = np.asarray([str(x) for x in sources])
    names = sorted(set(s.tolist()))
    return names, [np.flatnonzero(s == name) for name in names]


# --------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class SiteSplit:
    """One site of a split: its name and its case IDs (sorted)."""

    name: str
    cases: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    """A saved partition of a pooled data set (``split.json``)."""

    partitioner: str
    params: dict[str, float | int | str]
    seed: int
    data_format: str
    data_root: str
    holdout_fraction: float
    data_seed: int
    sites: tuple[SiteSplit, ...]
    summary: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"format": SPLIT_FORMAT, "partitioner": self.partitioner,
                "params": dict(self.params), "seed": self.seed,
                "data": {"format": self.data_format, "root": self.data_root,
                         "holdout_fraction": self.holdout_fraction, "seed": self.data_seed},
                "sites": [{"name": s.name, "cases": list(s.cases)} for s in self.sites],
                "summary": list(self.summary)}

    @classmethod
    def from_json(cls, d: Any, *, source: str) -> Split:
        """Parse a split; a ConfigError naming ``source`` and each bad field otherwise."""
        if not isinstance(d, dict) or d.get("format") != SPLIT_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(source, [FieldError("format", repr(SPLIT_FORMAT), repr(got),
                                                  "write the split with `fedpacs simulate`")])
        errs: list[FieldError] = []
        data_raw = d.get("data")
        data: dict[str, Any] = data_raw if isinstance(data_raw, dict) else {}
        sites_raw = d.get("sites")
        sites: list[SiteSplit] = []
        if not isinstance(sites_raw, list) or not sites_raw:
            errs.append(FieldError("sites", "a non-empty list of {name, cases}",
                                   type(sites_raw).__name__, "write the split again"))
        else:
            for i, s in enumerate(sites_raw):
                ok = isinstance(s, dict) and isinstance(s.get("name"), str) and \
                    isinstance(s.get("cases"), list) and \
                    all(isinstance(c, str) for c in s["cases"])
                if not ok:
                    errs.append(FieldError(f"sites[{i}]", "{name: str, cases: [str]}",
                                           type(s).__name__, "write the split again"))
                    continue
                sites.append(SiteSplit(s["name"], tuple(s["cases"])))
        seen: dict[str, str] = {}
        for s in sites:
            for c in s.cases:
                if c in seen and seen[c] != s.name:
                    errs.append(FieldError("sites", "disjoint sites (a case on one site)",
                                           f"case {c!r} on {seen[c]} and {s.name}",
                                           "write the split again"))
                    break
                seen[c] = s.name
        if errs:
            raise ConfigError(source, errs)
        params_raw = d.get("params")
        params: dict[str, Any] = params_raw if isinstance(params_raw, dict) else {}
        return cls(partitioner=str(d.get("partitioner", "")), params=dict(params),
                   seed=int(d.get("seed", 0)), data_format=str(data.get("format", "")),
                   data_root=str(data.get("root", "")),
                   holdout_fraction=float(data.get("holdout_fraction", 0.0)),
                   data_seed=int(data.get("seed", 0)), sites=tuple(sites),
                   summary=tuple(d.get("summary") or ()))

    def save(self, path: Path) -> Path:
        from fedpacs.common.artifacts import write_json  # (torch: only where one is saved)

        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: Path) -> Split:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), [FieldError(
                "data.split", "a readable split.json", f"{type(exc).__name__}",
                "point data.split at the split.json of a run directory")]) from exc
        return cls.from_json(raw, source=str(path))

    def site_cases(self, partition: int, *, source: str) -> list[str]:
        """The case IDs of site ``partition`` (a DataError naming ``source`` when the split
        has no such site)."""
        if not 0 <= partition < len(self.sites):
            raise DataError(source, f"data.partition {partition} is not a site of the split "
                            f"(it has {len(self.sites)}: 0..{len(self.sites) - 1})",
                            "set data.partition to this site's index in the split",
                            kind="split-partition")
        return list(self.sites[partition].cases)


def split_site_cases(split_path: Path, partition: int, pool: Sequence[str]) -> list[str]:
    """Site ``partition``'s case IDs from a saved split, each checked to be in ``pool``
    (the data set's cases outside its held-out split): a DataError naming the split file
    otherwise (the split was made for another data set, or another held-out setting,
    whose held-out cases a site must never train on)."""
    mine = Split.load(split_path).site_cases(partition, source=str(split_path))
    known = set(pool)
    missing = [c for c in mine if c not in known]
    if missing:
        raise DataError(str(split_path), f"{len(missing)} of site {partition}'s "
                        f"{len(mine)} case(s) are not in this data set's pool (e.g. "
                        f"{missing[0]!r}): the split was made for another data set or "
                        "another holdout_fraction/seed", "use the data set, holdout_fraction "
                        "and seed the split was made with (its data section), or make a new "
                        "split", kind="split-mismatch")
    return sorted(mine)


def read_sources(path: Path) -> dict[str, str]:
    """case ID -> source from a CSV with columns ``case_id`` and ``source``."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConfigError(str(path), [FieldError("--sources", "a readable CSV file",
                                                 exc.strerror or type(exc).__name__,
                                                 "write case_id,source rows")]) from exc
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        cid, src = (row.get("case_id") or "").strip(), (row.get("source") or "").strip()
        if not cid or not src:
            raise ConfigError(str(path), [FieldError(f"line {i}", "case_id and source",
                                                     repr(row), "fill both columns")])
        out[cid] = src
    return out


# --------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class SiteSummary:
    """One site's cases before a run: how many it trains and validates on, and its
    training cases per class (classification; {} otherwise)."""

    name: str
    train: int
    val: int
    per_class: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "train": self.train, "val": self.val,
                "per_class": {str(k): v for k, v in sorted(self.per_class.items())}}


def check_sites(summaries: Sequence[SiteSummary], *, batch_size: int, num_classes: int,
                class_names: Sequence[str] = (), classification: bool,
                require_all_classes: bool = False) -> tuple[list[FieldError], list[str]]:
    """(refusals, warnings) of a split: refused where training cannot work (a site with
    fewer training cases than ``batch_size``; a classification site with no case), and
    missing classes a warning, or a refusal with ``require_all_classes``."""
    errs: list[FieldError] = []
    warns: list[str] = []

    def cname(c: int) -> str:
        return f"class {c} ({class_names[c]})" if c < len(class_names) else f"class {c}"

    for s in summaries:
        if s.val == 0:
            errs.append(FieldError(f"site {s.name}", ">= 1 validation case (each round a "
                                   "site evaluates the global model on its validation "
                                   "split before it trains)", "none", "use fewer sites, a "
                                   "larger --alpha, or a larger val_fraction"))
        if s.train == 0 and classification:
            errs.append(FieldError(f"site {s.name}", "at least one training case", "none",
                                   "use fewer sites, a larger --alpha or another partition"))
        elif s.train < batch_size:
            errs.append(FieldError(f"site {s.name}", f">= {batch_size} training cases (one "
                                   "batch)", f"{s.train}", "use fewer sites, a larger "
                                   "--alpha, or a smaller --batch-size"))
        if not classification:
            continue
        for c in range(num_classes):
            if s.per_class.get(c, 0) == 0:
                msg = f"site {s.name} has no training case of {cname(c)}"
                if require_all_classes:
                    errs.append(FieldError(f"site {s.name} {cname(c)}", ">= 1 training case "
                                           "(every class on every site was required)", "0",
                                           "raise --alpha or drop --require-all-classes"))
                else:
                    warns.append(msg)
    return errs, warns


def format_summary(summaries: Sequence[SiteSummary]) -> list[str]:
    """One line per site: its training/validation cases and training cases per class."""
    return [f"{s.name}: {s.train} train / {s.val} val cases" + (
        "; per class " + ", ".join(f"{c}: {n}" for c, n in sorted(s.per_class.items()))
        if s.per_class else "") for s in summaries]


# --------------------------------------------------------------------------- a data set
@dataclass(frozen=True)
class Pool:
    """A data set's cases outside its held-out split (what a split partitions): their IDs
    and, for a classification data set, each one's class (None otherwise)."""

    ids: tuple[str, ...]
    labels: tuple[int, ...] | None


def pool_cases(spec: DataSpec, task: TaskConfig) -> Pool:
    """The pool of a shared-format data set as the readers define it (fedpacs.common.
    datasets): MedMNIST's train and val rows; the NIfTI or image cases outside the
    held-out split of ``spec.holdout_fraction`` and ``spec.seed``."""
    from fedpacs.common import datasets as ds

    if spec.format == "medmnist":
        data = ds.read_medmnist(spec.root)
        labels = np.concatenate([data[f"{s}_labels"].reshape(len(data[f"{s}_labels"]), -1)[:, 0]
                                 for s in MEDMNIST_POOL_SPLITS])
        return Pool(tuple(ds.medmnist_pool_ids(data)), tuple(int(v) for v in labels))
    if spec.format in ("images", "image-masks"):
        cases: Sequence[Any] = ds.list_image_cases(spec, task)[0]
    elif spec.format == "nifti":
        cases = ds.list_nifti_cases(spec.root)[0]
    else:
        raise ConfigError("simulation data", [FieldError(
            "--data format", "nifti, medmnist, images or image-masks (a pooled data set)",
            repr(spec.format), "point --data at a shared-format data set")])
    pool, _ = ds.split_ids([c.case_id for c in cases], holdout_fraction=spec.holdout_fraction,
                           seed=spec.seed)
    if spec.format != "images":
        return Pool(tuple(pool), None)
    by_id = {c.case_id: int(c.label) for c in cases}
    return Pool(tuple(pool), tuple(by_id[i] for i in pool))


def make_split(pool: Pool, spec: DataSpec, *, partitioner: str, sites: int, alpha: float,
               seed: int, min_cases: int = 0, sources: dict[str, str] | None = None,
               site_prefix: str = "site") -> Split:
    """Partition ``pool`` (see the module docstring) into a :class:`Split` record."""
    n = len(pool.ids)
    params: dict[str, float | int | str] = {"sites": sites}
    names: list[str] = [f"{site_prefix}-{i:03d}" for i in range(sites)]
    if partitioner == "iid":
        parts = iid_partition(n, sites, seed=seed)
    elif partitioner == "dirichlet":
        if pool.labels is None:
            raise ConfigError("partition", [FieldError(
                "--partition", "iid, quantity or source for a data set without a class "
                "per case (segmentation)", "dirichlet", "use --partition quantity for "
                "skewed site sizes")])
        parts = dirichlet_partition(pool.labels, sites, alpha=alpha, seed=seed,
                                    min_cases=min_cases)
        params |= {"alpha": alpha, "min_cases": min_cases}
    elif partitioner == "quantity":
        parts = quantity_partition(n, sites, alpha=alpha, seed=seed, min_cases=min_cases)
        params |= {"alpha": alpha, "min_cases": min_cases}
    elif partitioner == "source":
        if not sources:
            raise ConfigError("partition", [FieldError(
                "--sources", "a case_id,source CSV for --partition source", "nothing",
                "give --sources FILE (no data set here carries a source field)")])
        unknown = [i for i in pool.ids if i not in sources]
        if unknown:
            raise ConfigError("partition", [FieldError(
                "--sources", "a source for every pooled case", f"{len(unknown)} without "
                f"one (e.g. {unknown[0]!r})", "add a row per case ID")])
        source_names, parts = source_partition([sources[i] for i in pool.ids])
        if sites not in (0, len(source_names)):
            raise ConfigError("partition", [FieldError(
                "--sites", f"{len(source_names)} (one site per source) or 0", str(sites),
                "drop --sites with --partition source")])
        names = [f"{site_prefix}-{i:03d}" for i in range(len(source_names))]
        params = {"sites": len(source_names), "sources": ",".join(source_names)}
    else:
        raise ConfigError("partition", [FieldError(
            "--partition", f"one of {', '.join(PARTITIONERS)}", repr(partitioner),
            "choose a partitioner by name")])
    return Split(partitioner=partitioner, params=params, seed=seed,
                 data_format=spec.format, data_root=str(spec.root),
                 holdout_fraction=spec.holdout_fraction, data_seed=spec.seed,
                 sites=tuple(SiteSplit(name, tuple(sorted(pool.ids[j] for j in part)))
                             for name, part in zip(names, parts, strict=True)))


def summarize(split: Split, pool: Pool, spec: DataSpec, *, num_classes: int
              ) -> list[SiteSummary]:
    """Each site's training and validation cases (as the readers split them) and its
    training cases per class (every class counted, 0 included; classification only)."""
    from fedpacs.common.datasets import site_train_val

    label = dict(zip(pool.ids, pool.labels, strict=True)) if pool.labels is not None else {}
    out = []
    for s in split.sites:
        train, val = site_train_val(list(s.cases), spec)
        per_class = {c: 0 for c in range(num_classes)} if label else {}
        for c in train:
            if label:
                per_class[label[c]] = per_class.get(label[c], 0) + 1
        out.append(SiteSummary(s.name, len(train), len(val), per_class))
    return out
