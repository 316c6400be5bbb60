from __future__ import annotations

import pytest
import torch

from fedpacs.common.errors import ConfigError
from fedpacs.common.models import MODELS, build_model, pick_device
from fedpacs.common.tasks import TASK_PRESETS, TaskConfig


@pytest.mark.parametrize("name", ["hippocampus", "breastmnist", "adrenalmnist3d"])
def test_presets_build_and_forward(name: str) -> None:
    task = TASK_PRESETS[name]
    model = build_model(task).eval()
    x = torch.zeros(2, task.in_channels, *task.input_shape)
    with torch.no_grad():
        y = model(x)
    if task.kind == "segmentation":
        assert y.shape == (2, task.num_classes, *task.input_shape)
    else:
        assert y.shape == (2, task.num_classes)


def test_unet_2d_and_3d() -> None:
    for dims, shape in ((2, (32, 32)), (3, (16, 16, 16))):
        task = TaskConfig(name="t", kind="segmentation", network="unet", spatial_dims=dims,
                          in_channels=1, num_classes=2, input_shape=shape, width=4)
        with torch.no_grad():
            assert build_model(task)(torch.zeros(1, 1, *shape)).shape == (1, 2, *shape)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    task = TASK_PRESETS["breastmnist"]
    a, b, c = build_model(task, seed=1), build_model(task, seed=1), build_model(task, seed=2)
    key = next(k for k, v in a.state_dict().items() if v.is_floating_point() and v.ndim > 1)
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_wrong_network_for_kind_is_a_config_error() -> None:
    d = TASK_PRESETS["hippocampus"].to_dict() | {"network": "resnet18"}
    with pytest.raises(ConfigError) as exc:
        TaskConfig.from_dict(d)
    assert "network" in str(exc.value) and "segmentation" in str(exc.value)


def test_unknown_network_lists_registry() -> None:
    d = TASK_PRESETS["hippocampus"].to_dict() | {"network": "unet9000"}
    with pytest.raises(ConfigError) as exc:
        TaskConfig.from_dict(d)
    for name in MODELS:
        assert name in str(exc.value)


def test_pick_device_cpu_here() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu").type == "cpu"
