"""Segmentation metrics (ALGORITHMS.md section 5). Arrays in, numbers out; no I/O.

One confusion matrix over the whole evaluation set, never an average of per-image scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the numpy paths (pseudolabel's report) never load torch
    import torch


class ConfusionMatrix:
    """Accumulates a (C, C) matrix, rows = ground truth, columns = prediction, on any device."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        import torch

        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        import torch

        keep = target != self.ignore_index
        t = target[keep].long().to(self.mat.device)
        p = pred[keep].long().to(self.mat.device)
        c = self.num_classes
        self.mat += torch.bincount(t * c + p, minlength=c * c).view(c, c)

    def all_reduce(self) -> None:
        """Sum over DDP ranks (no-op outside torch.distributed)."""
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def numpy(self) -> np.ndarray:
        return self.mat.cpu().numpy()


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN); NaN where the union is empty."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(iou: np.ndarray, classes: list[int] | None = None) -> float:
    values = iou if classes is None else iou[classes]
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


def tail_classes(prior: np.ndarray) -> list[int]:
    """The classes in the rarer half of the labeled prior (ties broken by class id)."""
    order = np.argsort(prior, kind="stable")
    return sorted(int(c) for c in order[: len(prior) // 2])


class CalibrationAccumulator:
    """Expected calibration error over equal-width confidence bins (15 by default)."""

    def __init__(self, bins: int = 15) -> None:
        self.bins = bins
        self.count = np.zeros(bins, np.int64)
        self.conf_sum = np.zeros(bins, np.float64)
        self.correct_sum = np.zeros(bins, np.float64)

    def update(self, conf: torch.Tensor, correct: torch.Tensor) -> None:
        import torch

        conf = conf.detach().float().flatten()
        correct = correct.detach().float().flatten()
        idx = torch.clamp((conf * self.bins).long(), max=self.bins - 1)
        self.count += torch.bincount(idx, minlength=self.bins).cpu().numpy()
        self.conf_sum += torch.bincount(idx, weights=conf, minlength=self.bins).double().cpu().numpy()
        self.correct_sum += torch.bincount(idx, weights=correct, minlength=self.bins).double().cpu().numpy()

    def update_numpy(self, conf: np.ndarray, correct: np.ndarray) -> None:
        """:meth:`update` in numpy (no torch): the same float32 bins, sums in float64."""
        conf = np.asarray(conf, np.float32).reshape(-1)
        correct = np.asarray(correct).reshape(-1)
        idx = np.minimum((conf * np.float32(self.bins)).astype(np.int64), self.bins - 1)
        self.count += np.bincount(idx, minlength=self.bins)
        self.conf_sum += np.bincount(idx, weights=conf, minlength=self.bins)
        self.correct_sum += np.bincount(idx, weights=correct.astype(np.float64), minlength=self.bins)

    def merge(self, other: CalibrationAccumulator) -> None:
        """Add ``other``'s bins (another process's share of the same pixels) to this one's."""
        self.count += other.count
        self.conf_sum += other.conf_sum
        self.correct_sum += other.correct_sum

    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            return float("nan")
        gap = np.abs(self.conf_sum - self.correct_sum)  # = n_b * |conf_b - acc_b|
        return float(gap.sum() / total)

    def reliability(self) -> dict[str, list[float]]:
        n = np.maximum(self.count, 1)
        return {
            "bin_confidence": (self.conf_sum / n).tolist(),
            "bin_accuracy": (self.correct_sum / n).tolist(),
            "bin_count": self.count.tolist(),
        }


def summarize(
    conf: np.ndarray,
    class_names: list[str],
    prior: np.ndarray | None,
    ece: float,
    subsets: dict[str, list[int]] | None = None,
) -> dict:
    iou = iou_per_class(conf)
    tail = tail_classes(prior) if prior is not None else []
    out = {
        "miou": mean_iou(iou),
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, iou, strict=True)},
        "pixel_accuracy": pixel_accuracy(conf),
        "tail_miou": mean_iou(iou, tail) if tail else None,
        "tail_classes": [class_names[c] for c in tail],
        "ece": ece,
        "pixels": int(conf.sum()),
    }
    for name, classes in (subsets or {}).items():
        out[name] = mean_iou(iou, classes)
    return out
