"""A hospital's site config (TOML), parsed once with every problem reported together.

Its data paths, PACS address and keys never leave the site; only the site daemon and the
ClientApp processes it starts read it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpacs.common.config import (
    DATA_FORMATS,
    IMAGE_LAYOUTS,
    DataSpec,
    check_unknown,
    format_task_problems,
    read_toml,
    section,
    type_name,
)
from fedpacs.common.errors import ConfigError, FieldError
from fedpacs.common.tasks import MAX_CHANNELS, TASK_PRESETS, TaskConfig, validate_task_dict

if TYPE_CHECKING:  # (pydicom/pynetdicom are imported only by a site with a [pacs] table:
    # every ClientApp process, SecAgg+ key exchange included, reads this file)
    from fedpacs.client.pacs import CohortQuery, PacsConfig

SITE_CONFIG_ENV = "FEDPACS_SITE_CONFIG"
SITE_CONFIG_NODE_KEY = "site-config"  # key in the SuperNode's --node-config
SITE_DATA_FORMATS: tuple[str, ...] = (*DATA_FORMATS, "pacs")

DEFAULT_THREADS = 0  # 0: let torch decide
DEFAULT_DEVICE = "auto"  # cuda when present, else cpu


@dataclass(frozen=True)
class ChannelRule:
    """One input channel of a multi-channel PACS site ([data] channels): the series of a
    study whose SeriesDescription (and Modality, when set) match these patterns, by the
    [cohort] rule (fedpacs.client.pacs.pattern_matches: case-insensitive, ``*``/``?``;
    "" matches anything)."""

    description: str
    modality: str = ""

    def label(self) -> str:
        """The rule as a site log names it."""
        return repr(self.description) + (f" (modality {self.modality!r})" if self.modality
                                          else "")


@dataclass(frozen=True)
class PacsPreprocess:
    """How a site prepares its converted PACS volumes for training ([data] in the site
    config). ``window``: a CT window preset name (:data:`WINDOW_PRESETS`) applied to CT
    volumes before normalisation ("" = none). ``spacing``: (slice, row, column) in mm that
    each volume (and its mask, with nearest) is resampled to before it is fitted to the
    task's input shape (None = keep the series' own spacing). ``channels``: one rule per
    input channel (fedpacs.client.channels combines the series of a study into one
    case); () = each series is a one-channel case."""

    window: str = ""
    spacing: tuple[float, float, float] | None = None
    channels: tuple[ChannelRule, ...] = ()


@dataclass(frozen=True)
class ComputeConfig:
    device: str = DEFAULT_DEVICE
    threads: int = DEFAULT_THREADS
    # keep imports, kernels and decoded data in a warm parent that forks a process per
    # message (fedpacs.client.warm); false: a cold process per message, as Flower does
    warm: bool = True
    # on CUDA only (a CPU site trains as before): mixed precision (float16 autocast with a
    # gradient scaler) and DataLoader worker processes feeding the GPU
    amp: bool = True
    loader_workers: int = 2


@dataclass(frozen=True)
class IngestConfig:
    """[pacs] + [cohort]: where the site's studies come from and where they are cached."""

    pacs: PacsConfig
    cohort: CohortQuery
    cache_dir: Path


@dataclass(frozen=True)
class SecurityConfig:
    """[security]: what this site accepts from the federation.

    * ``require_secagg``: train only in SecAgg+ runs, so no plain update ever leaves.
    * ``trusted_app_keys``: Ed25519 public keys (OpenSSH) whose signature an app must carry
      before this site runs it (checked by the site daemon's app gate).
    * ``allow_unsigned_apps``: run apps without a signature check (development only).
    * ``secagg_min_sites``, ``secagg_min_threshold``: the SecAgg+ floor this site enforces
      whatever the server announces: at least this many sites in the round and at least this
      many shares needed to rebuild a site's secrets (and always a majority of the shares).
    * ``allowed_networks``, ``max_rounds``, ``max_dp_epsilon``: ceilings on what the site
      agrees to run (empty / 0: no ceiling); ``max_dp_epsilon > 0`` makes local DP with at
      most that epsilon a condition of training.
    * ``share_local_model``: let the server send this site's last local model to the other
      sites for cross-site validation (plain mode only; off: only the global model is sent).
    """

    require_secagg: bool = True
    trusted_app_keys: tuple[Path, ...] = ()
    allow_unsigned_apps: bool = False
    secagg_min_sites: int = 3
    secagg_min_threshold: int = 2
    allowed_networks: tuple[str, ...] = ()
    max_rounds: int = 0
    max_dp_epsilon: float = 0.0
    share_local_model: bool = False


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
    # [data] window / spacing: how a "pacs" site prepares its volumes (default: as converted)
    preprocess: PacsPreprocess = PacsPreprocess()

    @property
    def require_secagg(self) -> bool:
        return self.security.require_secagg


