"""Class-balanced self-training (CBST): one confidence threshold per predicted class (ALGORITHMS.md sec. 2).

For class c with ``n_c`` pixels predicted c, ``t_c`` is the confidence at rank ``ceil(alpha * n_c)`` of
those pixels sorted by confidence in descending order (ties counted with multiplicity), and a pixel
predicted c is kept when ``conf >= t_c``: the top ``alpha`` fraction of each class (more under ties).
A class with no predicted pixel gets ``t_c = +inf``, which keeps nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from labelpipe.pseudo.histogram import Float16Histogram, float16_bits_at_least
from labelpipe.pseudo.registry import Histogram, PseudoLabelGenerator, register_generator
from labelpipe.pseudo.validation import (
    IGNORE_LABEL,
    flat_float16,
    flat_labels,
    labeling_ratio,
    labels_below,
    nonnegative_float16_bits,
    same_length,
)

NO_PIXELS_THRESHOLD = math.inf


def cbst_rank(alpha: float, class_count: int) -> int:
    """Rank (1-based, descending) of the threshold among ``class_count`` pixels: ``ceil(alpha * n_c)``."""
    return math.ceil(alpha * class_count)


def cbst_thresholds(label: np.ndarray, conf: np.ndarray, alpha: float, num_classes: int) -> np.ndarray:
    """Per-class thresholds by sorting. label: (N,) uint8 < C; conf: (N,) float16; alpha in (0, 1].

    Returns (C,) float64 thresholds (each one a float16 value, or +inf for a class without pixels).
    """
    label = flat_labels(label)
    conf = flat_float16(conf, "conf")
    same_length(label, conf, "label", "conf")
    labels_below(label, num_classes)
    alpha = labeling_ratio(alpha)
    thresholds = np.full(num_classes, NO_PIXELS_THRESHOLD)
    for c in range(num_classes):
        class_conf = conf[label == c]
        if class_conf.size:
            descending = np.sort(class_conf)[::-1]
            thresholds[c] = float(descending[cbst_rank(alpha, class_conf.size) - 1])
    return thresholds


def cbst_thresholds_from_histogram(hist: Float16Histogram, alpha: float) -> np.ndarray:
    """The same thresholds as :func:`cbst_thresholds`, from a confidence histogram (one streaming pass)."""
    alpha = labeling_ratio(alpha)
    thresholds = np.full(hist.num_classes, NO_PIXELS_THRESHOLD)
    for c, class_count in enumerate(hist.class_counts()):
        if class_count:
            thresholds[c] = hist.kth_largest(c, cbst_rank(alpha, int(class_count)))
    return thresholds


def cbst_pseudo_labels(label: np.ndarray, conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Keep the predicted class c where ``conf >= thresholds[c]``, else 255. label: (N,) or any shape,
    uint8; conf: same size, float16 >= 0; thresholds: (C,). Returns labels in ``label``'s shape and dtype.
    Compares bit patterns (exact for float16 >= 0; see ``float16_bits_at_least``)."""
    shape = np.shape(label)
    label = flat_labels(label)
    conf = flat_float16(conf, "conf")
    same_length(label, conf, "label", "conf")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    labels_below(label, thresholds.size)
    keep = nonnegative_float16_bits(conf, "conf") >= np.take(float16_bits_at_least(thresholds), label)
    return np.where(keep, label, np.asarray(IGNORE_LABEL, dtype=label.dtype)).reshape(shape)


def _fit(hist: Float16Histogram, settings: Mapping[str, Any], prior: None) -> dict[str, Any]:
    alpha = labeling_ratio(settings["alpha"])
    class_counts = hist.class_counts()
    return {
        "alpha": alpha,
        "class_counts": class_counts,
        "n_pixels": int(class_counts.sum()),
        "thresholds": cbst_thresholds_from_histogram(hist, alpha),
    }


def _label(params: Mapping[str, Any], piece: Mapping[str, np.ndarray], rng: Any) -> tuple[np.ndarray, None]:
    return cbst_pseudo_labels(piece["label"], piece["conf"], params["thresholds"]), None


register_generator(
    PseudoLabelGenerator(
        name="cbst",
        settings=("alpha",),
        histogram=Histogram("conf", per_class=True),
        pass2_columns=("label", "conf"),
        fit=_fit,
        label=_label,
    )
)
