"""Variance-weighted pseudo-labels (seed 000; ALGORITHMS.md sec. 2 "variance").

The "variance" of a pixel is the KL divergence between the main and auxiliary heads,
``D = KL(p || p_aux) = sum_c p_c (log p_c - log p_aux_c)``, stored by ``predict`` as float16. The method
keeps every prediction ``y_hat`` (no hand-set threshold) with weight ``exp(-D)`` in (0, 1], the weight of
seed 000's rectified loss. An optional cut, off by default, drops the pixels whose variance lies above a
percentile: the cutoff is the value at rank ``max(1, ceil(percentile / 100 * N))`` ascending
(``np.quantile(D, percentile / 100, method="inverted_cdf")``), and pixels with ``D > cutoff`` get label
255 and weight 0. Variances below 0 (rounding error of a KL) are clamped to 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.pseudo.registry import Histogram, PseudoLabelGenerator, register_generator
from labelpipe.pseudo.validation import (
    IGNORE_LABEL,
    clamp_nonnegative,
    flat_float16,
    flat_labels,
    nonnegative_float16_bits,
    same_length,
)


def _check_percentile(percentile: float) -> float:
    percentile = float(percentile)
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    return percentile


def _cutoff_rank(percentile: float, n_pixels: int) -> int:
    return max(1, math.ceil(_check_percentile(percentile) / 100.0 * n_pixels))


def variance_cutoff(variance: np.ndarray, percentile: float) -> float:
    """The variance at the given percentile (an order statistic, see the module docstring), by sorting.
    variance: (N,) float16, N >= 1."""
    variance = clamp_nonnegative(flat_float16(variance, "variance"))
    nonnegative_float16_bits(variance, "variance")
    if variance.size == 0:
        raise ValueError("variance is empty: no percentile to take")
    rank = _cutoff_rank(percentile, variance.size)
    return float(np.partition(variance, rank - 1)[rank - 1])


def variance_cutoff_from_histogram(hist: Float16Histogram, percentile: float) -> float:
    """The same cutoff as :func:`variance_cutoff`, from a histogram of the variances (streaming)."""
    total = hist.total()
    if total == 0:
        raise ValueError("the variance histogram is empty: no percentile to take")
    return hist.kth_smallest_overall(_cutoff_rank(percentile, total))


def variance_pseudo_labels_at_cutoff(
    label: np.ndarray, variance: np.ndarray, cutoff: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and weights ``exp(-variance)`` (float16), dropping ``variance > cutoff`` when a cutoff is
    given. label: (N,) or any shape, uint8; variance: same size, float16. Outputs in ``label``'s shape."""
    shape = np.shape(label)
    label = flat_labels(label)
    variance = clamp_nonnegative(flat_float16(variance, "variance"))
    same_length(label, variance, "label", "variance")
    weights = np.exp(-variance.astype(np.float32)).astype(np.float16)
    labels = label.copy()
    if cutoff is not None:
        dropped = variance > np.float64(cutoff)
        labels[dropped] = IGNORE_LABEL
        weights[dropped] = 0
    return labels.reshape(shape), weights.reshape(shape)


def variance_pseudo_labels(
    label: np.ndarray, variance: np.ndarray, percentile: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep every predicted class with weight ``exp(-variance)`` (float16); with ``percentile`` set, drop
    the pixels above that variance percentile of these N pixels (label 255, weight 0).
    label: (N,) or any shape, uint8; variance: same size, float16. Returns ``(labels, weights)``."""
    cutoff = None if percentile is None else variance_cutoff(variance, percentile)
    return variance_pseudo_labels_at_cutoff(label, variance, cutoff)


def _histogram(settings: Mapping[str, Any]) -> Histogram | None:
    # The variances are read in pass 1 only when a percentile cut is asked for.
    return None if settings["variance_percentile"] is None else Histogram("variance")


def _fit(hist: Float16Histogram | None, settings: Mapping[str, Any], prior: None) -> dict[str, Any]:
    percentile = settings["variance_percentile"]
    params: dict[str, Any] = {"percentile": percentile, "cutoff": None}
    if hist is not None:
        params.update(cutoff=variance_cutoff_from_histogram(hist, percentile), n_pixels=hist.total())
    return params


def _label(
    params: Mapping[str, Any], piece: Mapping[str, np.ndarray], rng: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    return variance_pseudo_labels_at_cutoff(piece["label"], piece["variance"], params["cutoff"])


register_generator(
    PseudoLabelGenerator(
        name="variance",
        optional_settings=("variance_percentile",),
        histogram=_histogram,
        pass2_columns=("label", "variance"),
        fit=_fit,
        label=_label,
        weights=True,
    )
)
