"""Local training and evaluation loops shared by sites (train + evaluate) and the server
(evaluation of the global model on a held-out split).

A run's :class:`~fedpacs.common.recipe.Recipe` says how: the loss and its class weights,
the sampler, the optimiser, gradient clipping, frozen feature layers, training-split
augmentation (:mod:`fedpacs.common.augment`) and evaluation-time uncertainty. The default
recipe is the loop this module always ran (Adam, shuffled batches, Dice+CE or CE).

What the site's machine spends stays the caller's choice: on CUDA, ``amp`` (float16
autocast with a gradient scaler) and ``workers`` (DataLoader processes, pinned memory);
on a CPU both are ignored.

A task sampling "patches" (:mod:`fedpacs.common.patches`) trains on random
``input_shape`` patches, drawn afresh each epoch from the call's seed, and is evaluated on
whole cases, one per batch, by sliding-window inference (:func:`sliding_logits`: windows
of ``input_shape`` overlapping by :data:`SW_OVERLAP` of their size, blended with Gaussian
weights, so a voxel near a window's edge counts less than one at its centre); the metrics
are those of the whole case, as "fit" reports them for the fitted sample.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    TensorDataset,
    WeightedRandomSampler,
)

from fedpacs.common import metrics, transfer
from fedpacs.common.augment import AugmentedDataset, augmented
from fedpacs.common.errors import ConfigError
from fedpacs.common.nets.googlenet import training_loss
from fedpacs.common.patches import CaseDataset, PatchDataset
from fedpacs.common.recipe import DEFAULT_RECIPE, Recipe
from fedpacs.common.tasks import TaskConfig

MIB = 2**20
# Sliding-window evaluation ("patches"): windows overlap by a quarter of their size (MONAI's
# default; nnU-Net's 0.5 costs ~2.4x the windows in 3D for a small gain), Gaussian blended
SW_OVERLAP = 0.25
SW_BATCH = 2  # windows per forward pass


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of one local training call (a run's values come from its
    RoundInstructions; their defaults live with the task presets). ``lr`` is the round's
    rate, already scheduled by the server (:func:`fedpacs.common.recipe.round_lr`); the
    rest of the recipe (weight decay included) is a :class:`Recipe`."""

    epochs: int
    batch_size: int
    lr: float
    proximal_mu: float = 0.0  # FedProx term; 0 disables it


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    seconds: float
    gpu_peak_mb: float = 0.0  # CUDA only: peak memory allocated during the call, MiB


@dataclass(frozen=True)
class CaseResult:
    """One evaluated case: its index in the data set, its metric, and the model's
    uncertainty about it (see :func:`evaluate_cases`)."""

    index: int
    metric: str  # "dice-mean" (segmentation) or "correct" (classification, 0 or 1)
    value: float
    uncertainty: float  # predictive entropy, nats, in [0, log(num_classes)]
    probability: float | None = None  # classification: the true class's probability


# --------------------------------------------------------------------------- class balance
def labels_of(data: Dataset) -> torch.Tensor:
    """Every label of ``data`` in one tensor (N,) or (N, 1, *spatial): a TensorDataset's
    label tensor as it is, an augmented set's un-augmented labels, any other data set
    read sample by sample."""
    if isinstance(data, AugmentedDataset):
        return labels_of(data.base)
    if isinstance(data, TensorDataset):
        return data.tensors[1]
    n = len(data)  # type: ignore[arg-type]
    return torch.stack([torch.as_tensor(data[i][1]) for i in range(n)])


