"""The training recipe inside the local loop (fedpacs.common.engine, .augment, .recipe):
losses and class weights, the balanced sampler, optimisers, weight decay, gradient
clipping, frozen features, seeded augmentation in 2D and 3D, evaluation-time uncertainty
(MC dropout, test-time flips), the learning-rate schedule, and the default recipe giving
the very weights of the loop it replaced. Real BreastMNIST images and hippocampus MRI."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpacs.common import engine
from fedpacs.common.augment import (
    AUGMENTATIONS,
    SPATIAL,
    AugmentedDataset,
    augment_sample,
    augmented,
    build_transform,
)
from fedpacs.common.datasets import DataSpec, load_partition
from fedpacs.common.engine import (
    TrainParams,
    balanced_weights,
    class_counts,
    class_weights,
    evaluate,
    evaluate_cases,
    has_dropout,
    make_loss,
    make_sampler,
    train,
)
from fedpacs.common.errors import ConfigError
from fedpacs.common.models import build_model
from fedpacs.common.nets.googlenet import training_loss
from fedpacs.common.recipe import DEFAULT_RECIPE, Recipe, round_lr
from fedpacs.common.tasks import TASK_PRESETS, TaskConfig

CPU = torch.device("cpu")
# AlexNet (it has dropout) and a 2D U-Net at width 8: real networks, cheap on two cores
CLS = dataclasses.replace(TASK_PRESETS["breastmnist"], network="alexnet", width=8)
SEG = dataclasses.replace(TASK_PRESETS["hippocampus"], network="unet", width=8,
                          spatial_dims=2, input_shape=(48, 64))
SEG3D = TASK_PRESETS["hippocampus"]


def model_for(task: TaskConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(task)


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Small networks on a shared 2-core machine: one torch thread avoids the stalls of
    two threads competing with other jobs (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- real data -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def breast(data_dir: Path) -> TensorDataset:
    """One site's BreastMNIST training split (91 images, about 27% malignant)."""
    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    return load_partition(DataSpec("medmnist", npz, num_partitions=6), CLS).train


