"""Two-pass streaming driver for the pseudo-label generators (pure: iterables of arrays in, arrays out).

Pass 1, :func:`fit_thresholds`, reads chunks (dicts with keys ``label`` uint8, ``conf`` / ``entropy`` /
``variance`` float16; 1-D or 2-D arrays, one image or many) into float16 histograms and returns the fitted
parameters. Pass 2, :func:`apply`, labels one chunk with them. Memory is independent of the number of
chunks (a C x 65,536 histogram, ~10 MB for 19 classes), and the results equal those of the in-memory
functions on the concatenation of the chunks, DARS included when pass 2 uses one generator for all
chunks in the same order (see ``dars``'s randomness contract).

``PASS1_KEYS`` / ``PASS2_KEYS`` name the arrays each method reads, so the caller loads only those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from labelpipe.pseudo.cbst import cbst_pseudo_labels, cbst_thresholds_from_histogram
from labelpipe.pseudo.dars import dars_pseudo_labels, dars_target_counts, dars_thresholds_from_histogram
from labelpipe.pseudo.entropy import entropy_pseudo_labels, entropy_threshold_from_histogram
from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.pseudo.threshold import threshold_pseudo_labels
from labelpipe.pseudo.validation import clamp_nonnegative, flat_float16, labeling_ratio, unit_fraction
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


def _histogram(
    chunks: Iterable[Mapping[str, np.ndarray]], method: str, key: str, num_classes: int, by_class: bool
) -> Float16Histogram:
    hist = Float16Histogram(num_classes if by_class else 1)
    for chunk in chunks:
        values = clamp_nonnegative(flat_float16(_chunk_array(chunk, key, method), key))
        label = _chunk_array(chunk, "label", method) if by_class else np.zeros(values.size, np.uint8)
        hist.update(label, values)
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
    _check_method(method)
    params: dict[str, Any] = {"method": method}
    if method == "threshold":
        params["tau"] = float(_required(tau, "tau", method))
    elif method in ("cbst", "dars"):
        alpha = labeling_ratio(_required(alpha, "alpha", method))
        hist = _histogram(chunks_pass1, method, "conf", num_classes, by_class=True)
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
        hist = _histogram(chunks_pass1, method, "entropy", num_classes, by_class=False)
        gamma = entropy_threshold_from_histogram(hist, alpha_t)
        params.update(alpha_t=alpha_t, gamma=gamma, n_reliable=hist.count_below_overall(gamma), n_pixels=hist.total())
    else:  # variance
        params.update(percentile=percentile, cutoff=None)
        if percentile is not None:
            hist = _histogram(chunks_pass1, method, "variance", num_classes, by_class=False)
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
    None. ``rng`` is needed by dars only: use one generator for all chunks, in a fixed order."""
    _check_method(method)
    if params.get("method", method) != method:
        raise ValueError(f"params were fitted for {params['method']!r}, not {method!r}")
    label = _chunk_array(chunk, "label", method)
    if method == "threshold":
        return threshold_pseudo_labels(label, _chunk_array(chunk, "conf", method), params["tau"]), None
    if method == "cbst":
        return cbst_pseudo_labels(label, _chunk_array(chunk, "conf", method), params["thresholds"]), None
    if method == "dars":
        if rng is None:
            raise ValueError("method 'dars' needs rng (a numpy.random.Generator) for its random sampling")
        labels = dars_pseudo_labels(
            label, _chunk_array(chunk, "conf", method), params["thresholds"], params["sampling_ratio"], rng
        )
        return labels, None
    if method == "entropy":
        labels, _unreliable = entropy_pseudo_labels(label, _chunk_array(chunk, "entropy", method), params["gamma"])
        return labels, None
    return variance_pseudo_labels_at_cutoff(label, _chunk_array(chunk, "variance", method), params["cutoff"])
