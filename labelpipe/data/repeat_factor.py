"""Repeat-factor sampling (Gupta et al., LVIS, CVPR 2019): images with rare classes are seen more often.

For a labeled set with class presence ``present`` (N images x C classes), ``f_c`` is the fraction of images
containing class ``c``. Each class gets the repeat factor ``r_c = max(1, sqrt(t / f_c))`` for a threshold
``t``, and each image that of its rarest class, ``r_i = max_{c in i} r_c`` (1 for an image without classes).
An epoch then shows image ``i`` ``r_i`` times in expectation: the integer part always, the fractional part
by a seeded coin (stochastic rounding), so the list an epoch permutes is fixed by the seed. Classes in at
least a fraction ``t`` of the images are never repeated for their own sake; ``t = 0`` switches it off.

Where class-balanced CE (``labelpipe.losses.class_balance``) reweights the pixels of the batches that
happen to contain a rare class, repeat-factor sampling puts the rare classes into more batches: with 2 of
250 labeled images containing a digit and batches of 16, plain sampling shows it in one step of eight.
"""

from __future__ import annotations

import numpy as np


def image_repeat_factors(present: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) float64 repeat factor of each image, from ``present`` (N, C) bool and ``threshold`` t >= 0."""
    present = np.asarray(present, dtype=bool)
    if present.ndim != 2:
        raise ValueError(f"present must be (images, classes), got shape {present.shape}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if present.shape[0] == 0 or threshold == 0:
        return np.ones(present.shape[0])
    freq = present.mean(axis=0)
    class_factor = np.ones(present.shape[1])
    seen = freq > 0
    class_factor[seen] = np.maximum(1.0, np.sqrt(threshold / freq[seen]))
    return np.where(present, class_factor[None, :], 1.0).max(axis=1, initial=1.0)


def repeat_indices(factors: np.ndarray, seed: int) -> np.ndarray:
    """(M,) int64 image indices, image ``i`` repeated ``floor(r_i)`` times plus once more with probability
    ``r_i - floor(r_i)`` (a coin seeded by ``seed``), in index order; M ~ sum(r_i)."""
    factors = np.asarray(factors, dtype=np.float64)
    if np.any(factors < 1) or not np.all(np.isfinite(factors)):
        raise ValueError("repeat factors must be finite and >= 1")
    whole = np.floor(factors)
    extra = np.random.default_rng(seed).random(factors.shape[0]) < factors - whole
    return np.repeat(np.arange(factors.shape[0], dtype=np.int64), (whole + extra).astype(np.int64))
