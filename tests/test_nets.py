"""The seed papers' networks (fedpacs.common.nets) in the model registry: shapes in 2D and
3D at the presets' input sizes, the published parameter counts, learning on real
images, and each paper's defining mechanism (pooling indices, pyramid bins, auxiliary
classifiers and their loss)."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedpacs.common.datasets import DataSpec, load_partition
from fedpacs.common.engine import TrainParams, make_loss, train
from fedpacs.common.errors import ConfigError
from fedpacs.common.models import MODELS, build_model
from fedpacs.common.nets import layers
from fedpacs.common.nets.googlenet import GoogLeNet, GoogLeNetOutputs, training_loss
from fedpacs.common.nets.pspnet import PSPNet
from fedpacs.common.nets.segnet import SegNet
from fedpacs.common.tasks import TASK_PRESETS, TaskConfig

CLASSIFIERS = ("alexnet", "vgg16", "googlenet")  # the seed papers' own (fedpacs.common.nets)
SEGMENTERS = ("fcn8s", "segnet", "pspnet", "resunet")
# every registered network, MONAI's too: shapes and learning are shown for each
ALL_CLASSIFIERS = tuple(n for n, s in MODELS.items() if s.kind == "classification")
SEGMENTERS_2D = tuple(n for n, s in MODELS.items()
                      if s.kind == "segmentation" and 2 in s.spatial_dims)
SEGMENTERS_3D = tuple(n for n, s in MODELS.items()
                      if s.kind == "segmentation" and 3 in s.spatial_dims)
TINY = 4  # width of the shape tests


def classifier_task(network: str, shape: tuple[int, ...], *, width: int = TINY) -> TaskConfig:
    return TaskConfig(name="t", kind="classification", network=network,
                      spatial_dims=len(shape), in_channels=1, num_classes=2,
                      input_shape=shape, width=width)


def segmenter_task(network: str, shape: tuple[int, ...], *, width: int = TINY) -> TaskConfig:
    return dataclasses.replace(TASK_PRESETS["hippocampus"], network=network,
                               spatial_dims=len(shape), input_shape=shape, width=width)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout off, so a training-mode loss is a function of the weights alone."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


# -- shapes ----------------------------------------------------------------------------
# breastmnist/pneumoniamnist 28x28, pacs-modality 64x64, adrenalmnist3d 28^3 (and 64^3)
@pytest.mark.parametrize("shape", [(28, 28), (64, 64), (28, 28, 28), (64, 64, 64)])
@pytest.mark.parametrize("network", ALL_CLASSIFIERS)
def test_classifier_output_shapes(network: str, shape: tuple[int, ...]) -> None:
    model = build_model(classifier_task(network, shape))
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 2)
        out = model.train()(x)
    main = out.main if isinstance(out, GoogLeNetOutputs) else out
    assert main.shape == (2, 2)


# hippocampus: the 48x64x48 volumes and their 48x64 slices
@pytest.mark.parametrize(("network", "shape"), [(n, (48, 64)) for n in SEGMENTERS_2D]
                         + [(n, (48, 64, 48)) for n in SEGMENTERS_3D])
def test_segmenter_output_shapes(network: str, shape: tuple[int, ...]) -> None:
    width = 8 if network == "segresnet" else TINY  # (its group norms have 8 groups)
    model = build_model(segmenter_task(network, shape, width=width)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, *shape)).shape == (2, 3, *shape)


@pytest.mark.parametrize("network", ["fcn8s", "segnet", "pspnet"])
def test_segmenters_keep_odd_sizes(network: str) -> None:
    """Padding to the stride (FCN-8s, SegNet) or interpolation (PSPNet) gives back the
    input's size exactly, for sizes no power of two divides."""
    model = build_model(segmenter_task(network, (28, 37))).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 37)).shape == (1, 3, 28, 37)