@pytest.fixture(scope="module")
def breast_batch(breast: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = breast.tensors
    idx = torch.cat([torch.nonzero(y == 0)[:4, 0], torch.nonzero(y == 1)[:8, 0]])
    return x[idx], y[idx]  # 12 images, 4 malignant: imbalanced


@pytest.fixture(scope="module")
def hippo(data_dir: Path) -> TensorDataset:
    """Two or three hippocampus volumes (1, 48, 64, 48) with their masks."""
    root = data_dir / "msd_hippocampus_udacity"
    return load_partition(DataSpec("nifti", root, num_partitions=100), SEG3D).train


@pytest.fixture(scope="module")
def slices(hippo: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Four 48x64 slices through the hippocampus (two from each of two volumes)."""
    x, y = hippo.tensors
    x, y = x[:2, ..., 22:27:4], y[:2, ..., 22:27:4]
    x, y = x.permute(0, 4, 1, 2, 3).flatten(0, 1), y.permute(0, 4, 1, 2, 3).flatten(0, 1)
    assert set(y.unique().tolist()) == {0, 1, 2}
    return x, y


# -- the default recipe is the loop it replaced ---------------------------------------
def reference_train(model: nn.Module, data: TensorDataset, task: TaskConfig,
                    params: TrainParams, seed: int) -> float:
    """The training loop as it was before recipes (the independent answer)."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=params.batch_size, shuffle=True, generator=gen)
    model.train()
    loss_fn = (DiceCELoss(to_onehot_y=True, softmax=True) if task.kind == "segmentation"
               else nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=0.0)
    global_params = ([p.detach().clone() for p in model.parameters()]
                     if params.proximal_mu > 0 else [])
    total, count = 0.0, 0
    for _ in range(params.epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = training_loss(loss_fn, model(x), y)
            if global_params:
                prox = sum(((p - g) ** 2).sum() for p, g in
                           zip(model.parameters(), global_params, strict=True))
                loss = loss + 0.5 * params.proximal_mu * prox
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
    return total / count


@pytest.mark.parametrize("mu", [0.0, 0.1])
def test_default_recipe_gives_the_old_loops_weights(breast: TensorDataset, mu: float) -> None:
    data = TensorDataset(*(t[:24] for t in breast.tensors))
    params = TrainParams(epochs=2, batch_size=8, lr=1e-3, proximal_mu=mu)
    ref_model, new_model = model_for(CLS), model_for(CLS)
    torch.manual_seed(1)  # dropout draws from the global generator in both loops
    ref_loss = reference_train(ref_model, data, CLS, params, seed=5)
    torch.manual_seed(1)
    res = train(new_model, data, task=CLS, params=params, device=CPU, seed=5,
                amp=True, workers=2)  # both ignored on a CPU
    assert res.loss == ref_loss and res.num_examples == 24 and res.gpu_peak_mb == 0.0
    ref, new = weights_of(ref_model), weights_of(new_model)
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    assert not torch.equal(ref["features.0.weight"], weights_of(model_for(CLS))[
        "features.0.weight"])  # it did train


def test_default_segmentation_loss_is_dice_ce(slices: tuple[torch.Tensor, torch.Tensor]
                                              ) -> None:
    data = TensorDataset(*slices)
    params = TrainParams(epochs=1, batch_size=2, lr=3e-3)
    ref_model, new_model = model_for(SEG), model_for(SEG)
    ref_loss = reference_train(ref_model, data, SEG, params, seed=3)
    res = train(new_model, data, task=SEG, params=params, device=CPU, seed=3)
    assert res.loss == pytest.approx(ref_loss, rel=1e-6)
    ref, new = weights_of(ref_model), weights_of(new_model)
    assert all(torch.allclose(ref[k], new[k], rtol=1e-5, atol=1e-7) for k in ref)


# -- losses ----------------------------------------------------------------------------
def loss_after(task: TaskConfig, recipe: Recipe, x: torch.Tensor, y: torch.Tensor, *,
               steps: int, lr: float) -> tuple[float, float]:
    """The recipe's (weighted) loss on (x, y), eval mode, before and after ``steps``
    full-batch steps of engine.train."""
    model = model_for(task)
    data = TensorDataset(x, y)
    loss_fn = make_loss(task, recipe, class_weights(data, task, recipe))

    def value() -> float:
        with torch.no_grad():
            return float(loss_fn(model.eval()(x), y))

    before = value()
    train(model, data, task=task, device=CPU, recipe=recipe,
          params=TrainParams(epochs=steps, batch_size=len(x), lr=lr))
    return before, value()


@pytest.mark.parametrize("weights", ["none", "balanced"])
@pytest.mark.parametrize("loss", ["ce", "focal"])
def test_classification_losses_decrease(loss: str, weights: str,
                                        breast_batch: tuple[torch.Tensor, torch.Tensor]
                                        ) -> None:
    recipe = Recipe(loss=loss, class_weights=weights)
    before, after = loss_after(CLS, recipe, *breast_batch, steps=15, lr=3e-3)
    assert after < 0.8 * before


@pytest.mark.parametrize("weights", ["none", "balanced"])
@pytest.mark.parametrize("loss", ["dice", "dice-ce", "dice-focal"])
def test_segmentation_losses_decrease(loss: str, weights: str,
                                      slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    recipe = Recipe(loss=loss, class_weights=weights)
    before, after = loss_after(SEG, recipe, *slices, steps=10, lr=3e-3)
    assert after < 0.9 * before


def test_focal_with_gamma_zero_is_cross_entropy_and_gamma_discounts_easy_cases(
        breast_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = breast_batch
    with torch.no_grad():
        logits = model_for(CLS).eval()(x)
    ce = float(nn.functional.cross_entropy(logits, y))
    assert float(make_loss(CLS, Recipe(loss="focal", focal_gamma=0.0))(logits, y)) == \
        pytest.approx(ce, rel=1e-5)
    p = torch.softmax(logits, 1)[torch.arange(len(y)), y]
    expected = float((-(1 - p) ** 2 * torch.log(p)).mean())
    assert float(make_loss(CLS, Recipe(loss="focal"))(logits, y)) == \
        pytest.approx(expected, rel=1e-5)


def test_weights_go_to_the_voxel_term_only(slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = slices
    with torch.no_grad():
        logits = model_for(SEG).eval()(x)
    w = torch.tensor([0.1, 1.0, 2.0])
    dice = float(make_loss(SEG, Recipe(loss="dice"))(logits, y))
    ce = float(nn.functional.cross_entropy(logits, y[:, 0], weight=w))
    got = float(make_loss(SEG, Recipe(loss="dice-ce"), w)(logits, y))
    assert got == pytest.approx(dice + ce, rel=1e-5)
    plain = float(DiceCELoss(to_onehot_y=True, softmax=True)(logits, y))
    assert float(make_loss(SEG)(logits, y)) == pytest.approx(plain, rel=1e-6)


# -- class weights and the sampler -----------------------------------------------------
def test_balanced_class_weights_are_inverse_frequency(breast: TensorDataset,
                                                      hippo: TensorDataset) -> None:
    labels = breast.tensors[1].numpy()
    n0, n1 = int(np.sum(labels == 0)), int(np.sum(labels == 1))
    inv = np.array([1 / n0, 1 / n1])
    got = class_weights(breast, CLS, Recipe(class_weights="balanced"))
    assert got is not None
    np.testing.assert_allclose(got.numpy(), inv / inv.mean(), rtol=1e-6)
    assert float(got[0]) > 1 > float(got[1])  # malignant is the rarer class
    assert class_weights(breast, CLS, DEFAULT_RECIPE) is None
    # segmentation: voxels of each class over the whole training split
    vals, counts = np.unique(hippo.tensors[1].numpy(), return_counts=True)
    assert vals.tolist() == [0, 1, 2]
    inv = 1 / counts.astype(np.float64)
    np.testing.assert_array_equal(class_counts(hippo, SEG3D).numpy(), counts)
    got = class_weights(hippo, SEG3D, Recipe(class_weights="balanced"))
    assert got is not None
    np.testing.assert_allclose(got.numpy(), inv / inv.mean(), rtol=1e-6)
    # a class absent from the split gets weight 1, the others keep mean 1
    np.testing.assert_allclose(balanced_weights(torch.tensor([10, 0, 30])).numpy(),
                               [1.5, 1.0, 0.5])


def test_balanced_sampler_draws_each_class_equally(breast: TensorDataset) -> None:
    y = breast.tensors[1]
    assert 0.2 < float((y == 0).float().mean()) < 0.35  # imbalanced, ~27% malignant
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([y[list(make_sampler(breast, CLS, Recipe(sampler="balanced"), gen))]
                       for _ in range(4)])
    assert len(drawn) == 4 * len(breast)
    assert 0.42 < float((drawn == 0).float().mean()) < 0.58
    shuffled = y[list(make_sampler(breast, CLS, DEFAULT_RECIPE, gen))]
    assert torch.equal(shuffled.sort().values, y.sort().values)  # a permutation
    again = list(make_sampler(breast, CLS, Recipe(sampler="balanced"),
                              torch.Generator().manual_seed(0)))
    first = list(make_sampler(breast, CLS, Recipe(sampler="balanced"),
                              torch.Generator().manual_seed(0)))
    assert again == first  # seeded


class Recording(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A data set that notes the label of every sample the loop asks for."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        self.seen.append(int(y))
        return x, y


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_train_draws_batches_with_the_recipes_sampler(sampler: str,
                                                      breast: TensorDataset) -> None:
    data = Recording(breast)
    train(model_for(CLS), data, task=CLS, device=CPU, recipe=Recipe(sampler=sampler),
          params=TrainParams(epochs=2, batch_size=32, lr=1e-3))
    seen = np.array(data.seen[-2 * len(breast):])  # (a balanced sampler read them first)
    assert len(data.seen) == (3 if sampler == "balanced" else 2) * len(breast)
    rare = float(np.mean(seen == 0))
    if sampler == "shuffle":  # every image once per epoch
        assert rare == pytest.approx(float((breast.tensors[1] == 0).float().mean()))
    else:
        assert 0.38 < rare < 0.62


def test_train_augments_the_training_data_seeded(breast: TensorDataset) -> None:
    data = TensorDataset(*(t[:16] for t in breast.tensors))
    params = TrainParams(epochs=1, batch_size=8, lr=1e-3)
    out = {}
    for name, recipe, seed in (("aug", Recipe(augment="all"), 3),
                               ("again", Recipe(augment="all"), 3),
                               ("other-seed", Recipe(augment="all"), 4),
                               ("plain", DEFAULT_RECIPE, 3)):
        model = model_for(CLS)
        torch.manual_seed(0)
        train(model, data, task=CLS, device=CPU, seed=seed, recipe=recipe, params=params)
        out[name] = weights_of(model)["features.0.weight"]
    assert torch.equal(out["aug"], out["again"])
    assert not torch.equal(out["aug"], out["plain"])
    assert not torch.equal(out["aug"], out["other-seed"])


def test_recipe_that_does_not_fit_the_task_is_a_config_error(
        slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(ConfigError) as exc:
        train(model_for(SEG), TensorDataset(*slices), task=SEG, device=CPU,
              params=TrainParams(epochs=1, batch_size=2, lr=1e-3),
              recipe=Recipe(loss="ce", sampler="balanced"))
    msg = str(exc.value)
    assert "loss" in msg and "sampler" in msg


# -- optimisers, weight decay, clipping, frozen features ----------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_each_optimiser_reduces_the_loss(optimizer: str,
                                         breast_batch: tuple[torch.Tensor, torch.Tensor]
                                         ) -> None:
    """(Plain SGD on AlexNet, which has no batch norm, learns slowly: in 10 steps it
    reaches about the loss of the class prior, 0.64 from 0.69; Adam goes below 0.4.)"""
    lr = 0.1 if optimizer == "sgd" else 3e-3
    before, after = loss_after(CLS, Recipe(optimizer=optimizer, weight_decay=1e-4),
                               *breast_batch, steps=10, lr=lr)
    assert after < (0.95 if optimizer == "sgd" else 0.7) * before


class WithSpare(nn.Module):
    """A network plus a parameter whose gradient is exactly zero."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.spare = nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x) + 0.0 * self.spare.sum()
        return out


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_weight_decay_shrinks_weights_with_zero_gradient(
        optimizer: str, breast_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    data = TensorDataset(*breast_batch)
    params = TrainParams(epochs=2, batch_size=len(data), lr=0.01)
    norms = {}
    for wd in (0.0, 0.1):
        model = WithSpare(model_for(CLS))
        train(model, data, task=CLS, device=CPU, params=params,
              recipe=Recipe(optimizer=optimizer, weight_decay=wd))
        assert model.spare.grad is not None and not model.spare.grad.any()
        norms[wd] = float(model.spare.detach().norm())
    assert norms[0.0] == pytest.approx(math.sqrt(10))
    assert norms[0.1] < 0.999 * norms[0.0]


def test_gradient_clipping_bounds_the_update(breast_batch: tuple[torch.Tensor, torch.Tensor]
                                             ) -> None:
    """Plain SGD (no momentum), one step: the update is lr times the gradient, so with a
    clip its norm is lr * clip at most."""
    data = TensorDataset(*breast_batch)
    lr, clip = 0.1, 1e-3
    steps = {}
    for c in (0.0, clip):
        model = model_for(CLS)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train(model, data, task=CLS, device=CPU,
              params=TrainParams(epochs=1, batch_size=len(data), lr=lr),
              recipe=Recipe(optimizer="sgd", momentum=0.0, grad_clip=c))
        end = torch.cat([p.detach().flatten() for p in model.parameters()])
        steps[c] = float((end - start).norm())
    assert steps[clip] <= lr * clip * 1.001
    assert steps[clip] > 0.9 * lr * clip  # the gradient was larger: clipped to the bound
    assert steps[0.0] > 10 * lr * clip


def test_freeze_features_trains_the_head_only(monkeypatch: pytest.MonkeyPatch,
                                              breast_batch: tuple[torch.Tensor, torch.Tensor]
                                              ) -> None:
    """train() calls transfer.freeze_features(model, network) after model.train() (a
    stand-in freezes all but the last layer here) and restores the flags afterwards."""
    from fedpacs.common import transfer

    calls = []

    def fake_freeze(model: nn.Module, network: str) -> int:
        calls.append((network, model.training))
        head = list(model.parameters())[-2:]
        frozen = [p for p in model.parameters() if all(p is not h for h in head)]
        for p in frozen:
            p.requires_grad_(False)
        return len(frozen)

    monkeypatch.setattr(transfer, "freeze_features", fake_freeze)
    model = model_for(CLS)
    before = weights_of(model)
    train(model, TensorDataset(*breast_batch), task=CLS, device=CPU,
          params=TrainParams(epochs=2, batch_size=6, lr=1e-2), recipe=Recipe(freeze="features"))
    assert calls == [("alexnet", True)]
    after = weights_of(model)
    names = [k for k, _ in model.named_parameters()]
    assert all(torch.equal(before[k], after[k]) for k in names[:-2])
    assert not torch.equal(before[names[-1]], after[names[-1]])
    assert all(p.requires_grad for p in model.parameters())


# -- augmentation ----------------------------------------------------------------------
def test_augmentation_is_seeded_per_sample(breast: TensorDataset) -> None:
    aug = augmented(breast, CLS, Recipe(augment="all"), seed=7)
    assert isinstance(aug, AugmentedDataset) and len(aug) == len(breast)
    assert augmented(breast, CLS, DEFAULT_RECIPE, seed=7) is breast  # none: unchanged
    idx = [3, 0, 5, 1]
    first = [aug[i][0] for i in idx]
    again = [augmented(breast, CLS, Recipe(augment="all"), seed=7)[i][0]
             for i in reversed(idx)][::-1]  # another order (as workers may ask)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = [augmented(breast, CLS, Recipe(augment="all"), seed=8)[i][0] for i in idx]
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    epoch1 = [aug.at_epoch(1)[i][0] for i in idx]
    assert not all(torch.equal(a, b) for a, b in zip(first, epoch1, strict=True))
    assert all(aug[i][1] == breast[i][1] for i in idx)  # a class label is untouched
    same = TensorDataset(breast.tensors[0][:1].repeat(4, 1, 1, 1), breast.tensors[1][:4])
    copies = augmented(same, CLS, Recipe(augment="all"), seed=7)
    assert not torch.equal(copies[0][0], copies[1][0])  # each sample its own draw


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_changes_the_sample_in_2d_and_3d(
        name: str, breast: TensorDataset, hippo: TensorDataset) -> None:
    x, y = breast[0]
    t = build_transform(CLS, [name], prob=1.0)
    x2, y2 = augment_sample(t, x, y, segmentation=False, seed=1)
    assert x2.shape == x.shape and x2.dtype == x.dtype and not torch.equal(x2, x)
    assert torch.equal(y2, y)
    vx, vy = hippo[0]
    t = build_transform(SEG3D, [name], prob=1.0)
    vx2, vy2 = augment_sample(t, vx, vy, segmentation=True, seed=1)
    assert vx2.shape == vx.shape and not torch.equal(vx2, vx)
    assert vy2.shape == vy.shape and vy2.dtype == vy.dtype
    assert set(vy2.unique().tolist()) <= {0, 1, 2}
    if name in SPATIAL:
        assert not torch.equal(vy2, vy)
    else:
        assert torch.equal(vy2, vy)  # intensity: the mask stays as it is


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("dims", [2, 3])
def test_spatial_augmentations_move_image_and_mask_together(
        dims: int, slices: tuple[torch.Tensor, torch.Tensor], hippo: TensorDataset) -> None:
    """An image that is its own mask, through every spatial augmentation: the augmented
    image, thresholded, is the augmented mask (up to interpolation at the borders)."""
    task, mask = (SEG, slices[1][0]) if dims == 2 else (SEG3D, hippo[0][1])
    t = build_transform(task, SPATIAL, prob=1.0)
    for seed in range(2):
        img, lab = augment_sample(t, mask.float(), mask, segmentation=True, seed=seed)
        assert set(lab.unique().tolist()) <= {0, 1, 2}
        fg_img, fg_lab = img > 0.5, lab > 0
        assert dice(fg_img, fg_lab) > 0.8  # (about 0.9: the hippocampus is small)
        assert dice(fg_lab, mask > 0) < dice(fg_img, fg_lab) - 0.3  # and it did move
        assert float((torch.round(img).long() == lab).float().mean()) > 0.95


# -- uncertainty -----------------------------------------------------------------------
def test_has_dropout() -> None:
    assert has_dropout(build_model(CLS))
    assert not has_dropout(build_model(SEG))


def test_mc_dropout_is_positive_and_seeded(breast_batch: tuple[torch.Tensor, torch.Tensor]
                                           ) -> None:
    data = TensorDataset(*breast_batch)
    model = model_for(CLS)
    recipe = Recipe(uncertainty="mc-dropout", uncertainty_samples=4)
    plain = evaluate(model, data, task=CLS, device=CPU)
    assert "uncertainty-mean" not in plain
    a = evaluate(model, data, task=CLS, device=CPU, recipe=recipe, seed=1)
    b = evaluate(model, data, task=CLS, device=CPU, recipe=recipe, seed=1)
    c = evaluate(model, data, task=CLS, device=CPU, recipe=recipe, seed=2)
    assert a == b and a != c
    assert 0 < a["uncertainty-mean"] <= math.log(2)
    assert not any(m.training for m in model.modules())  # dropout back off
    cases = evaluate_cases(model, data, task=CLS, device=CPU, recipe=recipe, seed=1)
    assert [c.index for c in cases] == list(range(len(data)))
    assert np.mean([c.uncertainty for c in cases]) == pytest.approx(a["uncertainty-mean"])
    assert np.mean([c.value for c in cases]) == pytest.approx(a["accuracy"])
    assert all(c.metric == "correct" and c.probability is not None
               and 0 <= c.probability <= 1 for c in cases)
    # MC samples differ: the mean prediction is not the deterministic one
    det = evaluate_cases(model, data, task=CLS, device=CPU, recipe=DEFAULT_RECIPE)
    assert [c.probability for c in det] != [c.probability for c in cases]


def test_mc_dropout_without_dropout_is_a_config_error(
        slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(ConfigError, match="uncertainty"):
        evaluate(model_for(SEG), TensorDataset(*slices), task=SEG, device=CPU,
                 recipe=Recipe(uncertainty="mc-dropout"))


def test_tta_on_a_segmenter(slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    data = TensorDataset(*slices)
    model = model_for(SEG)
    train(model, data, task=SEG, device=CPU, params=TrainParams(epochs=3, batch_size=4,
                                                                  lr=3e-3))
    recipe = Recipe(uncertainty="tta")  # 2D: 4 flips
    cases = evaluate_cases(model, data, task=SEG, device=CPU, recipe=recipe)
    assert len(cases) == len(data)
    assert all(0 < c.uncertainty <= math.log(3) for c in cases)
    assert all(c.metric == "dice-mean" and 0 <= c.value <= 1 and c.probability is None
               for c in cases)
    out = evaluate(model, data, task=SEG, device=CPU, recipe=recipe)
    assert out["uncertainty-mean"] == pytest.approx(np.mean([c.uncertainty for c in cases]))
    assert out["loss"] != evaluate(model, data, task=SEG, device=CPU)["loss"]
    # flipped back: a model that is the identity on one-hot input sees no disagreement
    onehot = nn.functional.one_hot(slices[1][:, 0], 3).permute(0, 3, 1, 2).float() * 20
    ident = TensorDataset(onehot, slices[1])
    certain = evaluate_cases(nn.Identity(), ident, task=dataclasses.replace(
        SEG, in_channels=3), device=CPU, recipe=recipe)
    assert all(c.uncertainty < 1e-6 and c.value == 1.0 for c in certain)


def test_flip_sets() -> None:
    assert engine.flip_sets(2, 8) == [(), (0,), (1,), (0, 1)]
    assert engine.flip_sets(3, 8)[-1] == (0, 1, 2) and len(engine.flip_sets(3, 5)) == 5


# -- learning-rate schedule ------------------------------------------------------------
def test_round_lr_warmup_cosine_and_step() -> None:
    warm = Recipe(lr_schedule="constant", warmup_rounds=3)
    assert [round_lr(1.0, r, 10, warm) for r in (1, 2, 3, 4, 10)] == \
        pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    cos = Recipe(lr_schedule="cosine", warmup_rounds=1)
    lrs = [round_lr(1.0, r, 40, cos) for r in range(1, 41)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[-1] < 0.01 * lrs[1]  # close to 0 at the last round
    assert lrs[20] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 39)))
    assert round_lr(1.0, 45, 40, cos) == lrs[-1]  # past the end: no rebound
    step = Recipe(lr_schedule="step")
    assert [round_lr(1.0, r, 8, step) for r in range(1, 9)] == \
        pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
