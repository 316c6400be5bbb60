"""Model registry: every network a federated run can use, built by name from a task:
MONAI's networks, and the seed papers' networks that MONAI lacks (fedpacs.common.nets).

Server and sites call :func:`build_model` with the same :class:`TaskConfig` and seed,
so the global model and every local model share keys, shapes and initial weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedpacs.common.errors import ConfigError, FieldError, did_you_mean
from fedpacs.common.nets import alexnet, fcn, googlenet, pspnet, segnet, vgg

if TYPE_CHECKING:
    from fedpacs.common.tasks import TaskConfig


@dataclass(frozen=True)
class ModelSpec:
    """A registered network: its task kind, dimensionality, MONAI class and arguments.

    ``target`` and ``kwargs`` are the one definition of the network: :func:`build_model`
    instantiates them, and a MONAI bundle export writes them as ``network_def``.
    """

    kind: str
    spatial_dims: tuple[int, ...]
    target: str
    kwargs: Callable[[TaskConfig], dict[str, Any]]
    summary: str

    def network_def(self, task: TaskConfig) -> dict[str, Any]:
        return {"_target_": self.target, **self.kwargs(task)}

    def build(self, task: TaskConfig) -> nn.Module:
        module_name, _, cls_name = self.target.rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        return cls(**self.kwargs(task))


def _resnet(layers: list[int]) -> Callable[[TaskConfig], dict[str, Any]]:
    def kwargs(task: TaskConfig) -> dict[str, Any]:
        w = task.width
        return {"block": "basic", "layers": layers, "block_inplanes": [w, 2 * w, 4 * w, 8 * w],
                "spatial_dims": task.spatial_dims, "n_input_channels": task.in_channels,
                "conv1_t_size": 3, "conv1_t_stride": 1,
                "no_max_pool": min(task.input_shape) < 64, "num_classes": task.num_classes}

    return kwargs


def _densenet121(task: TaskConfig) -> dict[str, Any]:
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "out_channels": task.num_classes, "init_features": 2 * task.width,
            "growth_rate": task.width, "small_input": min(task.input_shape) < 64}


def _unet(task: TaskConfig) -> dict[str, Any]:
    w = task.width
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "out_channels": task.num_classes, "channels": [w, 2 * w, 4 * w, 8 * w],
            "strides": [2, 2, 2], "num_res_units": 0, "norm": "INSTANCE"}


def _vnet(task: TaskConfig) -> dict[str, Any]:
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "out_channels": task.num_classes, "dropout_prob_down": 0.0,
            "dropout_prob_up": (0.0, 0.0)}


def _segresnet(task: TaskConfig) -> dict[str, Any]:
    if task.width % 8:  # its group norms have 8 groups
        raise ConfigError("task", [FieldError(
            "task.width", "a multiple of 8 for segresnet (its group norms have 8 groups)",
            str(task.width), "set width to 8, 16, 32 ...")])
    return {"spatial_dims": task.spatial_dims, "in_channels": task.in_channels,
            "out_channels": task.num_classes, "init_filters": task.width}


def _resunet(task: TaskConfig) -> dict[str, Any]:
    """The registry's U-Net levels with two residual units per level (Kerfoot 2018)."""
    if any(s % 8 for s in task.input_shape):  # three stride-2 levels, concatenated back
        raise ConfigError("task", [FieldError(
            "task.input_shape", "sides that are multiples of 8 for resunet",
            repr(list(task.input_shape)), "pad the input to multiples of 8 or use segnet, "
            "fcn8s or pspnet, which take any size")])
    return _unet(task) | {"num_res_units": 2}