def class_counts(data: Dataset, task: TaskConfig) -> torch.Tensor:
    """How often each class occurs in ``data`` (int64, length num_classes): labels for
    classification, voxels for segmentation (of whole cases for streamed data)."""
    if isinstance(data, PatchDataset | CaseDataset):
        return data.class_counts(task.num_classes)
    labels = labels_of(data).reshape(-1).long()
    return torch.bincount(labels, minlength=task.num_classes)[: task.num_classes]


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse class frequency, normalised to mean 1 over the classes present; a class
    absent from the counts gets weight 1 (it cannot contribute to the loss anyway).

    w_c = (1 / n_c) / mean_{k: n_k > 0}(1 / n_k)"""
    counts = counts.to(torch.float64)
    present = counts > 0
    w = torch.ones_like(counts)
    if present.any():
        inv = 1.0 / counts[present]
        w[present] = inv / inv.mean()
    return w.to(torch.float32)


def class_weights(data: Dataset, task: TaskConfig, recipe: Recipe) -> torch.Tensor | None:
    """The loss's class weights for ``recipe`` from the site's training split, or None."""
    if recipe.class_weights != "balanced":
        return None
    return balanced_weights(class_counts(data, task))


def make_sampler(data: Dataset, task: TaskConfig, recipe: Recipe,
                 generator: torch.Generator) -> Sampler[int]:
    """Shuffled batches (the default), or ``balanced``: each class drawn equally often,
    with replacement, len(data) samples per epoch."""
    n = len(data)  # type: ignore[arg-type]
    if recipe.sampler != "balanced":
        return RandomSampler(data, generator=generator)  # type: ignore[arg-type]
    labels = labels_of(data).reshape(n, -1)[:, 0].long()
    counts = torch.bincount(labels, minlength=task.num_classes).to(torch.float64)
    per_sample = 1.0 / counts[labels]
    return WeightedRandomSampler(per_sample.tolist(), num_samples=n, replacement=True,
                                 generator=generator)


# --------------------------------------------------------------------------- losses
class SoftmaxFocalLoss(nn.Module):
    """Focal loss of softmax probabilities (Lin et al. 2017), per sample (classification)
    or per voxel (segmentation): -w_y (1 - p_y)^gamma log p_y, summed over classes and
    averaged over samples/voxels; with gamma 0 and no weights it is the cross-entropy."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.focal = MonaiFocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma,
                                    weight=weight, reduction="none")

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = y[:, None] if y.dim() == logits.dim() - 1 else y  # (B,) -> (B, 1)
        return self.focal(logits, target).sum(dim=1).mean()


class VoxelCrossEntropy(nn.Module):
    """Cross-entropy of logits (B, C, *spatial) against a label map (B, 1, *spatial)."""

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, y[:, 0].long())


class DicePlus(nn.Module):
    """Soft Dice of the softmax against the one-hot mask (Milletari 2016; the mean over
    classes of each image's Dice loss, which weighs classes equally by construction), plus
    an optional voxel-wise term: cross-entropy (dice-ce, MONAI DiceCELoss's sum) or focal
    (dice-focal). Class weights go to the voxel-wise term only."""

    def __init__(self, voxel: nn.Module | None = None) -> None:
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True)
        self.voxel = voxel

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.dice(logits, y)
        return loss if self.voxel is None else loss + self.voxel(logits, y)


def make_loss(task: TaskConfig, recipe: Recipe = DEFAULT_RECIPE,
              weights: torch.Tensor | None = None) -> nn.Module:
    """The loss ``recipe`` names for ``task`` (auto: Dice + cross-entropy for
    segmentation, cross-entropy for classification); ``weights`` (one per class) weigh
    the cross-entropy or focal part."""
    name = recipe.loss_for(task.kind)
    gamma = recipe.focal_gamma
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weights)
    if name == "focal":
        return SoftmaxFocalLoss(gamma, weights)
    if name == "dice":
        return DicePlus()
    if name == "dice-ce":
        return DicePlus(VoxelCrossEntropy(weights))
    if name == "dice-focal":
        return DicePlus(SoftmaxFocalLoss(gamma, weights))
    raise ConfigError("recipe", recipe.validate(task.kind))


