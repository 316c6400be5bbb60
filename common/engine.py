"""Local training and evaluation loops shared by sites (train + evaluate) and the server
(evaluation of the global model on a held-out split)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedpacs.common import metrics
from fedpacs.common.nets.googlenet import training_loss
from fedpacs.common.tasks import TaskConfig


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of one local training call (a run's values come from its
    RoundInstructions; their defaults live with the task presets)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx term; 0 disables it


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    seconds: float


def make_loss(task: TaskConfig) -> nn.Module:
    """Dice + cross-entropy for segmentation, cross-entropy for classification."""
    if task.kind == "segmentation":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    return nn.CrossEntropyLoss()


def train(model: nn.Module, data: Dataset, *, task: TaskConfig, params: TrainParams,
          device: torch.device, seed: int = 0) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``params.epochs`` epochs."""
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        return TrainResult(loss=math.nan, num_examples=0, seconds=0.0)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=params.batch_size, shuffle=True, generator=gen)
    model.to(device).train()
    loss_fn = make_loss(task)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    global_params = ([p.detach().clone() for p in model.parameters()]
                     if params.proximal_mu > 0 else [])
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for _ in range(params.epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = training_loss(loss_fn, model(x), y)  # + auxiliary heads' losses
            if global_params:
                prox = sum(((p - g) ** 2).sum() for p, g in
                           zip(model.parameters(), global_params, strict=True))
                loss = loss + 0.5 * params.proximal_mu * prox
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
    return TrainResult(loss=total / max(count, 1), num_examples=n,
                       seconds=time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, task: TaskConfig, device: torch.device,
             batch_size: int = 8) -> dict[str, float]:
    """Loss and the task's clinical metrics of ``model`` on ``data`` (flat name -> float)."""
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        return {"loss": math.nan}
    model.to(device).eval()
    loss_fn = make_loss(task)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    total = 0.0
    if task.kind == "segmentation":
        dices = []
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += float(loss_fn(logits, y)) * len(x)
            pred = torch.argmax(logits, dim=1, keepdim=True)
            dices.append(metrics.dice_per_class(pred.cpu(), y.cpu(), task.num_classes) * len(x))
        per_class = np.sum(dices, axis=0) / n
        out = {"loss": total / n, "dice-mean": float(np.nanmean(per_class))}
        names = task.class_names[1:] or tuple(f"class{i}" for i in range(1, task.num_classes))
        for name, d in zip(names, per_class, strict=True):
            out[f"dice-{name}"] = float(d)
        out["iou-mean"] = metrics.iou_from_dice(out["dice-mean"])
        return out
    probs, labels = [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total += float(loss_fn(logits, y)) * len(x)
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
    p, lab = np.concatenate(probs), np.concatenate(labels)
    out = {"loss": total / n, "accuracy": metrics.accuracy(p, lab), "auc": metrics.auc(p, lab)}
    if task.num_classes == 2:
        out["sensitivity"], out["specificity"] = metrics.sensitivity_specificity(p, lab)
    return out
