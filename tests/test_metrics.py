"""Metrics on inputs small enough to count by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelpipe.metrics import (
    CalibrationAccumulator,
    ConfusionMatrix,
    iou_per_class,
    mean_iou,
    summarize,
    tail_classes,
)


def test_confusion_matrix_counts_and_ignores_255():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 2], [2, 255, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [0, 2, 1, 0]])
    cm.update(target, pred)
    expected = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    assert (cm.numpy() == expected).all()


def test_iou_is_global_not_a_mean_of_images():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # image 1
    cm.update(torch.tensor([1]), torch.tensor([1]))  # image 2
    iou = iou_per_class(cm.numpy())
    # class 1: TP 1, FP 1, FN 0 -> 1/2; class 0: TP 3, FN 1 -> 3/4
    assert iou == pytest.approx([0.75, 0.5])


def test_miou_skips_classes_with_empty_union():
    conf = np.array([[2, 0, 0], [0, 0, 0], [0, 0, 1]])
    iou = iou_per_class(conf)
    assert np.isnan(iou[1])
    assert mean_iou(iou) == pytest.approx(1.0)


def test_tail_classes_are_the_rarer_half_of_the_prior():
    assert tail_classes(np.array([0.5, 0.01, 0.3, 0.02, 0.17])) == [1, 3]


def test_ece_by_hand():
    acc = CalibrationAccumulator(bins=2)
    # bin [0, .5): conf 0.3 wrong; bin [.5, 1]: conf 0.9 right, 0.7 wrong
    acc.update(torch.tensor([0.3, 0.9, 0.7]), torch.tensor([False, True, False]))
    # |0.3 - 0| * 1 + |0.8 - 0.5| * 2 = 0.3 + 0.6 -> / 3
    assert acc.ece() == pytest.approx(0.3)


def test_summary_has_the_contract_keys():
    conf = np.array([[5, 1], [1, 3]])
    out = summarize(conf, ["bg", "fg"], np.array([0.9, 0.1]), 0.05)
    assert {"miou", "per_class_iou", "pixel_accuracy", "tail_miou", "ece"} <= set(out)
    assert out["per_class_iou"]["fg"] == pytest.approx(3 / 5)
    assert out["tail_miou"] == pytest.approx(3 / 5)
    assert out["pixel_accuracy"] == pytest.approx(0.8)
