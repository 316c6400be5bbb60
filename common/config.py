"""Typed configuration, parsed once, with every problem reported together.

* :class:`SiteConfig` — a hospital's site file (TOML). Its data paths never leave the site.
* :class:`RunConfig` — one federated run, set by the coordinator; travels to the ServerApp
  (and, minus server paths, to sites) as Flower's flat run config via :meth:`to_flat`.

Resolution order for every setting: command-line flag, then environment, then file, then
the named default below.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedpacs.common.datasets import DATA_FORMATS, DataSpec
from fedpacs.common.errors import ConfigError, FieldError
from fedpacs.common.tasks import (
    TASK_PRESETS,
    TaskConfig,
    task_with_network,
    validate_task_dict,
)

SITE_CONFIG_ENV = "FEDPACS_SITE_CONFIG"
# Strategies that work on the sum of the updates alone (FedProx's term is on the site).
SECAGG_STRATEGIES = ("fedavg", "fedprox")
SITE_CONFIG_NODE_KEY = "site-config"  # key in the SuperNode's --node-config

DEFAULT_THREADS = 0  # 0: let torch decide
DEFAULT_DEVICE = "auto"  # cuda when present, else cpu


def _type_name(v: object) -> str:
    return f"{v!r} ({type(v).__name__})"


@dataclass(frozen=True)
class ComputeConfig:
    device: str = DEFAULT_DEVICE
    threads: int = DEFAULT_THREADS


@dataclass(frozen=True)
class IngestConfig:
    """[pacs] + [cohort]: where the site's studies come from and where they are cached."""

    pacs: Any  # fedpacs.client.pacs.PacsConfig (kept untyped here: common must not import client)
    cohort: Any  # fedpacs.client.pacs.CohortQuery
    cache_dir: Path


