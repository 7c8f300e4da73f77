"""Pseudo-label quality where ground truth exists for the "unlabeled" images (ALGORITHMS.md section 5).

Everything comes from one confusion matrix accumulated over the whole set (never an average of
per-image scores), of shape (C, C + 1): rows are ground-truth classes (gt 255 is ignored), columns are
the pseudo-label, with column C for "not kept" (pseudo-label 255).

- precision_c = #(pseudo = c, gt = c) / #(pseudo = c, gt valid)
- coverage_c  = #(gt = c, pseudo kept) / #(gt = c): the share of class c's pixels that got any label
- recall_c    = #(pseudo = c, gt = c) / #(gt = c)
- iou_c = TP / (TP + FP + FN), where a pixel of class c that was not kept counts as a false negative,
  so the pseudo-label mIoU reflects both precision and coverage; ``miou_kept`` uses kept pixels only.
  mIoU is the mean over classes whose union is non-empty.
- kept_fraction = #(pseudo kept) / #pixels (all pixels, gt 255 included)
- kl_prior_pseudo = KL(r || r_pseudo) = sum_{c: r_c > 0} r_c (log r_c - log(r_pseudo_c + eps)),
  r the labeled prior, r_pseudo the class distribution of the kept pseudo-labels (seed 002, Figure 1).
- uncertainty_gap = mean certainty of correct predictions - mean certainty of wrong ones (seed 000).
- error_auroc = P(u_wrong > u_correct) + P(u_wrong = u_correct) / 2 over pairs of a wrong and a correct pixel:
  how well an uncertainty ranks the pseudo-label's errors, free of its scale (0.5: chance, 1: every error
  above every correct pixel), so confidence, entropy and the heads' variance can be compared. The
  accumulator gives it for the certainty it is fed (conf, or exp(-variance)) over every judged pixel and per
  predicted class (``error_auroc_per_class``: among the pixels predicted c, how well the certainty tells the
  wrong ones), from counts per float16 value, so it streams and merges like the rest.
"""

from __future__ import annotations

import numpy as np

from labelpipe.pseudo.validation import IGNORE_LABEL, class_prior, flat_labels, same_length

KL_EPSILON = 1e-8