# --------------------------------------------------------------------------- optimiser
def make_optimizer(params: Sequence[nn.Parameter], recipe: Recipe, lr: float
                   ) -> torch.optim.Optimizer:
    """Adam (default), AdamW or SGD with momentum over ``params``, all with the recipe's
    weight decay (Adam: L2 in the gradient; AdamW: decoupled)."""
    wd = recipe.weight_decay
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=wd,
                               nesterov=False)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def _check(recipe: Recipe, task: TaskConfig, *, has_dropout: bool | None = None) -> None:
    errs = recipe.validate(task.kind, has_dropout=has_dropout)
    if errs:
        raise ConfigError("recipe", errs)


# --------------------------------------------------------------------------- training
def train(model: nn.Module, data: Dataset, *, task: TaskConfig, params: TrainParams,
          device: torch.device, seed: int = 0, recipe: Recipe = DEFAULT_RECIPE,
          amp: bool = False, workers: int = 0) -> TrainResult:
    """Train ``model`` in place on ``data`` (the site's training split) for
    ``params.epochs`` epochs as ``recipe`` says; batches, augmentation and dropout are
    seeded by ``seed``. With ``recipe.freeze == "features"`` only the head trains (the
    parameters' requires_grad flags are restored when the call returns)."""
    _check(recipe, task)
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        return TrainResult(loss=math.nan, num_examples=0, seconds=0.0)
    cuda = device.type == "cuda"
    use_amp = amp and cuda
    num_workers = workers if cuda else 0
    gen = torch.Generator().manual_seed(seed)
    sampler = make_sampler(data, task, recipe, gen)
    weights = class_weights(data, task, recipe)
    train_data = augmented(data, task, recipe, seed)

    def loader(epoch: int) -> DataLoader:
        if isinstance(data, PatchDataset):  # this call's patches of the epoch, augmented
            ds = augmented(data.drawn(seed=seed, epoch=epoch), task, recipe, seed,
                           epoch=epoch)
        else:
            ds = train_data.at_epoch(epoch) if isinstance(train_data, AugmentedDataset) \
                else train_data
        return DataLoader(ds, batch_size=params.batch_size, sampler=sampler, generator=gen,
                          num_workers=num_workers, pin_memory=num_workers > 0)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device).train()
    flags = [p.requires_grad for p in model.parameters()]
    if recipe.freeze == "features":  # after train(): it puts frozen norm layers in eval
        transfer.freeze_features(model, task.network)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_fn = make_loss(task, recipe, weights).to(device)
    opt = make_optimizer(trainable, recipe, params.lr)
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    global_params = [p.detach().clone() for p in trainable] if params.proximal_mu > 0 else []
    t0 = time.perf_counter()
    total, count = 0.0, 0
    try:
        for epoch in range(params.epochs):
            for x, y in loader(epoch):
                x = x.to(device, non_blocking=num_workers > 0)
                y = y.to(device, non_blocking=num_workers > 0)
                opt.zero_grad(set_to_none=True)
                with (torch.autocast("cuda", dtype=torch.float16) if use_amp
                      else contextlib.nullcontext()):
                    loss = training_loss(loss_fn, model(x), y)  # + auxiliary heads' losses
                if use_amp:
                    loss = loss.float()
                if global_params:
                    prox = sum(((p - g) ** 2).sum() for p, g in
                               zip(trainable, global_params, strict=True))
                    loss = loss + 0.5 * params.proximal_mu * prox
                _step(loss, opt, trainable, recipe.grad_clip, scaler)
                total += float(loss.detach()) * len(x)
                count += len(x)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    peak = torch.cuda.max_memory_allocated(device) / MIB if cuda else 0.0
    return TrainResult(loss=total / max(count, 1), num_examples=n,
                       seconds=time.perf_counter() - t0, gpu_peak_mb=peak)


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[nn.Parameter],
          clip: float, scaler: torch.amp.GradScaler | None) -> None:
    """Backward and one optimiser step; gradients clipped to L2 norm ``clip`` (> 0),
    unscaled first under AMP."""
    if scaler is None:
        loss.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return
    scaler.scale(loss).backward()
    if clip > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt)
    scaler.update()