def test_fcn8s_with_fixed_bilinear_upsampling() -> None:
    spec = MODELS["fcn8s"]
    task = segmenter_task("fcn8s", (24, 40))
    model = spec.build(task)
    cls = type(model)
    interp = cls(**(spec.kwargs(task) | {"upsample": "interp"})).eval()
    assert n_params(interp) < n_params(model)  # no transposed convolutions
    with torch.no_grad():
        assert interp(torch.randn(1, 1, 24, 40)).shape == (1, 3, 24, 40)


@pytest.mark.parametrize("dims", [2, 3])
def test_bilinear_kernel_upsamples_a_constant_to_a_constant(dims: int) -> None:
    up = layers.conv_transpose(dims)(2, 2, 4, stride=2, padding=1, bias=False)
    with torch.no_grad():
        up.weight.copy_(layers.bilinear_kernel(2, 4, dims))
        out = up(torch.ones(1, 2, *(4,) * dims))
    inner = out[(slice(None), slice(None), *(slice(1, -1),) * dims)]
    assert out.shape[2:] == (8,) * dims and torch.allclose(inner, torch.ones_like(inner))


# -- published parameter counts (built on the meta device: no memory, no init time) ---
IMAGENET = {"name": "imagenet", "kind": "classification", "spatial_dims": 2,
            "in_channels": 3, "num_classes": 1000, "input_shape": (224, 224), "width": 64}


@pytest.mark.parametrize(("network", "count"), [
    ("alexnet", 61_100_840), ("vgg16", 138_357_544),
    ("googlenet", 13_004_888),  # with its two auxiliary classifiers, as registered
    ("densenet121", 7_978_856),  # width 32: 64 initial features, growth 32
])
def test_published_parameter_counts(network: str, count: int) -> None:
    width = {"densenet121": 32}.get(network, 64)
    with torch.device("meta"):
        model = build_model(TaskConfig(network=network, **(IMAGENET | {"width": width})))
    assert n_params(model) == count


def test_googlenet_without_auxiliary_heads_has_the_published_count() -> None:
    with torch.device("meta"):
        assert n_params(GoogLeNet(aux_logits=False)) == 6_624_904