def uncertainty_gap(certainty: np.ndarray, correct: np.ndarray) -> float:
    """Mean ``certainty`` over pixels where ``correct`` minus the mean over the others (seed 000).
    certainty: (N,) float; correct: (N,) bool. NaN when either group is empty."""
    certainty = np.asarray(certainty, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    same_length(certainty, correct, "certainty", "correct")
    return _gap(
        float(certainty[correct].sum()),
        int(correct.sum()),
        float(certainty[~correct].sum()),
        int((~correct).sum()),
    )


def error_auroc(uncertainty: np.ndarray, wrong: np.ndarray) -> float:
    """The area under the ROC curve of ``uncertainty`` as a detector of ``wrong`` pixels (the Mann-Whitney
    statistic, ties counted half). uncertainty: (N,) float; wrong: (N,) bool. NaN when either group is empty.
    Exact with ties (stored columns are float16, so many pixels share a value): O(N log N) by one sort."""
    uncertainty = np.asarray(uncertainty).reshape(-1)
    wrong = np.asarray(wrong, dtype=bool).reshape(-1)
    same_length(uncertainty, wrong, "uncertainty", "wrong")
    _, inverse, counts = np.unique(uncertainty, return_inverse=True, return_counts=True)
    n_wrong = np.bincount(inverse.reshape(-1), weights=wrong, minlength=counts.size)
    return ranked_auroc(n_wrong, counts - n_wrong)


def ranked_auroc(n_wrong: np.ndarray, n_correct: np.ndarray) -> float:
    """:func:`error_auroc` from counts: ``n_wrong[v]`` / ``n_correct[v]`` pixels at the v-th smallest uncertainty
    (equal values share a v). NaN when either group is empty."""
    n_wrong = np.asarray(n_wrong, dtype=np.float64)
    n_correct = np.asarray(n_correct, dtype=np.float64)
    total_wrong, total_correct = n_wrong.sum(), n_correct.sum()
    if total_wrong == 0 or total_correct == 0:
        return float("nan")
    correct_below = np.cumsum(n_correct) - n_correct  # correct pixels strictly less uncertain than each value
    return float((n_wrong * (correct_below + 0.5 * n_correct)).sum() / (total_wrong * total_correct))


# Certainty in [0, 1] ranked by its float16 bit pattern: order-preserving for non-negative values, so ties are
# exact at float16 (the precision of the stored columns) and a (C, 2, 15361) count is the whole ranking.
CERTAINTY_CODES = int(np.array(1.0, dtype=np.float16).view(np.uint16)) + 1


def certainty_codes(certainty: np.ndarray) -> np.ndarray:
    """(N,) int64 rank codes of certainties in [0, 1] (clipped; NaN as 0)."""
    values = np.nan_to_num(np.asarray(certainty, dtype=np.float32), nan=0.0)
    return np.clip(values, 0.0, 1.0).astype(np.float16).view(np.uint16).astype(np.int64)


def _gap(correct_sum: float, correct_n: int, wrong_sum: float, wrong_n: int) -> float:
    if correct_n == 0 or wrong_n == 0:
        return float("nan")
    return correct_sum / correct_n - wrong_sum / wrong_n


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


class PseudoQualityAccumulator:
    """Streaming pseudo-label quality: ``update`` per image or chunk, ``result`` at the end.
    Memory: a (C, C + 1) confusion matrix and a few counters."""

    def __init__(self, num_classes: int, prior: np.ndarray, eps: float = KL_EPSILON) -> None:
        self.num_classes = int(num_classes)
        self.prior = class_prior(prior)
        if self.prior.size != self.num_classes:
            raise ValueError(f"prior has {self.prior.size} classes, expected {self.num_classes}")
        self.eps = float(eps)
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        self.pseudo_counts = np.zeros(self.num_classes, dtype=np.int64)
        self.n_pixels = 0
        self._certainty = np.zeros(4)  # sum correct, count correct, sum wrong, count wrong
        self._ranked: np.ndarray | None = None  # (C, 2, CERTAINTY_CODES): pixels by predicted class, right, certainty

    def merge(self, other: PseudoQualityAccumulator) -> None:
        """Add ``other``'s counts (another process's share of the same labelling) to this one's."""
        self.confusion += other.confusion
        self.pseudo_counts += other.pseudo_counts
        self.n_pixels += other.n_pixels
        self._certainty += other._certainty
        if other._ranked is not None:
            self._ranked = other._ranked.copy() if self._ranked is None else self._ranked + other._ranked

    def _checked(self, values: np.ndarray, name: str) -> np.ndarray:
        values = flat_labels(values, name)
        bad = (values >= self.num_classes) & (values != IGNORE_LABEL)
        if np.any(bad):
            raise ValueError(f"{name} holds class ids >= {self.num_classes} other than {IGNORE_LABEL}")
        return values.astype(np.int64)

    def update(
        self,
        pseudo: np.ndarray,
        gt: np.ndarray,
        certainty: np.ndarray | None = None,
        pred: np.ndarray | None = None,
    ) -> None:
        """pseudo: (N,) or any shape, class or 255 (not kept); gt: same size, class or 255 (ignored);
        certainty: optional same-size per-pixel certainty (e.g. conf or exp(-variance)) for the
        uncertainty gap; pred: optional raw predictions ``y_hat`` that decide right/wrong for the gap
        (default: the kept pseudo-labels)."""
        pseudo = self._checked(pseudo, "pseudo")
        gt = self._checked(gt, "gt")
        same_length(pseudo, gt, "pseudo", "gt")
        kept = pseudo != IGNORE_LABEL
        self.n_pixels += pseudo.size
        self.pseudo_counts += np.bincount(pseudo[kept], minlength=self.num_classes)
        valid = gt != IGNORE_LABEL
        column = np.where(kept, pseudo, self.num_classes)
        cells = gt[valid] * (self.num_classes + 1) + column[valid]
        self.confusion += np.bincount(cells, minlength=self.confusion.size).reshape(self.confusion.shape)
        if certainty is not None:
            certainty = np.asarray(certainty, dtype=np.float64).reshape(-1)
            same_length(certainty, gt, "certainty", "gt")
            if pred is None:
                judged, predicted = valid & kept, pseudo
            else:
                predicted = self._checked(pred, "pred")
                same_length(predicted, gt, "pred", "gt")
                judged = valid & (predicted != IGNORE_LABEL)
            correct = judged & (predicted == gt)
            wrong = judged & ~correct
            self._certainty += [certainty[correct].sum(), correct.sum(), certainty[wrong].sum(), wrong.sum()]
            if self._ranked is None:
                self._ranked = np.zeros((self.num_classes, 2, CERTAINTY_CODES), dtype=np.int64)
            cells = (predicted[judged] * 2 + correct[judged]) * CERTAINTY_CODES + certainty_codes(certainty[judged])
            np.add.at(self._ranked.reshape(-1), cells, 1)

    def _error_ranking(self) -> dict[str, np.ndarray | float]:
        """``error_auroc`` over every judged pixel and ``error_auroc_per_class`` (C,) among the pixels predicted
        each class (NaN where a class has no wrong or no right pixel, or no certainty was given)."""
        if self._ranked is None:
            return {"error_auroc": float("nan"), "error_auroc_per_class": np.full(self.num_classes, np.nan)}
        return {
            "error_auroc": _ranking_of(self._ranked.sum(axis=0)),
            "error_auroc_per_class": np.array([_ranking_of(r) for r in self._ranked]),
        }

    def result(self) -> dict[str, np.ndarray | float]:
        """Per-class arrays (C,) float64 (NaN where undefined) and scalar floats; see the module."""
        kept_columns = self.confusion[:, : self.num_classes]
        true_positive = np.diag(kept_columns).astype(np.float64)
        predicted = kept_columns.sum(axis=0)  # pseudo = c with valid gt
        gt_total = self.confusion.sum(axis=1)
        gt_kept = kept_columns.sum(axis=1)
        union = gt_total + predicted - true_positive
        union_kept = gt_kept + predicted - true_positive
        iou = _ratio(true_positive, union)
        iou_kept = _ratio(true_positive, union_kept)
        kept_total = int(self.pseudo_counts.sum())
        pseudo_distribution = self.pseudo_counts / max(kept_total, 1)
        present = self.prior > 0
        kl = float(
            np.sum(
                self.prior[present] * (np.log(self.prior[present]) - np.log(pseudo_distribution[present] + self.eps))
            )
        )
        correct_sum, correct_n, wrong_sum, wrong_n = self._certainty
        return {
            "precision": _ratio(true_positive, predicted),
            "coverage": _ratio(gt_kept, gt_total),
            "recall": _ratio(true_positive, gt_total),
            "iou": iou,
            "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            "iou_kept": iou_kept,
            "miou_kept": float(np.nanmean(iou_kept)) if np.any(union_kept > 0) else float("nan"),
            "kept_fraction": kept_total / self.n_pixels if self.n_pixels else float("nan"),
            "pseudo_distribution": pseudo_distribution,
            "kl_prior_pseudo": kl,
            "uncertainty_gap": _gap(correct_sum, int(correct_n), wrong_sum, int(wrong_n)),
            **self._error_ranking(),
            "confusion": self.confusion.copy(),
        }


def _ranking_of(ranked: np.ndarray) -> float:
    """(2, CODES) counts (wrong, right) by increasing certainty -> the error AUROC of uncertainty."""
    return ranked_auroc(ranked[0, ::-1], ranked[1, ::-1])  # reversed: increasing uncertainty


def pseudo_label_quality(
    pseudo: np.ndarray,
    gt: np.ndarray,
    prior: np.ndarray,
    num_classes: int,
    certainty: np.ndarray | None = None,
    pred: np.ndarray | None = None,
) -> dict[str, np.ndarray | float]:
    """Quality of one set of pseudo-labels in memory: the result of one accumulator update."""
    accumulator = PseudoQualityAccumulator(num_classes, prior)
    accumulator.update(pseudo, gt, certainty=certainty, pred=pred)
    return accumulator.result()
