"""Typed task definitions: what is learned, by which network, on what input.

A task is the contract between server and sites: both build the network from the same
:class:`TaskConfig`, so their weights always have the same keys and shapes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedpacs.common.errors import ConfigError, FieldError

TaskKind = Literal["classification", "segmentation"]
TASK_KINDS: tuple[str, ...] = ("classification", "segmentation")
# Upper bounds on what a task may ask of a site's memory (a run's task travels from the
# coordinator: a site builds no network beyond these).
MAX_SIDE = 1024
MAX_VOXELS = 2**24
MAX_CHANNELS = 64
MAX_CLASSES = 1000
MAX_WIDTH = 256
# Input preprocessing a task may name (fedpacs.common.preprocess implements them; the same
# steps run at a site's training and evaluation, on the server's held-out cases and in an
# exported MONAI bundle): CLAHE, the adaptive contrast enhancement of breast ultrasound,
# Macenko stain normalisation of H&E images.
PREPROCESS_STEPS: tuple[str, ...] = ("clahe", "ace", "macenko")
# How samples are drawn from a case: "fit" centre-crops/pads (3D) or resizes (2D) each case
# to ``input_shape``; "patches" keeps each case at its native (or ``spacing``-resampled)
# size, trains on random ``input_shape`` patches weighted toward foreground and evaluates
# whole cases by sliding-window inference (segmentation only).
SAMPLINGS: tuple[str, ...] = ("fit", "patches")
MAX_SPACING_MM = 100.0


@dataclass(frozen=True)
class TaskConfig:
    """What a federated run learns.

    ``num_classes`` counts background for segmentation (hippocampus: 3 = bg, anterior,
    posterior). ``input_shape`` is the spatial size every sample is padded/cropped to.
    """

    name: str
    kind: TaskKind
    network: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    input_shape: tuple[int, ...]
    width: int = 16
    class_names: tuple[str, ...] = field(default_factory=tuple)
    # (see PREPROCESS_STEPS, SAMPLINGS) applied in this order to every image of the task
    preprocess: tuple[str, ...] = field(default_factory=tuple)
    sampling: str = "fit"
    # target voxel spacing in mm, one per spatial axis in the order of input_shape; () keeps
    # each case's own spacing (a site's [data] spacing still applies to its PACS volumes)
    spacing: tuple[float, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["class_names"] = list(self.class_names)
        d["preprocess"] = list(self.preprocess)
        d["spacing"] = list(self.spacing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "task") -> TaskConfig:
        errors = validate_task_dict(d, source_prefix="")
        if errors:
            raise ConfigError(source, errors)
        return cls(
            name=str(d["name"]),
            kind=d["kind"],
            network=str(d["network"]),
            spatial_dims=int(d["spatial_dims"]),
            in_channels=int(d["in_channels"]),
            num_classes=int(d["num_classes"]),
            input_shape=tuple(int(s) for s in d["input_shape"]),
            width=int(d.get("width", 16)),
            class_names=tuple(str(c) for c in d.get("class_names", ())),
            preprocess=tuple(str(x) for x in d.get("preprocess", ())),
            sampling=str(d.get("sampling", "fit")),
            spacing=tuple(float(x) for x in d.get("spacing", ())),
        )


def validate_task_dict(d: dict[str, Any], *, source_prefix: str) -> list[FieldError]:
    """Check a task mapping; returns every problem found (empty when valid)."""
    p = source_prefix
    errs: list[FieldError] = []
    for key in ("name", "kind", "network", "spatial_dims", "in_channels", "num_classes",
                "input_shape"):
        if key not in d:
            errs.append(FieldError(f"{p}{key}", "a value", "nothing", f"add `{key} = ...`"))
    if errs:
        return errs
    if d["kind"] not in TASK_KINDS:
        errs.append(FieldError(f"{p}kind", f"one of {', '.join(TASK_KINDS)}", repr(d["kind"]),
                               "set kind to classification or segmentation"))
    if d["spatial_dims"] not in (2, 3):
        errs.append(FieldError(f"{p}spatial_dims", "2 or 3", repr(d["spatial_dims"]),
                               "use 2 for slices/X-rays, 3 for volumes"))
    shape = d["input_shape"]
    if not isinstance(shape, list | tuple) or len(shape) != d["spatial_dims"] or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_SIDE for s in shape
    ) or math.prod(shape) > MAX_VOXELS:
        errs.append(FieldError(f"{p}input_shape", f"{d['spatial_dims']} integers in "
                               f"1..{MAX_SIDE}, at most {MAX_VOXELS} voxels in all",
                               repr(shape), "e.g. input_shape = [48, 64, 48]"))
    for key, lo, hi in (("in_channels", 1, MAX_CHANNELS), ("num_classes", 2, MAX_CLASSES),
                        ("width", 1, MAX_WIDTH)):
        v = d.get(key, 16)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            errs.append(FieldError(f"{p}{key}", f"an integer in {lo}..{hi}", repr(v),
                                   f"set {key} to the number of channels/classes/features"))
    steps = d.get("preprocess", [])
    if not isinstance(steps, list | tuple) or not all(
            isinstance(x, str) and x in PREPROCESS_STEPS for x in steps) or \
            len(set(steps)) != len(steps):
        errs.append(FieldError(f"{p}preprocess", "a list of distinct steps out of "
                               f"{', '.join(PREPROCESS_STEPS)}", repr(steps),
                               'e.g. preprocess = ["clahe"], or leave it out'))
    elif "macenko" in steps and d.get("in_channels") != 3:  # stain normalisation needs RGB
        errs.append(FieldError(f"{p}preprocess", '"macenko" only for RGB images (in_channels '
                               '= 3)', f'"macenko" with in_channels = {d.get("in_channels")!r}',
                               'set in_channels = 3 for colour H&E images, or drop "macenko"'))
    if d.get("sampling", "fit") not in SAMPLINGS:
        errs.append(FieldError(f"{p}sampling", f"one of {', '.join(SAMPLINGS)}",
                               repr(d.get("sampling")), 'set sampling = "fit" or "patches"'))
    elif d.get("sampling") == "patches" and d["kind"] != "segmentation":
        errs.append(FieldError(f"{p}sampling", '"fit" for a classification task',
                               '"patches"', "patch sampling needs a mask to weight patches "
                               'by and to stitch: use sampling = "fit"'))
    spacing = d.get("spacing", [])
    if not isinstance(spacing, list | tuple) or (spacing and (
            len(spacing) != d["spatial_dims"] or not all(
                isinstance(x, int | float) and not isinstance(x, bool)
                and 0 < x <= MAX_SPACING_MM for x in spacing))):
        errs.append(FieldError(f"{p}spacing", f"{d['spatial_dims']} numbers in mm "
                               f"(0..{MAX_SPACING_MM:g}], one per axis of input_shape, or "
                               "nothing", repr(spacing), "e.g. spacing = [1.0, 1.0, 1.0]"))
    # the network must exist and fit the task kind
    from fedpacs.common.models import MODELS, unknown_network

    spec = MODELS.get(str(d["network"]))
    if spec is None:
        errs.append(unknown_network(f"{p}network", str(d["network"])))
    elif d["kind"] in TASK_KINDS and spec.kind != d["kind"]:
        errs.append(FieldError(f"{p}network", f"a {d['kind']} network", f"{d['network']!r} "
                               f"(a {spec.kind} network)", "pick a network of the task's kind"))
    elif d["spatial_dims"] not in spec.spatial_dims:
        errs.append(FieldError(f"{p}network", f"a network that supports {d['spatial_dims']}D",
                               f"{d['network']!r} ({'/'.join(map(str, spec.spatial_dims))}D "
                               "only)", "pick another network or change spatial_dims"))
    return errs


# Presets for the real data sets that ship in ../shared/data.
TASK_PRESETS: dict[str, TaskConfig] = {
    "hippocampus": TaskConfig(
        name="hippocampus", kind="segmentation", network="unet", spatial_dims=3,
        in_channels=1, num_classes=3, input_shape=(48, 64, 48), width=16,
        class_names=("background", "anterior", "posterior"),
    ),
    # the same MSD hippocampus volumes read as 2D axial slices (fedpacs.common.datasets:
    # each case's slices along its third voxel axis, split by case like the volumes)
    "hippocampus-slices": TaskConfig(
        name="hippocampus-slices", kind="segmentation", network="unet", spatial_dims=2,
        in_channels=1, num_classes=3, input_shape=(48, 64), width=16,
        class_names=("background", "anterior", "posterior"),
    ),
    "breastmnist": TaskConfig(
        name="breastmnist", kind="classification", network="resnet18", spatial_dims=2,
        in_channels=1, num_classes=2, input_shape=(28, 28), width=16,
        class_names=("malignant", "normal/benign"),
    ),
    "pneumoniamnist": TaskConfig(
        name="pneumoniamnist", kind="classification", network="resnet18", spatial_dims=2,
        in_channels=1, num_classes=2, input_shape=(28, 28), width=16,
        class_names=("normal", "pneumonia"),
    ),
    "adrenalmnist3d": TaskConfig(
        name="adrenalmnist3d", kind="classification", network="resnet18", spatial_dims=3,
        in_channels=1, num_classes=2, input_shape=(28, 28, 28), width=16,
        class_names=("normal", "hyperplasia"),
    ),
    # slices of series ingested from a site's PACS, labelled by a CSV manifest (0=MR, 1=CT)
    "pacs-modality": TaskConfig(
        name="pacs-modality", kind="classification", network="resnet18", spatial_dims=2,
        in_channels=1, num_classes=2, input_shape=(64, 64), width=8, class_names=("MR", "CT"),
    ),
}


@dataclass(frozen=True)
class Training:
    """A task's default local-training recipe; a run may override each field."""

    local_epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3


