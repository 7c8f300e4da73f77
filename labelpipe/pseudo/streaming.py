"""Two-pass streaming driver for the pseudo-label generators (pure: iterables of arrays in, arrays out).

Pass 1, :func:`fit_thresholds`, reads chunks (dicts with keys ``label`` uint8, ``conf`` / ``entropy`` /
``variance`` float16; 1-D or 2-D arrays, one image, many, or part of one) into float16 histograms and
returns the fitted parameters; :func:`histogram_pass` and :func:`fit_from_histogram` are its two halves,
for callers that add up the histograms of many processes in between. Pass 2, :func:`apply`, labels one
chunk with them, ``PIECE_PIXELS`` at a time, so its temporaries are a few hundred kB whatever the chunk
size. Memory is independent of the number of chunks (a C x 65,536 histogram, ~10 MB for 19 classes),
and the results equal those of the in-memory functions on the concatenation of the chunks, DARS
included when pass 2 uses one generator for all chunks in the same order (see ``dars``'s randomness
contract), whatever the chunk sizes.

``PASS1_KEYS`` / ``PASS2_KEYS`` name the arrays each method reads, so the caller loads only those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from labelpipe.pseudo.cbst import cbst_pseudo_labels, cbst_thresholds_from_histogram
from labelpipe.pseudo.dars import (
    PIECE_PIXELS,
    dars_pseudo_labels,
    dars_target_counts,
    dars_thresholds_from_histogram,
)
from labelpipe.pseudo.entropy import entropy_pseudo_labels, entropy_threshold_from_histogram
from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.pseudo.threshold import threshold_pseudo_labels
from labelpipe.pseudo.validation import clamp_nonnegative, flat_float16, labeling_ratio, same_length, unit_fraction
from labelpipe.pseudo.variance import variance_cutoff_from_histogram, variance_pseudo_labels_at_cutoff

METHODS = ("threshold", "cbst", "dars", "entropy", "variance")

PASS1_KEYS: dict[str, tuple[str, ...]] = {
    "threshold": (),
    "cbst": ("label", "conf"),
    "dars": ("label", "conf"),
    "entropy": ("entropy",),
    "variance": ("variance",),  # read only when a percentile cut is asked for
}
PASS2_KEYS: dict[str, tuple[str, ...]] = {
    "threshold": ("label", "conf"),
    "cbst": ("label", "conf"),
    "dars": ("label", "conf"),
    "entropy": ("label", "entropy"),
    "variance": ("label", "variance"),
}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown pseudo-label method {method!r}; choose one of {', '.join(METHODS)}")


def _required(value: Any, name: str, method: str) -> Any:
    if value is None:
        raise ValueError(f"method {method!r} needs {name}")
    return value


def _chunk_array(chunk: Mapping[str, np.ndarray], key: str, method: str) -> np.ndarray:
    if key not in chunk:
        raise ValueError(f"method {method!r} needs chunk key {key!r}; chunk has {sorted(chunk)}")
    return np.asarray(chunk[key])


def _needed(hist: Float16Histogram | None, method: str, rows: int) -> Float16Histogram:
    if hist is None or hist.num_classes != rows:
        raise ValueError(f"method {method!r} needs the {rows}-row histogram of histogram_pass")
    return hist


def histogram_spec(method: str, num_classes: int, percentile: float | None = None) -> tuple[str, int] | None:
    """What pass 1 of ``method`` histograms: ``(column, rows)`` (rows = C for a per-class histogram, 1 for
    an overall one), or None when pass 1 reads nothing (threshold; variance without a percentile)."""
    _check_method(method)
    if method in ("cbst", "dars"):
        return "conf", num_classes
    if method == "entropy":
        return "entropy", 1
    if method == "variance" and percentile is not None:
        return "variance", 1
    return None


def histogram_pass(
    method: str, chunks: Iterable[Mapping[str, np.ndarray]], num_classes: int, percentile: float | None = None
) -> Float16Histogram | None:
    """The histogram of pass 1 over ``chunks`` (read once, in order); None when ``method`` needs none.
    Histograms of disjoint chunk sets add up (``merge``, or summing ``counts`` across processes)."""
    spec = histogram_spec(method, num_classes, percentile)
    if spec is None:
        return None
    key, rows = spec
    hist = Float16Histogram(rows)
    for chunk in chunks:
        values = clamp_nonnegative(flat_float16(_chunk_array(chunk, key, method), key))
        hist.update(_chunk_array(chunk, "label", method) if rows > 1 else None, values)
    return hist


def fit_thresholds(
    method: str,
    chunks_pass1: Iterable[Mapping[str, np.ndarray]],
    num_classes: int,
    prior: np.ndarray | None = None,
    alpha: float | None = None,
    tau: float | None = None,
    alpha_t: float | None = None,
    percentile: float | None = None,
) -> dict[str, Any]:
    """Pass 1: fit the parameters of ``method`` over all chunks (read once, in order).

    Needs: threshold -> tau (chunks are not read); cbst -> alpha; dars -> prior (C,) and alpha;
    entropy -> alpha_t; variance -> optional percentile (chunks read only when given). No defaults
    here: they live in the config. Returns a dict with ``method`` and, per method,
    threshold: ``tau``; cbst: ``thresholds`` (C,), ``class_counts`` (C,), ``n_pixels``;
    dars: ``thresholds``, ``sampling_ratio``, ``target_counts``, ``candidate_counts``, ``class_counts``,
    ``n_pixels``; entropy: ``gamma``, ``n_reliable``, ``n_pixels``; variance: ``cutoff`` (None: no cut).
    """
    percentile = percentile if method == "variance" else None
    hist = histogram_pass(method, chunks_pass1, num_classes, percentile)
    return fit_from_histogram(method, hist, num_classes, prior, alpha, tau, alpha_t, percentile)


def fit_from_histogram(
    method: str,
    hist: Float16Histogram | None,
    num_classes: int,
    prior: np.ndarray | None = None,
    alpha: float | None = None,
    tau: float | None = None,
    alpha_t: float | None = None,
    percentile: float | None = None,
) -> dict[str, Any]:
    """The second half of :func:`fit_thresholds`: its parameters from the histogram of
    :func:`histogram_pass` (None where the method needs none). Same arguments and result."""
    _check_method(method)
    params: dict[str, Any] = {"method": method}
    if method == "threshold":
        params["tau"] = float(_required(tau, "tau", method))
    elif method in ("cbst", "dars"):
        alpha = labeling_ratio(_required(alpha, "alpha", method))
        hist = _needed(hist, method, num_classes)
        class_counts = hist.class_counts()
        params.update(alpha=alpha, class_counts=class_counts, n_pixels=int(class_counts.sum()))
        if method == "cbst":
            params["thresholds"] = cbst_thresholds_from_histogram(hist, alpha)
        else:
            prior = np.asarray(_required(prior, "prior", method), dtype=np.float64)
            n_pixels = params["n_pixels"]
            thresholds, sampling_ratio = dars_thresholds_from_histogram(hist, prior, alpha, n_pixels)
            params.update(
                thresholds=thresholds,
                sampling_ratio=sampling_ratio,
                target_counts=dars_target_counts(prior, alpha, params["n_pixels"]),
                candidate_counts=np.array(
                    [hist.count_at_least(c, t) for c, t in enumerate(thresholds)], dtype=np.int64
                ),
            )
    elif method == "entropy":
        alpha_t = unit_fraction(_required(alpha_t, "alpha_t", method), "alpha_t")
        hist = _needed(hist, method, 1)
        gamma = entropy_threshold_from_histogram(hist, alpha_t)
        params.update(alpha_t=alpha_t, gamma=gamma, n_reliable=hist.count_below_overall(gamma), n_pixels=hist.total())
    else:  # variance
        params.update(percentile=percentile, cutoff=None)
        if percentile is not None:
            hist = _needed(hist, method, 1)
            params.update(cutoff=variance_cutoff_from_histogram(hist, percentile), n_pixels=hist.total())
    return params


def apply(
    method: str,
    params: Mapping[str, Any],
    chunk: Mapping[str, np.ndarray],
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pass 2: pseudo-labels of one chunk with the fitted ``params``. Returns ``(labels, weights)`` in the
    shape of ``chunk["label"]``: labels uint8 (255 = not kept); weights float16 for ``variance``, else
    None. ``rng`` is needed by dars only: use one generator for all chunks, in a fixed order.
    Works ``PIECE_PIXELS`` pixels at a time: the temporaries of the per-pixel rules (float64 comparisons,
    float32 weights) never exceed a few hundred kB, and the labels are those of one call on the chunk."""
    _check_method(method)
    if params.get("method", method) != method:
        raise ValueError(f"params were fitted for {params['method']!r}, not {method!r}")
    if method == "dars" and rng is None:
        raise ValueError("method 'dars' needs rng (a numpy.random.Generator) for its random sampling")
    label = _chunk_array(chunk, "label", method)
    key = PASS2_KEYS[method][1]
    values = _chunk_array(chunk, key, method)
    same_length(label.reshape(-1), values.reshape(-1), "label", key)
    flat_label, flat_values = label.reshape(-1), values.reshape(-1)
    labels = np.empty(flat_label.shape, flat_label.dtype)
    weights = np.empty(flat_label.shape, np.float16) if method == "variance" else None
    for start in range(0, flat_label.size, PIECE_PIXELS):
        piece = slice(start, start + PIECE_PIXELS)
        got, got_weights = _apply_piece(method, params, flat_label[piece], flat_values[piece], rng)
        labels[piece] = got
        if weights is not None:
            weights[piece] = got_weights
    return labels.reshape(label.shape), None if weights is None else weights.reshape(label.shape)


def _apply_piece(
    method: str, params: Mapping[str, Any], label: np.ndarray, values: np.ndarray, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray | None]:
    if method == "threshold":
        return threshold_pseudo_labels(label, values, params["tau"]), None
    if method == "cbst":
        return cbst_pseudo_labels(label, values, params["thresholds"]), None
    if method == "dars":
        assert rng is not None
        return dars_pseudo_labels(label, values, params["thresholds"], params["sampling_ratio"], rng), None
    if method == "entropy":
        return entropy_pseudo_labels(label, values, params["gamma"])[0], None
    return variance_pseudo_labels_at_cutoff(label, values, params["cutoff"])