@dataclass(frozen=True)
class SecurityConfig:
    """[security]: what this site accepts from the federation.

    * ``require_secagg``: train only in SecAgg+ runs, so no plain update ever leaves.
    * ``trusted_app_keys``: Ed25519 public keys (OpenSSH) whose signature an app must carry
      before this site runs it (checked by the site daemon's app gate).
    * ``allow_unsigned_apps``: run apps without a signature check (development only).
    """

    require_secagg: bool = True
    trusted_app_keys: tuple[Path, ...] = ()
    allow_unsigned_apps: bool = False


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's site daemon settings."""

    name: str
    task: str
    data: DataSpec
    compute: ComputeConfig
    source: str = "<memory>"
    ingest: IngestConfig | None = None
    custom_task: TaskConfig | None = None  # from a [task] table, for tasks not in the presets
    security: SecurityConfig = SecurityConfig()

    @property
    def require_secagg(self) -> bool:
        return self.security.require_secagg


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file or raise a ConfigError naming the file and the parse problem."""
    if not path.is_file():
        raise ConfigError(str(path), [FieldError("file", "an existing TOML file",
                                                 "no such file", f"create {path} or fix the path")])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [FieldError("file", "valid TOML", str(exc),
                                                 "fix the syntax at the position named")]) from exc


def _section(raw: dict[str, Any], key: str, errs: list[FieldError]) -> dict[str, Any]:
    sec = raw.get(key, {})
    if not isinstance(sec, dict):
        errs.append(FieldError(f"[{key}]", "a table", _type_name(sec), f"write [{key}] as a table"))
        return {}
    return sec


def _check_unknown(sec: dict[str, Any], allowed: set[str], prefix: str,
                   errs: list[FieldError]) -> None:
    for k in sorted(set(sec) - allowed):
        errs.append(FieldError(f"{prefix}{k}", f"one of {', '.join(sorted(allowed))}",
                               repr(k), "remove or rename the key (check its spelling)"))


def parse_site_config(raw: dict[str, Any], *, source: str, base_dir: Path) -> SiteConfig:
    """Build a SiteConfig from a parsed TOML mapping; collects all problems before failing."""
    errs: list[FieldError] = []
    _check_unknown(raw, {"site", "data", "compute", "pacs", "cohort", "task", "security"}, "",
                   errs)
    site = _section(raw, "site", errs)
    data = _section(raw, "data", errs)
    comp = _section(raw, "compute", errs)
    _check_unknown(site, {"name", "task"}, "site.", errs)
    _check_unknown(data, {"format", "root", "partition", "num_partitions", "holdout_fraction",
                          "val_fraction", "seed", "labels"}, "data.", errs)
    _check_unknown(comp, {"device", "threads"}, "compute.", errs)

    name = site.get("name")
    if not isinstance(name, str) or not name.strip():
        errs.append(FieldError("site.name", "a non-empty string", _type_name(name),
                               'set name = "hospital-a"'))
    task = site.get("task")
    custom: TaskConfig | None = None
    if "task" in raw:
        task_errs = validate_task_dict(raw["task"], source_prefix="task.") if isinstance(
            raw["task"], dict) else [FieldError("[task]", "a table", _type_name(raw["task"]),
                                                "write [task] as a table")]
        errs.extend(task_errs)
        if not task_errs:
            custom = TaskConfig.from_dict(raw["task"], source=f"{source} [task]")
            if custom.name != task:
                errs.append(FieldError("task.name", f"the site's task {task!r}",
                                       repr(custom.name), "make [task] name = site.task"))
    elif task not in TASK_PRESETS:
        errs.append(FieldError("site.task", f"one of {', '.join(sorted(TASK_PRESETS))} "
                               "(or define it in a [task] table)",
                               _type_name(task), "set the task this site's data serves"))
    fmt = data.get("format")
    if fmt not in DATA_FORMATS:
        errs.append(FieldError("data.format", f"one of {', '.join(DATA_FORMATS)}",
                               _type_name(fmt), 'set format = "nifti", "medmnist" or "pacs"'))
    root_raw = data.get("root")
    root: Path | None = None
    if not isinstance(root_raw, str) or not root_raw:
        errs.append(FieldError("data.root", "a path to the site's data", _type_name(root_raw),
                               'set root = "/data/hippocampus" (relative paths are taken '
                               "from the config file's folder)"))
    else:
        root = Path(os.path.expandvars(root_raw)).expanduser()
        if not root.is_absolute():
            root = (base_dir / root).resolve()
        if not root.exists() and fmt != "pacs":
            errs.append(FieldError("data.root", "an existing file or folder", str(root),
                                   "fix the path or mount the data there"))
        elif fmt == "nifti" and not (root / "images").is_dir():
            errs.append(FieldError("data.root", "a folder with images/ and labels/", str(root),
                                   "point root at the folder holding images/ and labels/"))
        elif fmt == "medmnist" and not root.is_file():
            errs.append(FieldError("data.root", "a MedMNIST .npz file", str(root),
                                   "point root at the .npz file"))
    labels: Path | None = None
    if "labels" in data or fmt == "pacs":
        lab_raw = data.get("labels")
        if not isinstance(lab_raw, str) or not lab_raw:
            errs.append(FieldError("data.labels", "a CSV of labels (SeriesInstanceUID,label)",
                                   _type_name(lab_raw), 'set labels = "labels.csv"'))
        else:
            labels = Path(os.path.expandvars(lab_raw)).expanduser()
            labels = labels if labels.is_absolute() else (base_dir / labels).resolve()
            if not labels.is_file():
                errs.append(FieldError("data.labels", "an existing CSV file", str(labels),
                                       "write the label manifest or fix the path"))

    def _int(sec: dict[str, Any], key: str, default: int, lo: int, prefix: str) -> int:
        v = sec.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            errs.append(FieldError(f"{prefix}{key}", f"an integer >= {lo}", _type_name(v),
                                   f"set {key} = {default}"))
            return default
        return v

    def _frac(sec: dict[str, Any], key: str, default: float, prefix: str) -> float:
        v = sec.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
            errs.append(FieldError(f"{prefix}{key}", "a number in [0, 1)", _type_name(v),
                                   f"set {key} = {default}"))
            return default
        return float(v)

    partition = _int(data, "partition", 0, 0, "data.")
    num_parts = _int(data, "num_partitions", 1, 1, "data.")
    if partition >= num_parts:
        errs.append(FieldError("data.partition", f"an integer in 0..{num_parts - 1}",
                               str(partition), "partition must be below num_partitions"))
    holdout = _frac(data, "holdout_fraction", 0.2, "data.")
    val = _frac(data, "val_fraction", 0.15, "data.")
    seed = _int(data, "seed", 0, 0, "data.")
    threads = _int(comp, "threads", DEFAULT_THREADS, 0, "compute.")
    device = comp.get("device", DEFAULT_DEVICE)
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda")
                                           or device.startswith("cuda:")):
        errs.append(FieldError("compute.device", "auto, cpu, cuda or cuda:N", _type_name(device),
                               'set device = "auto"'))
    ingest = parse_ingest(raw, base_dir, errs) if "pacs" in raw else None
    security = parse_security(_section(raw, "security", errs), base_dir, errs)
    if errs:
        raise ConfigError(source, errs)
    assert root is not None and isinstance(name, str) and isinstance(task, str)
    return SiteConfig(
        name=name.strip(), task=task,
        data=DataSpec(format=fmt, root=root, partition=partition, num_partitions=num_parts,
                      holdout_fraction=holdout, val_fraction=val, seed=seed, labels=labels),
        compute=ComputeConfig(device=str(device), threads=threads), source=source,
        ingest=ingest, custom_task=custom,
        security=security,
    )


def parse_security(sec: dict[str, Any], base_dir: Path, errs: list[FieldError]
                   ) -> SecurityConfig:
    """The [security] table; appends problems to ``errs``."""
    _check_unknown(sec, {f.name for f in fields(SecurityConfig)}, "security.", errs)
    flags: dict[str, bool] = {}
    for key, default in (("require_secagg", True), ("allow_unsigned_apps", False)):
        v = sec.get(key, default)
        if not isinstance(v, bool):
            errs.append(FieldError(f"security.{key}", "true or false", _type_name(v),
                                   f"set {key} = {str(default).lower()}"))
            v = default
        flags[key] = v
    raw_keys = sec.get("trusted_app_keys", [])
    keys: list[Path] = []
    if not isinstance(raw_keys, list) or not all(isinstance(k, str) for k in raw_keys):
        errs.append(FieldError("security.trusted_app_keys", "a list of public key paths",
                               _type_name(raw_keys),
                               'e.g. trusted_app_keys = ["keys/coordinator.pub"]'))
        raw_keys = []
    for k in raw_keys:
        path = Path(os.path.expandvars(k)).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        if not path.is_file():
            errs.append(FieldError("security.trusted_app_keys", "existing public key files",
                                   str(path), "copy the coordinator's app-signing .pub here"))
        keys.append(path)
    return SecurityConfig(require_secagg=flags["require_secagg"], trusted_app_keys=tuple(keys),
                          allow_unsigned_apps=flags["allow_unsigned_apps"])


def parse_ingest(raw: dict[str, Any], base_dir: Path, errs: list[FieldError]) -> IngestConfig:
    """The [pacs] and [cohort] tables; appends problems to ``errs``."""
    from fedpacs.client.pacs import METHODS, CohortQuery, PacsConfig

    pacs = _section(raw, "pacs", errs)
    cohort = _section(raw, "cohort", errs)
    defaults = PacsConfig()
    allowed = {f.name for f in fields(PacsConfig)} | {"cache_dir"}
    _check_unknown(pacs, allowed, "pacs.", errs)
    _check_unknown(cohort, {f.name for f in fields(CohortQuery)}, "cohort.", errs)
    values: dict[str, Any] = {}
    for f in fields(PacsConfig):
        v = pacs.get(f.name, getattr(defaults, f.name))
        want = type(getattr(defaults, f.name))
        ok = isinstance(v, want) or (want is float and isinstance(v, int))
        if isinstance(v, bool) or not ok:
            errs.append(FieldError(f"pacs.{f.name}", want.__name__, _type_name(v),
                                   f"set pacs.{f.name} = {getattr(defaults, f.name)!r}"))
            continue
        values[f.name] = float(v) if want is float else v
    if values.get("method") not in METHODS:
        errs.append(FieldError("pacs.method", f"one of {', '.join(METHODS)}",
                               _type_name(pacs.get("method")), 'set method = "c-get"'))
    elif values["method"] == "dicomweb" and not str(values.get("dicomweb_url", "")).startswith(
            ("http://", "https://")):
        errs.append(FieldError("pacs.dicomweb_url", "an http(s) URL", _type_name(
            pacs.get("dicomweb_url")), 'set dicomweb_url = "https://pacs/dicom-web"'))
    for key in ("port", "storage_port"):
        if not 0 < int(values.get(key, 1)) < 65536:
            errs.append(FieldError(f"pacs.{key}", "a TCP port 1..65535", str(values.get(key)),
                                   "use the port the PACS listens on / this site may use"))
    for key in ("called_ae", "calling_ae", "move_destination"):
        ae = str(values.get(key, ""))
        if len(ae) > 16 or (key != "move_destination" and not ae):
            errs.append(FieldError(f"pacs.{key}", "an AE title of 1..16 characters", repr(ae),
                                   "use the AE title configured at the PACS"))
    uids = cohort.get("study_uids", [])
    if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
        errs.append(FieldError("cohort.study_uids", "a list of StudyInstanceUID strings",
                               _type_name(uids), 'e.g. study_uids = ["1.2.3"]'))
        uids = []
    for key in ("date_from", "date_to"):
        v = cohort.get(key, "")
        if v and (not isinstance(v, str) or len(v) != 8 or not v.isdigit()):
            errs.append(FieldError(f"cohort.{key}", "a date YYYYMMDD", _type_name(v),
                                   f'e.g. {key} = "20200101"'))
    query = CohortQuery(**{k: str(cohort.get(k, "")) for k in (
        "modality", "study_description", "series_description", "date_from", "date_to")},
        study_uids=tuple(uids))
    cache_raw = str(pacs.get("cache_dir", "pacs-cache"))
    cache = Path(os.path.expandvars(cache_raw)).expanduser()
    cache = cache if cache.is_absolute() else (base_dir / cache).resolve()
    try:
        pacs_cfg = PacsConfig(**values)
    except TypeError:
        pacs_cfg = PacsConfig()
    return IngestConfig(pacs=pacs_cfg, cohort=query, cache_dir=cache)


def load_site_config(path: str | Path | None = None) -> SiteConfig:
    """Resolve (argument, then $FEDPACS_SITE_CONFIG) and parse a site config file."""
    chosen = path if path not in (None, "") else os.environ.get(SITE_CONFIG_ENV)
    if not chosen:
        raise ConfigError("site config", [FieldError(
            "site-config", "a path to the site's TOML file", "nothing",
            f"pass --config, set ${SITE_CONFIG_ENV}, or start the SuperNode with "
            f"--node-config '{SITE_CONFIG_NODE_KEY}=\"/path/site.toml\"'")])
    p = Path(str(chosen)).expanduser().resolve()
    return parse_site_config(read_toml(p), source=str(p), base_dir=p.parent)


# --------------------------------------------------------------------------- run config
@dataclass(frozen=True)
class RunConfig:
    """One federated run. Keys in Flower's run config are these names with '-' for '_'."""

    task: str = "hippocampus"
    rounds: int = 5
    local_epochs: int = 2
    batch_size: int = 4
    lr: float = 3e-3
    min_sites: int = 3
    round_timeout_s: float = 900.0
    seed: int = 0
    run_dir: str = ""  # server-side folder for checkpoints and the final model
    eval_format: str = ""  # server-side held-out data (optional): "nifti" | "medmnist"
    eval_root: str = ""
    eval_holdout_fraction: float = 0.2
    eval_seed: int = 0
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg | krum
    network: str = ""  # "" keeps the task preset's network
    proximal_mu: float = 0.0  # FedProx
    server_lr: float = 0.1  # FedAdam's server learning rate (eta)
    trimmed_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each end
    krum_malicious: int = 0  # Krum: tolerated malicious sites
    fedbn: bool = False  # keep normalisation layers local to each site (FedBN)
    metrics_port: int = 0  # Prometheus endpoint of the ServerApp; 0: off
    cross_site: bool = True  # NxN validation of the global and each local model at the end
    task_json: str = ""  # a custom task (TaskConfig as JSON) when `task` is not a preset
    signing_key: str = ""  # server-side Ed25519 key: sign the run's artifacts at the end
    # Secure aggregation (SecAgg+): the server only ever sees the sum of the sites' updates.
    secagg: bool = True
    secagg_threshold: float = 0.66  # fraction of a site's key shares needed to unmask it
    secagg_clip: float = 8.0  # |weight * num_examples / max_weight| must stay below this
    secagg_max_weight: float = 10000.0  # largest num_examples a site may report
    # Server-side checks: an update (or aggregate) further than this L2 distance from the
    # round's global model is dropped; 0 turns the bound off. Shapes/dtypes/NaN always checked.
    max_update_norm: float = 0.0
    # Local differential privacy (Flower's LocalDpMod on each site's train reply); 0: off.
    dp_clip: float = 0.0  # L2 bound on a site's update (also the sensitivity)
    dp_epsilon: float = 1.0
    dp_delta: float = 1e-5

    def to_flat(self) -> dict[str, bool | int | float | str]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def site_view(self) -> dict[str, bool | int | float | str]:
        """What sites are told each round (no server paths)."""
        return {"task": self.task, "local-epochs": self.local_epochs,
                "batch-size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "network": self.network, "fedbn": self.fedbn, "task-json": self.task_json,
                "secagg": self.secagg, "secagg-clip": self.secagg_clip,
                "secagg-max-weight": self.secagg_max_weight, "dp-clip": self.dp_clip,
                "dp-epsilon": self.dp_epsilon, "dp-delta": self.dp_delta}

    @classmethod
    def from_flat(cls, flat: dict[str, Any], *, source: str = "run config") -> RunConfig:
        errs: list[FieldError] = []
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, v in flat.items():
            name = key.replace("-", "_")
            if name not in known:
                names = ", ".join(k.replace("_", "-") for k in known)
                errs.append(FieldError(key, f"one of {names}", repr(key),
                                       "remove or rename the key"))
                continue
            default = known[name].default
            if isinstance(default, bool):
                ok = isinstance(v, bool)
            elif isinstance(default, int):
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif isinstance(default, float):
                ok = isinstance(v, int | float) and not isinstance(v, bool)
                v = float(v) if ok else v
            else:
                ok = isinstance(v, str)
            if not ok:
                errs.append(FieldError(key, type(default).__name__, _type_name(v),
                                       f"set {key} to a {type(default).__name__}"))
                continue
            values[name] = v
        cfg = cls(**values) if not errs else cls()
        if not errs:
            errs.extend(cfg.validate())
        if errs:
            raise ConfigError(source, errs)
        return cfg

    def validate(self) -> list[FieldError]:
        errs: list[FieldError] = []
        if self.task_json:
            try:
                custom = json.loads(self.task_json)
                task_errs = validate_task_dict(custom, source_prefix="task-json.") if \
                    isinstance(custom, dict) else [FieldError(
                        "task-json", "a JSON object", type(custom).__name__, "use --task-file")]
            except json.JSONDecodeError as exc:
                task_errs = [FieldError("task-json", "valid JSON", str(exc), "use --task-file")]
                custom = {}
            errs.extend(task_errs)
            if not task_errs and custom.get("name") != self.task:
                errs.append(FieldError("task", f"the custom task's name {custom.get('name')!r}",
                                       repr(self.task), "use the name from the task file"))
        elif self.task not in TASK_PRESETS:
            errs.append(FieldError("task", f"one of {', '.join(sorted(TASK_PRESETS))}",
                                   repr(self.task), "choose a task preset or a --task-file"))
        for name, lo in (("rounds", 1), ("local_epochs", 1), ("batch_size", 1), ("min_sites", 1)):
            if getattr(self, name) < lo:
                errs.append(FieldError(name.replace("_", "-"), f">= {lo}",
                                       str(getattr(self, name)), f"set it to at least {lo}"))
        if not self.lr > 0:
            errs.append(FieldError("lr", "> 0", str(self.lr), "e.g. lr = 0.001"))
        if not self.round_timeout_s > 0:
            errs.append(FieldError("round-timeout-s", "> 0 seconds", str(self.round_timeout_s),
                                   "e.g. 900"))
        if self.eval_format and self.eval_format not in DATA_FORMATS:
            errs.append(FieldError("eval-format", f"empty or one of {', '.join(DATA_FORMATS)}",
                                   repr(self.eval_format), "leave empty to skip server evaluation"))
        strategies = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
        if self.strategy not in strategies:
            errs.append(FieldError("strategy", f"one of {', '.join(strategies)}",
                                   repr(self.strategy), "pick a strategy by name"))
        if self.strategy == "fedprox" and not self.proximal_mu > 0:
            errs.append(FieldError("proximal-mu", "> 0 with strategy fedprox",
                                   str(self.proximal_mu), "e.g. proximal-mu = 0.01"))
        if not 0 <= self.trimmed_beta < 0.5:
            errs.append(FieldError("trimmed-beta", "in [0, 0.5)", str(self.trimmed_beta),
                                   "e.g. trimmed-beta = 0.2"))
        if self.strategy == "krum" and self.min_sites < 2 * self.krum_malicious + 3:
            errs.append(FieldError("min-sites", f">= 2 * krum-malicious + 3 = "
                                   f"{2 * self.krum_malicious + 3} for krum",
                                   str(self.min_sites), "add sites or lower krum-malicious"))
        if self.secagg and self.strategy not in SECAGG_STRATEGIES:
            errs.append(FieldError("strategy", f"one of {', '.join(SECAGG_STRATEGIES)} with "
                                   "secagg (the server sees only the sum of the updates)",
                                   repr(self.strategy), "set secagg = false (--no-secagg) to use "
                                   "a strategy that needs each site's update"))
        if self.secagg and self.min_sites < 3:
            errs.append(FieldError("min-sites", ">= 3 with secagg", str(self.min_sites),
                                   "add sites or set secagg = false (--no-secagg)"))
        if not 0 < self.secagg_threshold <= 1:
            errs.append(FieldError("secagg-threshold", "in (0, 1]", str(self.secagg_threshold),
                                   "e.g. 0.66: a site's mask is rebuilt from 2 of 3 shares"))
        for name in ("secagg_clip", "secagg_max_weight"):
            if not getattr(self, name) > 0:
                errs.append(FieldError(name.replace("_", "-"), "> 0", str(getattr(self, name)),
                                       "use the default"))
        if self.max_update_norm < 0:
            errs.append(FieldError("max-update-norm", ">= 0 (0: off)", str(self.max_update_norm),
                                   "e.g. max-update-norm = 50"))
        if self.dp_clip < 0:
            errs.append(FieldError("dp-clip", ">= 0 (0: off)", str(self.dp_clip),
                                   "e.g. dp-clip = 10"))
        if self.dp_clip > 0 and not (self.dp_epsilon > 0 and 0 < self.dp_delta < 1):
            errs.append(FieldError("dp-epsilon/dp-delta", "epsilon > 0 and 0 < delta < 1",
                                   f"{self.dp_epsilon}/{self.dp_delta}",
                                   "e.g. dp-epsilon = 1, dp-delta = 1e-5"))
        if not 0 <= self.metrics_port < 65536:
            errs.append(FieldError("metrics-port", "0 (off) or a TCP port",
                                   str(self.metrics_port), "e.g. metrics-port = 9400"))
        if self.task in TASK_PRESETS and self.network and not self.task_json:
            d = TASK_PRESETS[self.task].to_dict() | {"network": self.network}
            errs.extend(validate_task_dict(d, source_prefix=""))
        if self.eval_format and not Path(self.eval_root).exists():
            errs.append(FieldError("eval-root", "an existing path on the server",
                                   repr(self.eval_root), "fix the held-out data path"))
        return errs

    def task_config(self) -> TaskConfig:
        """The task preset (or custom task), with the run's network if one was chosen."""
        if self.task_json:
            base = TaskConfig.from_dict(json.loads(self.task_json), source="task-json")
            return TaskConfig.from_dict(base.to_dict() | {"network": self.network}) \
                if self.network else base
        return task_with_network(self.task, self.network)

    def eval_spec(self) -> DataSpec | None:
        if not self.eval_format:
            return None
        return DataSpec(format=self.eval_format,  # type: ignore[arg-type,unused-ignore]
                        root=Path(self.eval_root), holdout_fraction=self.eval_holdout_fraction,
                        seed=self.eval_seed)