# The one place training defaults live: per preset, and for custom tasks.
DEFAULT_TRAINING = Training()
PRESET_TRAINING: dict[str, Training] = {
    "hippocampus": Training(local_epochs=2, batch_size=4, lr=3e-3),
    "hippocampus-slices": Training(local_epochs=1, batch_size=16, lr=3e-3),
    "breastmnist": Training(local_epochs=2, batch_size=32, lr=1e-3),
    "pneumoniamnist": Training(local_epochs=1, batch_size=32, lr=1e-3),
    "adrenalmnist3d": Training(local_epochs=2, batch_size=16, lr=1e-3),
    "pacs-modality": Training(local_epochs=2, batch_size=8, lr=1e-3),
}


def training_defaults(task: str) -> Training:
    """The preset's training defaults (a custom task gets DEFAULT_TRAINING)."""
    return PRESET_TRAINING.get(task, DEFAULT_TRAINING)


def task_with_network(name: str, network: str = "") -> TaskConfig:
    """A preset, optionally with another registered network of the same kind."""
    task = get_task(name)
    if not network or network == task.network:
        return task
    return TaskConfig.from_dict(task.to_dict() | {"network": network}, source="run config")


def get_task(name: str, *, field_name: str = "task") -> TaskConfig:
    """A preset by name, or a ConfigError listing the presets."""
    try:
        return TASK_PRESETS[name]
    except KeyError:
        raise ConfigError(field_name, [FieldError(
            field_name, f"one of {', '.join(sorted(TASK_PRESETS))}", repr(name),
            "choose a task preset",
        )]) from None
