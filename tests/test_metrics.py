"""Metrics against answers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpacs.common import metrics


def test_dice_per_class_hand_computed() -> None:
    # one 2x4 image; class 1: target {0,1,2}, pred {1,2,3} -> 2*2/(3+3) = 2/3
    #                 class 2: target {4,5},   pred {4}     -> 2*1/(2+1) = 2/3
    target = torch.tensor([[1, 1, 1, 0], [2, 2, 0, 0]]).reshape(1, 1, 2, 4)
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]]).reshape(1, 1, 2, 4)
    d = metrics.dice_per_class(pred, target, num_classes=3)
    assert d == pytest.approx([2 / 3, 2 / 3])


def test_dice_averages_over_batch() -> None:
    # sample 1 perfect for class 1 (1.0), sample 2 no overlap (0.0) -> mean 0.5
    t = torch.tensor([[1, 0], [1, 0]]).reshape(2, 1, 1, 2)
    p = torch.tensor([[1, 0], [0, 1]]).reshape(2, 1, 1, 2)
    assert metrics.dice_per_class(p, t, num_classes=2) == pytest.approx([0.5])


def test_iou_from_dice() -> None:
    assert metrics.iou_from_dice(2 / 3) == pytest.approx(0.5)  # D=2/3 <-> J=1/2
    assert math.isnan(metrics.iou_from_dice(math.nan))


def test_accuracy_auc_sensitivity_specificity() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - scores, scores], axis=1)
    labels = np.array([0, 0, 1, 1])
    # predictions at 0.5: [0,0,0,1] -> 3/4 correct
    assert metrics.accuracy(probs, labels) == pytest.approx(0.75)
    # positive/negative pairs: (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert metrics.auc(probs, labels) == pytest.approx(0.75)
    sens, spec = metrics.sensitivity_specificity(probs, labels)
    assert sens == pytest.approx(0.5) and spec == pytest.approx(1.0)


def test_auc_is_nan_with_one_class() -> None:
    probs = np.array([[0.3, 0.7], [0.6, 0.4]])
    assert math.isnan(metrics.auc(probs, np.array([1, 1])))


def test_auc_of_a_diverged_model_is_nan_not_perfect() -> None:
    """NaN scores (a model whose weights diverged) must not rank as a perfect classifier."""
    labels = np.array([0, 1, 0, 1])
    probs = np.full((4, 2), np.nan)
    assert math.isnan(metrics.auc(probs, labels))
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [np.nan, np.nan], [0.3, 0.7]])
    assert math.isnan(metrics.auc(probs, labels))


def test_multiclass_auc_macro() -> None:
    # perfectly separable 3-class scores -> AUC 1.0
    probs = np.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.2 / 3
    assert metrics.auc(probs, np.array([0, 1, 2, 0])) == pytest.approx(1.0)
