"""Typed configuration, parsed once, with every problem reported together.

* :class:`SiteConfig` — a hospital's site file (TOML). Its data paths never leave the site.
* :class:`RunConfig` — one federated run, set by the coordinator; travels to the ServerApp
  (and, minus server paths, to sites) as Flower's flat run config via :meth:`to_flat`.

Resolution order for every setting: command-line flag, then environment, then file, then
the named default below.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from fedpacs.common.errors import ConfigError, FieldError, did_you_mean
from fedpacs.common.flat import read_flat, type_name
from fedpacs.common.recipe import DEFAULT_RECIPE, Recipe
from fedpacs.common.strategies import SECAGG_STRATEGIES, STRATEGY_NAMES
from fedpacs.common.tasks import (
    TASK_PRESETS,
    TaskConfig,
    task_with_network,
    training_defaults,
    validate_task_dict,
)


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


def section(raw: dict[str, Any], key: str, errs: list[FieldError]) -> dict[str, Any]:
    sec = raw.get(key, {})
    if not isinstance(sec, dict):
        errs.append(FieldError(f"[{key}]", "a table", type_name(sec), f"write [{key}] as a table"))
        return {}
    return sec


def check_unknown(sec: dict[str, Any], allowed: set[str], prefix: str,
                   errs: list[FieldError]) -> None:
    for k in sorted(set(sec) - allowed):
        errs.append(FieldError(f"{prefix}{k}", f"one of {', '.join(sorted(allowed))}",
                               repr(k), "remove or rename the key (check its spelling)"))


# Formats both sides read (sites train on them, the server holds out a split of them);
# a site's PACS cache ("pacs") is read by fedpacs.client.data alone.
DataFormat = Literal["nifti", "medmnist", "images", "image-masks", "pacs"]
DATA_FORMATS: tuple[str, ...] = ("nifti", "medmnist", "images", "image-masks")
# Folders of 2D images (PNG/JPEG/TIFF, grey or RGB): the task kind each serves, its layout
IMAGE_FORMATS: dict[str, str] = {"images": "classification", "image-masks": "segmentation"}
IMAGE_LAYOUTS: dict[str, str] = {
    "images": "root/<class name>/*.png|jpg|jpeg|tif|tiff, one sub-folder per class",
    "image-masks": "root/images/X.png with root/masks/X.png (mask values: class indices)",
}


def format_task_problems(fmt: object, task: TaskConfig, field: str) -> list[FieldError]:
    """Whether data format ``fmt`` can serve ``task`` (``field`` names where the format was
    set): an image folder holds 2D images of 1 or 3 channels, ``images`` (class folders)
    for a classification task, ``image-masks`` for a segmentation task. Empty when it fits
    (other formats are checked by their readers)."""
    if not isinstance(fmt, str) or fmt not in IMAGE_FORMATS:
        return []
    errs: list[FieldError] = []
    kind = IMAGE_FORMATS[fmt]
    if task.kind != kind:
        other = next(f for f, k in IMAGE_FORMATS.items() if k == task.kind)
        errs.append(FieldError(field, f'"{other}" for {task.kind} task {task.name!r}',
                               f'"{fmt}" (a {kind} layout)',
                               f'set {field} = "{other}" and lay the data out as '
                               f"{IMAGE_LAYOUTS[other]}, or use a {kind} task"))
    if task.spatial_dims != 2:
        errs.append(FieldError(field, "a 3D format (nifti, medmnist) for 3D task "
                               f"{task.name!r}", f'"{fmt}" (2D images)',
                               'use format "nifti" for volumes, or a 2D task'))
    if task.in_channels not in (1, 3):
        errs.append(FieldError(field, "a task with in_channels 1 (grey) or 3 (RGB) for "
                               f'"{fmt}"', f"task {task.name!r} with in_channels "
                               f"{task.in_channels}", "set the task's in_channels to 1 or 3"))
    return errs


@dataclass(frozen=True)
class DataSpec:
    """Where a data set lies and which part of it one party uses.

    ``nifti``: ``root`` holds ``images/`` and ``labels/`` with matching file names.
    ``medmnist``: ``root`` is the ``.npz`` file; its official train/val/test splits are used
    (train and val are partitioned across sites, test is the held-out split).
    ``images``: ``root`` holds one sub-folder per class (named as the task's class, a '/'
    in it written '-' or '_', or its index; sorted order when the task names no classes)
    of PNG/JPEG/TIFF images. ``image-masks``: ``root`` holds ``images/`` and ``masks/``
    with matching file stems. An image is a case (split as NIfTI cases are); see
    fedpacs.common.datasets for how images are converted.
    ``pacs``: ``root`` is a site's ingest cache, ``labels`` its label manifest (read on
    the site by fedpacs.client.data).
    """

    format: DataFormat
    root: Path
    partition: int = 0
    num_partitions: int = 1
    holdout_fraction: float = 0.2
    val_fraction: float = 0.15
    seed: int = 0
    labels: Path | None = None
    # a saved split (fedpacs.common.partition.Split, a run's split.json): this site's cases
    # are its sites[partition] instead of the random near-equal shard; None: the shard
    split: Path | None = None


# Personalisation after the federation (RunConfig.personalize): "finetune" only, today
PERSONALIZE_METHODS: tuple[str, ...] = ("none", "finetune")

# RunConfig fields that name coordinator paths, keys or ports: they stay on the coordinator.
SERVER_SIDE_FIELDS = frozenset({"run_dir", "eval_format", "eval_root", "eval_holdout_fraction",
                                "eval_seed", "metrics_port", "artifact_key", "resume_from",
                                "init_model", "init_registry"})
# set by `fedpacs run resume` alone (fedpacs.server.resume.mark_resume, in server.json):
# never from a run.toml, a flag or the run's app
RESUME_FIELD = "resume_from"


# --------------------------------------------------------------------------- run config
@dataclass(frozen=True)
class RunConfig:
    """One federated run. Keys in Flower's run config are these names with '-' for '_'."""

    task: str = "hippocampus"
    rounds: int = 5
    # 0 (the default): the task preset's value (fedpacs.common.tasks.PRESET_TRAINING)
    local_epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0  # the base rate; each round's follows lr-schedule (recipe.round_lr)
    # the training recipe (fedpacs.common.recipe.Recipe, where each default and meaning lives)
    augment: str = DEFAULT_RECIPE.augment
    loss: str = DEFAULT_RECIPE.loss
    class_weights: str = DEFAULT_RECIPE.class_weights
    focal_gamma: float = DEFAULT_RECIPE.focal_gamma
    sampler: str = DEFAULT_RECIPE.sampler
    optimizer: str = DEFAULT_RECIPE.optimizer
    momentum: float = DEFAULT_RECIPE.momentum
    weight_decay: float = DEFAULT_RECIPE.weight_decay
    lr_schedule: str = DEFAULT_RECIPE.lr_schedule
    warmup_rounds: int = DEFAULT_RECIPE.warmup_rounds
    grad_clip: float = DEFAULT_RECIPE.grad_clip
    freeze: str = DEFAULT_RECIPE.freeze
    uncertainty: str = DEFAULT_RECIPE.uncertainty
    uncertainty_samples: int = DEFAULT_RECIPE.uncertainty_samples
    # server-side: the run's round-0 weights from a registry model id, a MONAI bundle folder
    # or a .pt file (fedpacs.common.transfer); "": the network's seeded initial weights
    init_model: str = ""
    init_registry: str = ""  # server-side: the registry folder an --init-model id is read from
    min_sites: int = 3
    round_timeout_s: float = 900.0
    seed: int = 0
    run_dir: str = ""  # server-side folder for checkpoints and the final model
    eval_format: str = ""  # server-side held-out data (optional): one of DATA_FORMATS
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
    # after the last round each site fine-tunes the final global model on its own training
    # split for personalize-epochs and reports its validation metrics before and after
    # (only metrics leave the site); one of PERSONALIZE_METHODS
    personalize: str = "none"
    personalize_epochs: int = 1
    metrics_port: int = 0  # Prometheus endpoint of the ServerApp; 0: off
    cross_site: bool = True  # NxN validation of the global and each local model at the end
    task_json: str = ""  # a custom task (TaskConfig as JSON) when `task` is not a preset
    artifact_key: str = ""  # server-side Ed25519 key: sign the run's artifacts at the end
    run_name: str = ""  # the run's folder name under the coordinator's runs/ (set by run start)
    cross_site_local: bool = False  # also cross-validate each consenting site's local model
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
    # Server-side: the ServerApp continues the run after this completed round from its
    # checkpoint (fedpacs.server.resume); -1: a fresh start. Only server.json sets it.
    resume_from: int = -1

    def __post_init__(self) -> None:
        """Resolve the training fields left at 0 from the task's defaults, once."""
        defaults = training_defaults(self.task)
        for name in ("local_epochs", "batch_size", "lr"):
            if getattr(self, name) == 0:
                object.__setattr__(self, name, getattr(defaults, name))

    def recipe(self) -> Recipe:
        """The run's training recipe (what every site's round instructions carry)."""
        return Recipe(**{f.name: getattr(self, f.name) for f in fields(Recipe)})

    def to_flat(self) -> dict[str, bool | int | float | str]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def to_app_config(self) -> dict[str, bool | int | float | str]:
        """What the run's app carries (every site receives it): no server-side field, so
        no coordinator path or key name ever travels to a site."""
        return {k: v for k, v in self.to_flat().items()
                if k.replace("-", "_") not in SERVER_SIDE_FIELDS}

    def server_side(self) -> dict[str, Any]:
        """The fields that stay on the coordinator (written beside the run for its ServerApp)."""
        return {k: v for k, v in asdict(self).items() if k in SERVER_SIDE_FIELDS}

    @classmethod
    def from_flat(cls, flat: dict[str, Any], *, source: str = "run config",
                  check: bool = True) -> RunConfig:
        """Parse Flower's flat run config (types checked); with ``check``, validated too."""
        values, errs = read_flat(cls, flat)
        cfg = cls(**values) if not errs else cls()
        if not errs and check:
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
        elif self.eval_format in IMAGE_FORMATS:
            try:
                errs.extend(format_task_problems(self.eval_format, self.task_config(),
                                                 "eval-format"))
            except (ConfigError, ValueError, KeyError):
                pass  # the task's own errors are reported apart
        if self.strategy not in STRATEGY_NAMES:
            errs.append(FieldError("strategy", f"one of {', '.join(STRATEGY_NAMES)}",
                                   repr(self.strategy), "pick a strategy by name"
                                   + did_you_mean(self.strategy, STRATEGY_NAMES)))
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
        if self.secagg and self.cross_site_local:
            errs.append(FieldError("cross-site-local", "false with secagg (no local model is "
                                   "ever seen)", "true", "set secagg = false, or drop "
                                   "cross-site-local"))
        if self.secagg and self.min_sites < 3:
            errs.append(FieldError("min-sites", ">= 3 with secagg", str(self.min_sites),
                                   "add sites or set secagg = false (--no-secagg)"))
        if not 0.5 < self.secagg_threshold <= 1:
            errs.append(FieldError("secagg-threshold", "in (0.5, 1]: a strict majority of the "
                                   "shares (sites refuse anything less)",
                                   str(self.secagg_threshold),
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
        if not -1 <= self.resume_from <= self.rounds:
            errs.append(FieldError("resume-from", f"-1 (a fresh start) or a completed round "
                                   f"in 0..rounds ({self.rounds})", str(self.resume_from),
                                   "resume a run with `fedpacs run resume RUN_DIR`, which "
                                   "finds its last completed round"))
        if not 0 <= self.metrics_port < 65536:
            errs.append(FieldError("metrics-port", "0 (off) or a TCP port",
                                   str(self.metrics_port), "e.g. metrics-port = 9400"))
        if self.task in TASK_PRESETS and self.network and not self.task_json:
            d = TASK_PRESETS[self.task].to_dict() | {"network": self.network}
            errs.extend(validate_task_dict(d, source_prefix=""))
        errs.extend(self.recipe_problems())
        errs.extend(self.personalize_problems())
        if self.eval_format and not Path(self.eval_root).exists():
            errs.append(FieldError("eval-root", "an existing path on the server",
                                   repr(self.eval_root), "fix the held-out data path"))
        return errs

    def personalize_problems(self) -> list[FieldError]:
        """The personalisation options, and FedBN on a network without learned
        normalisation state (nothing would stay local: FedBN would be plain FedAvg)."""
        errs: list[FieldError] = []
        if self.personalize not in PERSONALIZE_METHODS:
            errs.append(FieldError("personalize", f"one of {', '.join(PERSONALIZE_METHODS)}",
                                   repr(self.personalize), "e.g. personalize = \"finetune\""
                                   + did_you_mean(self.personalize, PERSONALIZE_METHODS)))
        if self.personalize != "none" and not 1 <= self.personalize_epochs <= 1000:
            errs.append(FieldError("personalize-epochs", "an integer in 1..1000",
                                   str(self.personalize_epochs), "e.g. personalize-epochs = 2"))
        if self.fedbn:
            from fedpacs.common.models import learned_norm_networks, norm_state_count

            try:
                task = self.task_config()
                kept = norm_state_count(task)
            except (ConfigError, ValueError, KeyError):
                return errs  # the task's (and network's) own errors are reported apart
            if kept == 0:
                errs.append(FieldError(
                    "fedbn", "a network with learned normalisation state (affine weights "
                    "or running statistics) for FedBN to keep local",
                    f"network {task.network!r}, which has none (task {task.name!r})",
                    "set fedbn = false, or choose a network that has it: "
                    + ", ".join(learned_norm_networks(task))))
        return errs

    def recipe_problems(self) -> list[FieldError]:
        """The recipe's problems, and whether it fits the run's task (its kind, and dropout
        layers for MC dropout: the network is built on the meta device, without memory)."""
        try:
            task = self.task_config()
        except (ConfigError, ValueError, KeyError):
            return self.recipe().validate()  # the task's own errors are reported apart
        has_dropout = None
        if self.uncertainty == "mc-dropout":
            import torch

            from fedpacs.common.engine import has_dropout as drops
            from fedpacs.common.models import MODELS

            with torch.device("meta"):
                has_dropout = drops(MODELS[task.network].build(task))
        return self.recipe().validate(task.kind, has_dropout=has_dropout)

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


# --------------------------------------------------------------------------- run.toml
# [section] key -> RunConfig field. `fedpacs run start --config run.toml`; a flag given on
# the command line overrides the file, and a field in neither takes RunConfig's default.
RUN_TOML_SECTIONS: dict[str, dict[str, str]] = {
    "run": {"task": "task", "network": "network", "rounds": "rounds",
            "min_sites": "min_sites", "round_timeout_s": "round_timeout_s", "seed": "seed",
            "cross_site": "cross_site", "cross_site_local": "cross_site_local"},
    "training": {"local_epochs": "local_epochs", "batch_size": "batch_size", "lr": "lr",
                 **{f.name: f.name for f in fields(Recipe) if not f.name.startswith("uncert")},
                 "init_model": "init_model"},
    "strategy": {"name": "strategy", "proximal_mu": "proximal_mu", "server_lr": "server_lr",
                 "trimmed_beta": "trimmed_beta", "krum_malicious": "krum_malicious",
                 "fedbn": "fedbn"},
    "personalize": {"method": "personalize", "epochs": "personalize_epochs"},
    "evaluation": {"format": "eval_format", "root": "eval_root",
                   "holdout_fraction": "eval_holdout_fraction", "seed": "eval_seed",
                   "uncertainty": "uncertainty", "uncertainty_samples": "uncertainty_samples"},
    "secagg": {"enabled": "secagg", "threshold": "secagg_threshold", "clip": "secagg_clip",
               "max_weight": "secagg_max_weight"},
    "screening": {"max_update_norm": "max_update_norm"},
    "dp": {"clip": "dp_clip", "epsilon": "dp_epsilon", "delta": "dp_delta"},
}


def custom_task_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """``task`` and ``task_json`` of a run for a custom task (a [task] table / task file)."""
    task = TaskConfig.from_dict(raw, source=source)
    return {"task": task.name, "task_json": json.dumps(task.to_dict())}


def infer_eval_format(root: str) -> str:
    """A held-out set's format from its path: a .npz is MedMNIST; a folder with images/
    and masks/ image-masks; one with images/ (and labels/) NIfTI; one of sub-folders
    without images/ class folders (images); anything else NIfTI."""
    if root.endswith(".npz"):
        return "medmnist"
    path = Path(root)
    if (path / "images").is_dir():
        return "image-masks" if (path / "masks").is_dir() else "nifti"
    if path.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                             for p in path.iterdir()):
        return "images"
    return "nifti"


def load_run_config(path: Path | None, flags: dict[str, Any]) -> RunConfig:
    """A run from an optional run.toml (nested sections, see RUN_TOML_SECTIONS; relative
    paths are taken from its folder) overridden by ``flags`` (RunConfig field -> value,
    only those given). Keys and types are checked here; the values by
    :meth:`RunConfig.validate` (the coordinator adds what it knows of the federation)."""
    values: dict[str, Any] = {}
    errs: list[FieldError] = []
    source = "run config"
    if path is not None:
        source = str(path)
        raw = read_toml(path)
        check_unknown(raw, set(RUN_TOML_SECTIONS) | {"task"}, "", errs)
        for name, keys in RUN_TOML_SECTIONS.items():
            sec = section(raw, name, errs)
            check_unknown(sec, set(keys), f"{name}.", errs)
            for key, fieldname in keys.items():
                if key in sec:
                    values[fieldname] = sec[key]
        if isinstance(raw.get("task"), dict):
            try:
                values |= custom_task_fields(raw["task"], f"{path} [task]")
            except ConfigError as err:
                errs.extend(err.errors)
        root = values.get("eval_root")
        if isinstance(root, str) and root and not Path(root).is_absolute():
            values["eval_root"] = str((path.parent / root).resolve())
        init = values.get("init_model")
        if isinstance(init, str) and init and (path.parent / init).exists():
            values["init_model"] = str((path.parent / init).resolve())
    if RESUME_FIELD in flags:
        errs.append(FieldError(RESUME_FIELD.replace("_", "-"), "no value here (a new run "
                               "starts at round 0)", repr(flags[RESUME_FIELD]),
                               "continue a stopped run with `fedpacs run resume RUN_DIR`"))
    values |= flags
    if values.get("eval_root") and not values.get("eval_format"):
        values["eval_format"] = infer_eval_format(str(values["eval_root"]))
    if errs:
        raise ConfigError(source, errs)
    return RunConfig.from_flat({k.replace("_", "-"): v for k, v in values.items()},
                               source=source, check=False)