# --------------------------------------------------------------------------- uncertainty
def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` has a dropout layer that drops anything (p > 0): MC dropout
    needs one."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
               for m in model.modules())


def flip_sets(spatial_dims: int, n: int) -> list[tuple[int, ...]]:
    """The test-time flips: the identity, then each spatial axis, then pairs of axes, ...
    (every combination; at most ``n`` of them)."""
    axes = range(spatial_dims)
    combos = [c for k in range(spatial_dims + 1) for c in itertools.combinations(axes, k)]
    return combos[:n]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy (nats) over the class axis 1 of probabilities (B, C, ...)."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)


def _forward(model: nn.Module, x: torch.Tensor, task: TaskConfig, recipe: Recipe
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, probabilities) of one batch. With an uncertainty method the probabilities
    are the mean over its samples and the logits their log (softmax of them gives the mean
    back, so the loss and metrics are those of the mean prediction)."""
    if recipe.uncertainty == "none":
        logits = model(x)
        return logits, torch.softmax(logits, dim=1)
    if recipe.uncertainty == "mc-dropout":
        probs = torch.stack([torch.softmax(model(x), dim=1)
                             for _ in range(recipe.uncertainty_samples)]).mean(dim=0)
    else:  # tta
        flips = flip_sets(task.spatial_dims, recipe.uncertainty_samples)
        summed: torch.Tensor | None = None
        for axes in flips:
            dims = [2 + a for a in axes]
            p = torch.softmax(model(x.flip(dims) if dims else x), dim=1)
            if dims and task.kind == "segmentation":
                p = p.flip(dims)  # back onto the input's grid
            summed = p if summed is None else summed + p
        assert summed is not None  # flip_sets always holds the identity
        probs = summed / len(flips)
    return torch.log(probs.clamp_min(1e-12)), probs


def sliding_logits(model: nn.Module, x: torch.Tensor, roi: tuple[int, ...], *,
                   overlap: float = SW_OVERLAP) -> torch.Tensor:
    """Logits of whole cases ``x`` (B, C, *spatial) from windows of ``roi`` (padded where a
    case is smaller), overlapping by ``overlap`` and blended with Gaussian weights."""
    out = sliding_window_inference(x, roi_size=roi, sw_batch_size=SW_BATCH, predictor=model,
                                   overlap=overlap, mode="gaussian")
    assert isinstance(out, torch.Tensor)  # (one tensor in, one out)
    return out.as_tensor() if hasattr(out, "as_tensor") else out


class SlidingWindow(nn.Module):
    """``model`` applied to whole cases by :func:`sliding_logits` (its dropout layers are
    the model's, so MC dropout and flips work through it unchanged)."""

    def __init__(self, model: nn.Module, roi: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.roi = roi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sliding_logits(self.model, x, self.roi)


def whole_cases(task: TaskConfig) -> bool:
    """Whether ``task`` is evaluated on whole cases by sliding window ("patches")."""
    return task.sampling == "patches" and task.kind == "segmentation"


@dataclass(frozen=True)
class _Batch:
    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor


def _batches(model: nn.Module, data: Dataset, task: TaskConfig, device: torch.device,
             recipe: Recipe, seed: int, batch_size: int) -> Iterator[_Batch]:
    """Predictions batch by batch, in data order; MC dropout seeded by ``seed``."""
    _check(recipe, task, has_dropout=has_dropout(model) if recipe.uncertainty
           == "mc-dropout" else None)
    model.to(device).eval()
    mc = recipe.uncertainty == "mc-dropout"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    predictor: nn.Module = model
    if whole_cases(task):  # cases differ in size: one per batch
        predictor, batch_size = SlidingWindow(model, task.input_shape), 1
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if mc:
                torch.manual_seed(seed)
                for m in model.modules():
                    if isinstance(m, nn.modules.dropout._DropoutNd):
                        m.train()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits, probs = _forward(predictor, x, task, recipe)
                yield _Batch(x, y, logits, probs)
    finally:
        model.eval()


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, task: TaskConfig, device: torch.device,
             batch_size: int = 8, recipe: Recipe = DEFAULT_RECIPE, seed: int = 0
             ) -> dict[str, float]:
    """Loss and the task's clinical metrics of ``model`` on ``data`` (flat name -> float).

    The loss is the recipe's, unweighted. With ``recipe.uncertainty`` (mc-dropout or tta)
    the metrics are those of the mean prediction over its samples, and
    ``uncertainty-mean`` is the mean over cases of each case's predictive entropy (see
    :func:`evaluate_cases`)."""
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        return {"loss": math.nan}
    loss_fn = make_loss(task, recipe).to(device)
    total, unc = 0.0, 0.0
    dices: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for b in _batches(model, data, task, device, recipe, seed, batch_size):
        total += float(loss_fn(b.logits, b.y)) * len(b.x)
        unc += float(_case_entropy(b.probs).sum())
        if task.kind == "segmentation":
            pred = torch.argmax(b.probs, dim=1, keepdim=True)
            dices.append(metrics.dice_per_class(pred.cpu(), b.y.cpu(), task.num_classes)
                         * len(b.x))
        else:
            probs.append(b.probs.cpu().numpy())
            labels.append(b.y.cpu().numpy())
    out: dict[str, float]
    if task.kind == "segmentation":
        per_class = np.sum(dices, axis=0) / n
        out = {"loss": total / n, "dice-mean": float(np.nanmean(per_class))}
        names = task.class_names[1:] or tuple(f"class{i}" for i in range(1, task.num_classes))
        for name, d in zip(names, per_class, strict=True):
            out[f"dice-{name}"] = float(d)
        out["iou-mean"] = metrics.iou_from_dice(out["dice-mean"])
    else:
        p, lab = np.concatenate(probs), np.concatenate(labels)
        out = {"loss": total / n, "accuracy": metrics.accuracy(p, lab),
               "auc": metrics.auc(p, lab)}
        if task.num_classes == 2:
            out["sensitivity"], out["specificity"] = metrics.sensitivity_specificity(p, lab)
    if recipe.uncertainty != "none":
        out["uncertainty-mean"] = unc / n
    return out


def _case_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Each case's uncertainty (B,): the entropy of its (mean) class probabilities, for
    segmentation averaged over its voxels."""
    h = entropy(probs)
    return h.flatten(1).mean(dim=1) if h.dim() > 1 else h


@torch.no_grad()
def evaluate_cases(model: nn.Module, data: Dataset, *, task: TaskConfig,
                   device: torch.device, recipe: Recipe, seed: int = 0, batch_size: int = 8
                   ) -> list[CaseResult]:
    """One :class:`CaseResult` per case of ``data``, in order, for per-case reports.

    The prediction is the mean over ``recipe.uncertainty``'s samples (MC dropout: that
    many forward passes with dropout on; tta: flips of the input) or, with ``none``, the
    single deterministic one. Its uncertainty is the predictive entropy H(p) =
    -sum_c p_c log p_c of the mean class probabilities p, in nats, in [0, log(C)]: of the
    case for classification, averaged over the case's voxels for segmentation. The metric
    is the case's Dice averaged over the foreground classes (segmentation) or whether the
    top class is right (classification, with the true class's probability)."""
    out: list[CaseResult] = []
    for b in _batches(model, data, task, device, recipe, seed, batch_size):
        unc = _case_entropy(b.probs).cpu()
        if task.kind == "segmentation":
            pred = torch.argmax(b.probs, dim=1, keepdim=True).cpu()
            y = b.y.cpu()
            for i in range(len(b.x)):
                dice = metrics.dice_per_class(pred[i:i + 1], y[i:i + 1], task.num_classes)
                out.append(CaseResult(len(out), "dice-mean", float(np.nanmean(dice)),
                                      float(unc[i])))
            continue
        p = b.probs.cpu()
        y = b.y.cpu().long()
        for i in range(len(b.x)):
            correct = float(int(torch.argmax(p[i])) == int(y[i]))
            out.append(CaseResult(len(out), "correct", correct, float(unc[i]),
                                  probability=float(p[i, y[i]])))
    return out
