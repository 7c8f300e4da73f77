"""U2PL entropy split into reliable and unreliable pixels (seed 003, Eq. 11-13; ALGORITHMS.md sec. 2).

Eq. 11: ``H = -sum_c p_c log p_c`` per pixel (stored by ``predict`` as float16).
Eq. 13: ``alpha_t = alpha_0 (1 - t / t_total)``, the fraction of pixels with the highest entropy that is
unreliable at training step t.
Eq. 12: ``y_hat`` is kept where ``H < gamma_t`` and ignored (unreliable, a source of negative keys)
otherwise, with ``gamma_t`` the ``100 (1 - alpha_t)`` percentile of H.

The percentile is pinned down as an order statistic so the sorted, histogram and torch paths agree
exactly (entropies below 0, rounding error, are clamped to 0 first): with N pixels and
``k = floor((1 - alpha_t) N)``, ``gamma`` is the ``(k + 1)``-th smallest entropy. Without ties exactly
k pixels satisfy ``H < gamma``, i.e. the unreliable fraction is ``ceil(alpha_t N) / N`` (ties at gamma
are all unreliable). ``alpha_t = 0`` (k = N) gives
``gamma = +inf``: every pixel reliable; ``alpha_t = 1`` gives the minimum: none reliable.
The online per-batch version of this split is ``entropy_online.entropy_split_torch``.
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
    unit_fraction,
)


def alpha_schedule(alpha_0: float, t: float, t_total: float) -> float:
    """Eq. 13: ``alpha_t = alpha_0 (1 - t / t_total)``, for ``0 <= t <= t_total`` and alpha_0 in [0, 1]."""
    alpha_0 = unit_fraction(alpha_0, "alpha_0")
    if t_total <= 0:
        raise ValueError(f"t_total must be > 0, got {t_total}")
    if not 0 <= t <= t_total:
        raise ValueError(f"t must be in [0, t_total={t_total}], got {t}")
    return alpha_0 * (1.0 - t / t_total)


def reliable_count(alpha_t: float, n_pixels: int) -> int:
    """``k = floor((1 - alpha_t) N)``: how many of N pixels lie strictly below gamma (without ties)."""
    alpha_t = unit_fraction(alpha_t, "alpha_t")
    return min(n_pixels, math.floor((1.0 - alpha_t) * n_pixels))


def entropy_threshold(entropy: np.ndarray, alpha_t: float) -> float:
    """gamma_t of Eq. 12 by sorting: the ``(floor((1 - alpha_t) N) + 1)``-th smallest of the (N,) float16
    entropies (+inf when that rank exceeds N, including N = 0)."""
    entropy = clamp_nonnegative(flat_float16(entropy, "entropy"))
    nonnegative_float16_bits(entropy, "entropy")  # rejects NaN, which would make the rank meaningless
    k = reliable_count(alpha_t, entropy.size)
    if k >= entropy.size:
        return math.inf
    return float(np.partition(entropy, k)[k])


def entropy_threshold_from_histogram(hist: Float16Histogram, alpha_t: float) -> float:
    """The same gamma as :func:`entropy_threshold`, from a histogram of the entropies (streaming)."""
    total = hist.total()
    k = reliable_count(alpha_t, total)
    if k >= total:
        return math.inf
    return hist.kth_smallest_overall(k + 1)


def entropy_pseudo_labels(label: np.ndarray, entropy: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 12: keep the predicted class where ``H < gamma``. label: (N,) or any shape, uint8; entropy:
    same size, float16. Returns ``(labels, unreliable_mask)`` in ``label``'s shape: labels 255 where
    unreliable, and the bool mask ``H >= gamma`` (the pixels that feed negative keys)."""
    shape = np.shape(label)
    label = flat_labels(label)
    entropy = clamp_nonnegative(flat_float16(entropy, "entropy"))
    same_length(label, entropy, "label", "entropy")
    if math.isnan(gamma):
        raise ValueError("gamma must be a number, got NaN")
    reliable = entropy < np.float64(gamma)
    labels = np.where(reliable, label, np.asarray(IGNORE_LABEL, dtype=label.dtype))
    return labels.reshape(shape), (~reliable).reshape(shape)


def _fit(hist: Float16Histogram, settings: Mapping[str, Any], prior: None) -> dict[str, Any]:
    alpha_t = unit_fraction(settings["alpha_t"], "alpha_t")
    gamma = entropy_threshold_from_histogram(hist, alpha_t)
    return {"alpha_t": alpha_t, "gamma": gamma, "n_reliable": hist.count_below_overall(gamma), "n_pixels": hist.total()}


def _label(params: Mapping[str, Any], piece: Mapping[str, np.ndarray], rng: Any) -> tuple[np.ndarray, None]:
    return entropy_pseudo_labels(piece["label"], piece["entropy"], params["gamma"])[0], None


register_generator(
    PseudoLabelGenerator(
        name="entropy",
        settings=("alpha_t",),
        histogram=Histogram("entropy"),
        pass2_columns=("label", "entropy"),
        fit=_fit,
        label=_label,
    )
)