def parse_site_config(raw: dict[str, Any], *, source: str, base_dir: Path) -> SiteConfig:
    """Build a SiteConfig from a parsed TOML mapping; collects all problems before failing."""
    errs: list[FieldError] = []
    check_unknown(raw, {"site", "data", "compute", "pacs", "cohort", "task", "security"}, "",
                   errs)
    site = section(raw, "site", errs)
    data = section(raw, "data", errs)
    comp = section(raw, "compute", errs)
    check_unknown(site, {"name", "task"}, "site.", errs)
    check_unknown(data, {"format", "root", "partition", "num_partitions", "holdout_fraction",
                          "val_fraction", "seed", "labels", "window", "spacing",
                          "channels", "split"}, "data.", errs)
    check_unknown(comp, {"device", "threads", "warm", "amp", "loader_workers"}, "compute.",
                  errs)

    name = site.get("name")
    if not isinstance(name, str) or not name.strip():
        errs.append(FieldError("site.name", "a non-empty string", type_name(name),
                               'set name = "hospital-a"'))
    task = site.get("task")
    custom: TaskConfig | None = None
    if "task" in raw:
        task_errs = validate_task_dict(raw["task"], source_prefix="task.") if isinstance(
            raw["task"], dict) else [FieldError("[task]", "a table", type_name(raw["task"]),
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
                               type_name(task), "set the task this site's data serves"))
    fmt = data.get("format")
    if fmt not in SITE_DATA_FORMATS:
        errs.append(FieldError("data.format", f"one of {', '.join(SITE_DATA_FORMATS)}",
                               type_name(fmt), 'set format = "nifti", "medmnist", "images", '
                               '"image-masks" or "pacs"'))
    site_task = custom or (TASK_PRESETS.get(task) if isinstance(task, str) else None)
    if site_task is not None:
        errs.extend(format_task_problems(fmt, site_task, "data.format"))
    root_raw = data.get("root")
    root: Path | None = None
    if not isinstance(root_raw, str) or not root_raw:
        errs.append(FieldError("data.root", "a path to the site's data", type_name(root_raw),
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
        elif fmt == "images" and not root.is_dir():
            errs.append(FieldError("data.root", "a folder with one sub-folder per class",
                                   str(root), f"lay the images out as {IMAGE_LAYOUTS['images']}"))
        elif fmt == "image-masks" and not ((root / "images").is_dir()
                                           and (root / "masks").is_dir()):
            errs.append(FieldError("data.root", "a folder with images/ and masks/", str(root),
                                   f"lay the images out as {IMAGE_LAYOUTS['image-masks']}"))
    labels: Path | None = None
    # a PACS site's segmentation masks may all come from the SEG/RTSTRUCT the ingest turned
    # into label maps ([cohort] labels): then it needs no manifest
    masks_from_pacs = fmt == "pacs" and site_task is not None and \
        site_task.kind == "segmentation"
    if "labels" in data or (fmt == "pacs" and not masks_from_pacs):
        lab_raw = data.get("labels")
        if not isinstance(lab_raw, str) or not lab_raw:
            errs.append(FieldError("data.labels", "a CSV of labels (SeriesInstanceUID,label)",
                                   type_name(lab_raw), 'set labels = "labels.csv" (a '
                                   "segmentation task may leave it out and take its masks "
                                   'from DICOM SEG/RTSTRUCT: [cohort] labels = "seg")'))
        else:
            labels = Path(os.path.expandvars(lab_raw)).expanduser()
            labels = labels if labels.is_absolute() else (base_dir / labels).resolve()
            if not labels.is_file():
                errs.append(FieldError("data.labels", "an existing CSV file", str(labels),
                                       "write the label manifest or fix the path"))
    split = parse_split(data, fmt, base_dir, errs)

    def _int(sec: dict[str, Any], key: str, default: int, lo: int, prefix: str) -> int:
        v = sec.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            errs.append(FieldError(f"{prefix}{key}", f"an integer >= {lo}", type_name(v),
                                   f"set {key} = {default}"))
            return default
        return v

    def _frac(sec: dict[str, Any], key: str, default: float, prefix: str) -> float:
        v = sec.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
            errs.append(FieldError(f"{prefix}{key}", "a number in [0, 1)", type_name(v),
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
        errs.append(FieldError("compute.device", "auto, cpu, cuda or cuda:N", type_name(device),
                               'set device = "auto"'))
    warm = comp.get("warm", ComputeConfig.warm)
    if not isinstance(warm, bool):
        errs.append(FieldError("compute.warm", "true or false", type_name(warm),
                               "set warm = true (or false for a cold process per message)"))
        warm = ComputeConfig.warm
    amp = comp.get("amp", ComputeConfig.amp)
    if not isinstance(amp, bool):
        errs.append(FieldError("compute.amp", "true or false", type_name(amp),
                               "set amp = true (mixed precision on CUDA) or false"))
        amp = ComputeConfig.amp
    workers = _int(comp, "loader_workers", ComputeConfig.loader_workers, 0, "compute.")
    preprocess = parse_preprocess(data, fmt, errs)
    preprocess = replace(preprocess, channels=parse_channels(data, fmt, site_task, errs))
    ingest = parse_ingest(raw, base_dir, errs, class_names=site_task.class_names
                          if site_task is not None else ()) if "pacs" in raw else None
    security = parse_security(section(raw, "security", errs), base_dir, errs)
    if errs:
        raise ConfigError(source, errs)
    assert root is not None and isinstance(name, str) and isinstance(task, str)
    return SiteConfig(
        name=name.strip(), task=task,
        data=DataSpec(format=fmt, root=root, partition=partition, num_partitions=num_parts,
                      holdout_fraction=holdout, val_fraction=val, seed=seed, labels=labels,
                      split=split),
        compute=ComputeConfig(device=str(device), threads=threads, warm=warm, amp=amp,
                              loader_workers=workers), source=source,
        ingest=ingest, custom_task=custom,
        security=security, preprocess=preprocess,
    )


def parse_split(data: dict[str, Any], fmt: object, base_dir: Path,
                errs: list[FieldError]) -> Path | None:
    """[data] split: a saved split (a run's split.json, fedpacs.common.partition) whose
    sites[partition] are this site's cases; relative to the config's folder. A shared
    format only (a PACS site splits its own cache by patient). None when absent."""
    if "split" not in data:
        return None
    raw = data["split"]
    if not isinstance(raw, str) or not raw:
        errs.append(FieldError("data.split", "a path to a split.json", type_name(raw),
                               'e.g. split = "runs/sim/split.json", or remove the key'))
        return None
    path = Path(os.path.expandvars(raw)).expanduser()
    path = path if path.is_absolute() else (base_dir / path).resolve()
    if fmt == "pacs":
        errs.append(FieldError("data.split", 'a shared format (nifti, medmnist, images, '
                               'image-masks)', 'format "pacs"', "remove data.split: a PACS "
                               "site splits its own cache by patient"))
    elif not path.is_file():
        errs.append(FieldError("data.split", "an existing split.json", str(path),
                               "fix the path (a run directory's split.json)"))
    return path


def parse_security(sec: dict[str, Any], base_dir: Path, errs: list[FieldError]
                   ) -> SecurityConfig:
    """The [security] table; appends problems to ``errs``."""
    check_unknown(sec, {f.name for f in fields(SecurityConfig)}, "security.", errs)
    defaults = SecurityConfig()
    flags: dict[str, Any] = {}
    for key in ("require_secagg", "allow_unsigned_apps", "share_local_model"):
        default = getattr(defaults, key)
        v = sec.get(key, default)
        if not isinstance(v, bool):
            errs.append(FieldError(f"security.{key}", "true or false", type_name(v),
                                   f"set {key} = {str(default).lower()}"))
            v = default
        flags[key] = v
    for key, lo in (("secagg_min_sites", 3), ("secagg_min_threshold", 2), ("max_rounds", 0)):
        default = getattr(defaults, key)
        v = sec.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            errs.append(FieldError(f"security.{key}", f"an integer >= {lo}", type_name(v),
                                   f"set {key} = {default}"))
            v = default
        flags[key] = v
    eps = sec.get("max_dp_epsilon", defaults.max_dp_epsilon)
    if not isinstance(eps, int | float) or isinstance(eps, bool) or eps < 0:
        errs.append(FieldError("security.max_dp_epsilon", "a number >= 0 (0: DP not required)",
                               type_name(eps), "e.g. max_dp_epsilon = 8"))
        eps = defaults.max_dp_epsilon
    flags["max_dp_epsilon"] = float(eps)
    nets = sec.get("allowed_networks", [])
    if not isinstance(nets, list) or not all(isinstance(n, str) for n in nets):
        errs.append(FieldError("security.allowed_networks", "a list of network names",
                               type_name(nets), 'e.g. allowed_networks = ["unet", "resnet18"]'))
        nets = []
    flags["allowed_networks"] = tuple(nets)
    raw_keys = sec.get("trusted_app_keys", [])
    keys: list[Path] = []
    if not isinstance(raw_keys, list) or not all(isinstance(k, str) for k in raw_keys):
        errs.append(FieldError("security.trusted_app_keys", "a list of public key paths",
                               type_name(raw_keys),
                               'e.g. trusted_app_keys = ["keys/coordinator.pub"]'))
        raw_keys = []
    for k in raw_keys:
        path = Path(os.path.expandvars(k)).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        if not path.is_file():
            errs.append(FieldError("security.trusted_app_keys", "existing public key files",
                                   str(path), "copy the coordinator's app-signing .pub here"))
        keys.append(path)
    return SecurityConfig(trusted_app_keys=tuple(keys), **flags)


def parse_preprocess(data: dict[str, Any], fmt: object, errs: list[FieldError]) -> PacsPreprocess:
    """[data] window and spacing (PACS volumes only); appends problems to ``errs``."""
    window = data.get("window", "")
    if "window" in data:
        from fedpacs.client.dicom import window_error

        err = window_error(window, "data.window")
        if err is not None:
            errs.append(err)
            window = ""
    spacing_raw = data.get("spacing")
    spacing: tuple[float, float, float] | None = None
    if spacing_raw is not None:
        if (isinstance(spacing_raw, list) and len(spacing_raw) == 3
                and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                        for v in spacing_raw)):
            spacing = (float(spacing_raw[0]), float(spacing_raw[1]), float(spacing_raw[2]))
        else:
            errs.append(FieldError("data.spacing", "3 positive numbers in mm: [slice, row, "
                                   "column]", type_name(spacing_raw),
                                   "e.g. spacing = [1.0, 1.0, 1.0], or remove the key to keep "
                                   "each series' own spacing"))
    for key in ("window", "spacing"):
        if key in data and fmt != "pacs":
            errs.append(FieldError(f"data.{key}", 'used only with format = "pacs" (volumes '
                                   "ingested from the PACS)", f"format {fmt!r}",
                                   f"remove data.{key}, or set format = \"pacs\""))
    return PacsPreprocess(window=str(window), spacing=spacing)


_CHANNEL_EXAMPLE = 'e.g. channels = ["*T1*", "*T2*", "*FLAIR*"]'


def parse_channels(data: dict[str, Any], fmt: object, task: TaskConfig | None,
                   errs: list[FieldError]) -> tuple[ChannelRule, ...]:
    """[data] channels: one SeriesDescription pattern per input channel, or a table
    ``{description = "*T1*", modality = "MR"}``; as many as the task's ``in_channels``
    (when the site knows its task), at most MAX_CHANNELS, ``format = "pacs"`` only. A pacs
    site without it trains on one channel. Appends problems to ``errs``."""
    if "channels" not in data:
        if fmt == "pacs" and task is not None and task.in_channels != 1:
            errs.append(FieldError("data.channels", f"{task.in_channels} channel rules for "
                                   f"task {task.name!r} (in_channels {task.in_channels})",
                                   "none (each series is a one-channel case)",
                                   f"add {task.in_channels} patterns, {_CHANNEL_EXAMPLE}, or "
                                   "set the task's in_channels = 1"))
        return ()
    raw = data["channels"]
    if fmt != "pacs":
        errs.append(FieldError("data.channels", 'used only with format = "pacs" (volumes '
                               "ingested from the PACS)", f"format {fmt!r}",
                               'remove data.channels, or set format = "pacs"'))
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CHANNELS:
        got = f"{len(raw)} entries" if isinstance(raw, list) else type_name(raw)
        errs.append(FieldError("data.channels", f"a list of 1..{MAX_CHANNELS} SeriesDescription "
                               "patterns, one per input channel", got, _CHANNEL_EXAMPLE))
        return ()
    rules: list[ChannelRule] = []
    for i, item in enumerate(raw):
        field = f"data.channels[{i}]"
        if isinstance(item, dict):
            extra = sorted(set(item) - {"description", "modality"})
            values = {k: item.get(k, "") for k in ("description", "modality")}
            if extra or not all(isinstance(v, str) for v in values.values()) \
                    or not any(v.strip() for v in values.values()):
                errs.append(FieldError(field, "a table with description and/or modality "
                                       "patterns (strings, not both empty)",
                                       f"keys {sorted(item)}" if extra else repr(item),
                                       'e.g. {description = "*T1*", modality = "MR"}'))
                continue
            rule = ChannelRule(values["description"].strip(), values["modality"].strip())
        elif isinstance(item, str) and item.strip():
            rule = ChannelRule(item.strip())
        else:
            errs.append(FieldError(field, "a non-empty SeriesDescription pattern",
                                   type_name(item), _CHANNEL_EXAMPLE))
            continue
        same = [j for j, r in enumerate(rules) if (r.description.casefold(),
                r.modality.casefold()) == (rule.description.casefold(), rule.modality.casefold())]
        if same:
            errs.append(FieldError(field, "a rule unlike the other channels' (patterns ignore "
                                   "case)", f"{rule.label()}, as channels[{same[0]}]",
                                   "remove the duplicate: every series would match both "
                                   "channels"))
        rules.append(rule)
    if task is not None and len(raw) != task.in_channels:
        errs.append(FieldError("data.channels", f"{task.in_channels} channel rule(s), the "
                               f"in_channels of task {task.name!r}", f"{len(raw)}",
                               "give one pattern per input channel of the task, or change "
                               "the task's in_channels"))
    return tuple(rules)


def parse_ingest(raw: dict[str, Any], base_dir: Path, errs: list[FieldError], *,
                 class_names: tuple[str, ...] = ()) -> IngestConfig:
    """The [pacs] and [cohort] tables; appends problems to ``errs``. ``class_names``: the
    site task's, which the segments of ingested SEG/RTSTRUCT label series are matched
    against (``[cohort] labels``)."""
    from fedpacs.client.pacs import (
        CohortQuery,
        PacsConfig,
        dicomweb_url_error,
        label_kinds,
        max_instance_mb_error,
        method_error,
        study_uids_error,
    )

    pacs = section(raw, "pacs", errs)
    cohort = section(raw, "cohort", errs)
    defaults = PacsConfig()
    allowed = {f.name for f in fields(PacsConfig)} | {"cache_dir"}
    check_unknown(pacs, allowed, "pacs.", errs)
    check_unknown(cohort, {f.name for f in fields(CohortQuery)} - {"label_classes"}, "cohort.",
                  errs)
    values: dict[str, Any] = {}
    for f in fields(PacsConfig):
        v = pacs.get(f.name, getattr(defaults, f.name))
        want = type(getattr(defaults, f.name))
        ok = isinstance(v, want) or (want is float and isinstance(v, int))
        if isinstance(v, bool) or not ok:
            errs.append(FieldError(f"pacs.{f.name}", want.__name__, type_name(v),
                                   f"set pacs.{f.name} = {getattr(defaults, f.name)!r}"))
            continue
        values[f.name] = float(v) if want is float else v
    method = values.get("method")
    problem = method_error(method) or dicomweb_url_error(str(method),
                                                         values.get("dicomweb_url", ""))
    if problem is not None and "method" in values:  # a non-string is reported above
        errs.append(problem)
    for key in ("port", "storage_port"):
        if not 0 < int(values.get(key, 1)) < 65536:
            errs.append(FieldError(f"pacs.{key}", "a TCP port 1..65535", str(values.get(key)),
                                   "use the port the PACS listens on / this site may use"))
    for key in ("called_ae", "calling_ae", "move_destination", "move_source_ae"):
        ae = str(values.get(key, ""))
        if len(ae) > 16 or (key in ("called_ae", "calling_ae") and not ae):
            errs.append(FieldError(f"pacs.{key}", "an AE title of 1..16 characters", repr(ae),
                                   "use the AE title configured at the PACS"))
    if "max_instance_mb" in values:
        mb_err = max_instance_mb_error(values["max_instance_mb"])
        if mb_err is not None:
            errs.append(mb_err)
            values.pop("max_instance_mb")
    uids = cohort.get("study_uids", [])
    if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
        errs.append(FieldError("cohort.study_uids", "a list of StudyInstanceUID strings",
                               type_name(uids), 'e.g. study_uids = ["1.2.3"]'))
        uids = []
    uids_err = study_uids_error(uids)
    if uids_err is not None:
        errs.append(uids_err)
        uids = []
    for key in ("date_from", "date_to"):
        v = cohort.get(key, "")
        if v and (not isinstance(v, str) or len(v) != 8 or not v.isdigit()):
            errs.append(FieldError(f"cohort.{key}", "a date YYYYMMDD", type_name(v),
                                   f'e.g. {key} = "20200101"'))
    labels, labels_err = label_kinds(cohort.get("labels", ""))
    if labels_err is not None:
        errs.append(labels_err)
    query = CohortQuery(**{k: str(cohort.get(k, "")) for k in (
        "modality", "study_description", "series_description", "date_from", "date_to")},
        study_uids=tuple(uids), labels=labels, label_classes=class_names if labels else ())
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