NETS = "monai.networks.nets"
OWN = "fedpacs.common.nets"
MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec("classification", (2, 3), f"{NETS}.ResNet", _resnet([2, 2, 2, 2]),
                          "ResNet-18 (He 2016), MONAI implementation"),
    "resnet34": ModelSpec("classification", (2, 3), f"{NETS}.ResNet", _resnet([3, 4, 6, 3]),
                          "ResNet-34 (He 2016), MONAI implementation"),
    "densenet121": ModelSpec("classification", (2, 3), f"{OWN}.densenet.DenseNet121",
                             _densenet121, "DenseNet-121 (Huang 2017), MONAI implementation; "
                             "a stride-1 stem below 64 pixels per side"),
    "unet": ModelSpec("segmentation", (2, 3), f"{NETS}.UNet", _unet,
                      "U-Net (Ronneberger 2015) / 3D U-Net (Cicek 2016), MONAI UNet"),
    "vnet": ModelSpec("segmentation", (3,), f"{NETS}.VNet", _vnet,
                      "V-Net (Milletari 2016); input sides must be multiples of 16"),
    "segresnet": ModelSpec("segmentation", (2, 3), f"{NETS}.SegResNet", _segresnet,
                           "SegResNet (Myronenko 2018), MONAI implementation"),
    # the seed papers' networks (fedpacs.common.nets; width 64 is the published width)
    "alexnet": ModelSpec("classification", (2, 3), f"{OWN}.alexnet.AlexNet",
                         alexnet.task_kwargs, "AlexNet (Krizhevsky 2012), torchvision layout"),
    "vgg16": ModelSpec("classification", (2, 3), f"{OWN}.vgg.VGG16", vgg.task_kwargs,
                       "VGG-16 (Simonyan 2015), configuration D, no batch norm"),
    "googlenet": ModelSpec("classification", (2, 3), f"{OWN}.googlenet.GoogLeNet",
                           googlenet.task_kwargs, "GoogLeNet / Inception v1 (Szegedy 2015) "
                           "with its two auxiliary classifiers in training"),
    "fcn8s": ModelSpec("segmentation", (2, 3), f"{OWN}.fcn.FCN8s", fcn.task_kwargs,
                       "FCN-8s (Long 2015): VGG-16 encoder, pool3/pool4 skip fusion"),
    "segnet": ModelSpec("segmentation", (2, 3), f"{OWN}.segnet.SegNet", segnet.task_kwargs,
                        "SegNet (Badrinarayanan 2017): decoder unpools with the pooling indices"),
    "pspnet": ModelSpec("segmentation", (2, 3), f"{OWN}.pspnet.PSPNet", pspnet.task_kwargs,
                        "PSPNet (Zhao 2017): dilated ResNet-18-like backbone, pyramid pooling"),
    "resunet": ModelSpec("segmentation", (2, 3), f"{NETS}.UNet", _resunet,
                         "Residual U-Net (Kerfoot 2018), MONAI UNet with 2 residual units; "
                         "input sides must be multiples of 8"),
}


def unknown_network(field: str, name: str) -> FieldError:
    """The error for a network name that is not in the registry: the choices, and the
    nearest one when the name looks misspelt."""
    return FieldError(field, f"one of {', '.join(sorted(MODELS))}", repr(name),
                      "pick a registered network" + did_you_mean(name, sorted(MODELS)))


def build_model(task: TaskConfig, *, seed: int = 0) -> nn.Module:
    """Build the task's network with deterministic initial weights for ``seed``."""
    spec = MODELS.get(task.network)
    if spec is None:
        raise ConfigError("task", [unknown_network("task.network", task.network)])
    if spec.kind != task.kind or task.spatial_dims not in spec.spatial_dims:
        raise ConfigError("task", [FieldError(
            "task.network", f"a {task.kind} network for {task.spatial_dims}D input",
            f"{task.network!r} ({spec.kind}, {spec.spatial_dims}D)",
            "pick a network that matches the task")])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(task)


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of normalisation layers (weights, biases, running statistics): the
    entries FedBN keeps local to each site."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys.update(f"{prefix}.{k}" if prefix else k for k in module.state_dict())
    return keys


def norm_state_count(task: TaskConfig) -> int:
    """How many state-dict entries FedBN would keep local for ``task``'s network (built
    on the meta device: no memory, no weights). 0 for a network whose normalisation has
    no learned state: MONAI's instance norm without affine parameters (``unet``,
    ``resunet``) or no normalisation layers at all (``alexnet``, ``vgg16``, ``fcn8s``)."""
    with torch.device("meta"):
        return len(norm_state_keys(build_model(task)))


def learned_norm_networks(task: TaskConfig) -> list[str]:
    """The registered networks for ``task``'s kind and dimensionality whose
    normalisation layers have learned state (what FedBN can keep local), sorted."""
    from fedpacs.common.tasks import TaskConfig as Task

    out = []
    for name, spec in sorted(MODELS.items()):
        if spec.kind != task.kind or task.spatial_dims not in spec.spatial_dims:
            continue
        try:
            if norm_state_count(Task.from_dict(task.to_dict() | {"network": name})) > 0:
                out.append(name)
        except (ConfigError, ValueError):  # the task's shape or width does not fit it
            continue
    return out


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as is."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
