"""Metrics clinicians read, computed with monai.metrics.

Array core: each function takes arrays/tensors for one batch or one data set and returns
plain floats, so server and sites report identical numbers for identical predictions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import DiceMetric, compute_roc_auc
from monai.networks.utils import one_hot


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of each foreground class, averaged over the batch (NaN where a class is absent
    from both prediction and ground truth in every sample).

    ``pred`` and ``target`` are label maps of shape (B, 1, *spatial) with values in
    [0, num_classes). Returns an array of length num_classes - 1 (background excluded).
    """
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    p = one_hot(pred.long(), num_classes=num_classes)
    t = one_hot(target.long(), num_classes=num_classes)
    per_sample = metric(p, t)  # (B, C-1)
    assert isinstance(per_sample, torch.Tensor)
    values = per_sample.detach().cpu().numpy().astype(np.float64)
    # monai gives 1.0 when both are empty with ignore_empty=False: keep that convention
    return np.nanmean(values, axis=0) if values.size else np.full(num_classes - 1, np.nan)


def iou_from_dice(dice: float) -> float:
    """Jaccard index from Dice for the same overlap: J = D / (2 - D)."""
    return dice / (2.0 - dice) if not math.isnan(dice) else math.nan


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of class probabilities (N, C) against integer labels (N,)."""
    if len(labels) == 0:
        return math.nan
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC: binary uses the positive-class probability; multi-class is the macro
    one-vs-rest average. NaN when only one class is present, and when any probability is
    not finite (a diverged model: ranking NaN scores would give a meaningless AUC, 1.0)."""
    num_classes = probs.shape[1]
    if len(np.unique(labels)) < 2 or not np.all(np.isfinite(probs)):
        return math.nan
    y_pred = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    if num_classes == 2:
        return float(compute_roc_auc(y_pred[:, 1], y))  # type: ignore[arg-type]
    y_onehot = torch.nn.functional.one_hot(y, num_classes=num_classes)
    return float(compute_roc_auc(y_pred, y_onehot, average="macro"))  # type: ignore[arg-type]


def sensitivity_specificity(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Binary sensitivity (recall of class 1) and specificity (recall of class 0)."""
    pred = np.argmax(probs, axis=1)
    tp = float(np.sum((pred == 1) & (labels == 1)))
    fn = float(np.sum((pred == 0) & (labels == 1)))
    tn = float(np.sum((pred == 0) & (labels == 0)))
    fp = float(np.sum((pred == 1) & (labels == 0)))
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return sens, spec