# -- learning on real images ---------------------------------------------------------
@pytest.fixture(scope="module")
def breast_batch(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    site = load_partition(DataSpec("medmnist", npz, num_partitions=60),
                          TASK_PRESETS["breastmnist"])
    x, y = site.train.tensors
    assert set(y[:8].tolist()) == {0, 1}
    return x[:8], y[:8]


@pytest.fixture(scope="module")
def hippocampus_slices(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Six 48x64 slices (three from each of two volumes) across the hippocampus."""
    root = data_dir / "msd_hippocampus_udacity"
    site = load_partition(DataSpec("nifti", root, num_partitions=100),
                          TASK_PRESETS["hippocampus"])
    x, y = site.train.tensors
    x, y = x[:2, ..., 20:29:4], y[:2, ..., 20:29:4]  # (2, 1, 48, 64, 3)
    x, y = x.permute(0, 4, 1, 2, 3).flatten(0, 1), y.permute(0, 4, 1, 2, 3).flatten(0, 1)
    assert set(y.unique().tolist()) == {0, 1, 2}
    return x, y


def loss_drops(model: nn.Module, task: TaskConfig, x: torch.Tensor, y: torch.Tensor, *,
               steps: int, lr: float) -> tuple[float, float]:
    """Training-mode loss on (x, y) before and after ``steps`` Adam steps on it."""
    torch.manual_seed(0)
    no_dropout(model).train()
    loss_fn = make_loss(task)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        before = float(training_loss(loss_fn, model(x), y))
    for _ in range(steps):
        opt.zero_grad()
        training_loss(loss_fn, model(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = float(training_loss(loss_fn, model(x), y))
    return before, after


@pytest.mark.parametrize("network", ALL_CLASSIFIERS)
def test_classifiers_learn_breastmnist(network: str,
                                       breast_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    task = dataclasses.replace(TASK_PRESETS["breastmnist"], network=network, width=8)
    before, after = loss_drops(build_model(task), task, *breast_batch, steps=8, lr=1e-3)
    assert after < 0.9 * before


@pytest.mark.parametrize("network", SEGMENTERS_2D)
def test_segmenters_learn_hippocampus_slices(
        network: str, hippocampus_slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    task = segmenter_task(network, (48, 64), width=8)
    before, after = loss_drops(build_model(task), task, *hippocampus_slices, steps=8, lr=3e-3)
    assert after < 0.9 * before


@pytest.mark.parametrize("network", ["vnet"])
def test_3d_only_segmenters_learn_a_hippocampus_volume(network: str, data_dir: Path) -> None:
    """V-Net is 3D only: a 32^3 crop (its sides multiples of 16) of a real volume, with the
    pure Dice loss of its paper."""
    from fedpacs.common.recipe import Recipe

    assert set(SEGMENTERS_3D) - set(SEGMENTERS_2D) == {network}
    site = load_partition(DataSpec("nifti", data_dir / "msd_hippocampus_udacity",
                                   num_partitions=100), TASK_PRESETS["hippocampus"])
    x, y = site.train.tensors
    x, y = x[:1, :, 8:40, 16:48, 8:40], y[:1, :, 8:40, 16:48, 8:40]
    assert set(y.unique().tolist()) == {0, 1, 2}
    task = segmenter_task(network, (32, 32, 32))
    model = build_model(task).train()
    loss_fn = make_loss(task, Recipe(loss="dice"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.95 * losses[0], losses


# -- each paper's mechanism ------------------------------------------------------------
def test_segnet_decoder_unpools_with_the_encoders_pooling_indices() -> None:
    model = build_model(segmenter_task("segnet", (32, 32))).eval()
    assert isinstance(model, SegNet)
    assert any(isinstance(m, nn.MaxUnpool2d) for m in model.modules())
    pooled: list[torch.Tensor] = []
    unpooled: list[torch.Tensor] = []
    model.pool.register_forward_hook(lambda m, i, o: pooled.append(o[1]))
    model.unpool.register_forward_hook(lambda m, i, o: unpooled.append(i[1]))
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 32))
    assert len(pooled) == len(unpooled) == 5
    # the deepest pooling's indices are the first the decoder uses, and so on
    assert all(u is p for u, p in zip(unpooled, reversed(pooled), strict=True))


def test_segnet_3d_unpools_in_3d() -> None:
    model = build_model(segmenter_task("segnet", (16, 16, 16)))
    assert isinstance(model.unpool, nn.MaxUnpool3d)


def test_pspnet_pyramid_has_the_four_bins() -> None:
    for dims, pool_cls in ((2, nn.AdaptiveAvgPool2d), (3, nn.AdaptiveAvgPool3d)):
        model = build_model(segmenter_task("pspnet", (16,) * dims))
        assert isinstance(model, PSPNet) and model.ppm.bins == (1, 2, 3, 6)
        pools = [m for m in model.ppm.modules() if isinstance(m, pool_cls)]
        assert [p.output_size for p in pools] == [1, 2, 3, 6]
        backbone_dilations = {m.dilation for m in model.backbone.modules()
                              if isinstance(m, nn.Conv2d | nn.Conv3d)}
        assert {(2,) * dims, (4,) * dims} <= backbone_dilations


def test_googlenet_auxiliary_outputs_only_in_training_with_aux() -> None:
    task = classifier_task("googlenet", (28, 28))
    model = build_model(task)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = model.train()(x)
        assert isinstance(out, GoogLeNetOutputs)
        assert out.main.shape == out.aux1.shape == out.aux2.shape == (2, 2)
        assert isinstance(model.eval()(x), torch.Tensor)
        plain = GoogLeNet(in_channels=1, num_classes=2, width=TINY, stem_stride=1,
                          aux_logits=False)
        assert isinstance(plain.train()(x), torch.Tensor)


def test_training_step_adds_the_auxiliary_losses() -> None:
    """engine.train's loss for GoogLeNet is main + 0.3 * (aux1 + aux2) (lr 0: the loss it
    reports is the one of the weights it started from)."""
    task = classifier_task("googlenet", (28, 28))
    model = no_dropout(build_model(task))
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 1, 0])
    ce = nn.CrossEntropyLoss()
    with torch.no_grad():
        out = model.train()(x)
        assert isinstance(out, GoogLeNetOutputs)
        main = float(ce(out.main, y))
        expected = main + 0.3 * (float(ce(out.aux1, y)) + float(ce(out.aux2, y)))
    result = train(model, TensorDataset(x, y), task=task, device=torch.device("cpu"),
                   params=TrainParams(epochs=1, batch_size=4, lr=0.0))
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert abs(result.loss - main) > 1e-3


# -- registry --------------------------------------------------------------------------
def test_misspelt_network_suggests_the_nearest_and_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as exc:
        build_model(classifier_task("alexnt", (28, 28)))
    msg = str(exc.value)
    assert "task.network" in msg and "did you mean 'alexnet'?" in msg
    assert all(name in msg for name in MODELS)


def test_new_networks_are_registered_with_a_paper_summary() -> None:
    years = {"alexnet": "2012", "vgg16": "2015", "googlenet": "2015", "fcn8s": "2015",
             "segnet": "2017", "pspnet": "2017", "resunet": "2018"}
    for name, year in years.items():
        spec = MODELS[name]
        assert spec.kind == ("classification" if name in CLASSIFIERS else "segmentation")
        assert spec.spatial_dims == (2, 3) and year in spec.summary


@pytest.mark.parametrize("network", CLASSIFIERS + SEGMENTERS)
def test_network_def_is_json_and_rebuilds_the_network(network: str) -> None:
    """A MONAI bundle's network_def (target + JSON arguments) rebuilds the same weights."""
    task = (classifier_task(network, (28, 28)) if network in CLASSIFIERS
            else segmenter_task(network, (48, 64)))
    spec = MODELS[network]
    definition = json.loads(json.dumps(spec.network_def(task)))
    module, _, cls = definition.pop("_target_").rpartition(".")
    rebuilt = getattr(importlib.import_module(module), cls)(**definition)
    model = build_model(task)
    assert type(rebuilt) is type(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("network", "shape", "minimum"), [
    ("alexnet", (16, 16), "at least 21"), ("googlenet", (7, 7), "at least 8"),
    ("resunet", (28, 28), "multiples of 8"), ("segresnet", (32, 32), "multiple of 8"),
])
def test_inputs_too_small_or_odd_are_config_errors(network: str, shape: tuple[int, ...],
                                                   minimum: str) -> None:
    task = (classifier_task(network, shape) if network in CLASSIFIERS
            else segmenter_task(network, shape))
    with pytest.raises(ConfigError) as exc:
        build_model(task)
    field = "task.width" if network == "segresnet" else "task.input_shape"
    assert field in str(exc.value) and minimum in str(exc.value)


def test_googlenet_and_vgg_take_tiny_inputs() -> None:
    for network in ("vgg16", "googlenet"):
        model = build_model(classifier_task(network, (8, 8))).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 1, 8, 8)).shape == (1, 2)


def test_pool_out_matches_torch() -> None:
    for side in range(1, 12):
        for k, stride, pad, ceil in ((3, 2, 0, True), (3, 2, 0, False), (2, 2, 0, True),
                                     (11, 4, 2, False), (3, 2, 1, False)):
            pool = nn.MaxPool1d(k, stride, padding=pad, ceil_mode=ceil)
            try:
                got = pool(torch.zeros(1, 1, side)).shape[-1]
            except RuntimeError:  # "output size is too small"
                got = 0
            assert layers.pool_out(side, k, stride, pad, ceil=ceil) == got, (side, k, ceil)
