"""Two-pass streaming driver for the pseudo-label generators (pure: iterables of arrays in, arrays out).

Every method is a :class:`~labelpipe.pseudo.registry.PseudoLabelGenerator` found by name in the registry;
this module knows none of them. Pass 1, :func:`fit_thresholds`, reads chunks (dicts of store columns:
``label`` uint8, ``conf`` / ``entropy`` / ``variance`` float16; 1-D or 2-D arrays, one image, many, or part
of one) into the generator's float16 histogram and returns its fitted parameters; :func:`histogram_pass`
and :func:`fit_from_histogram` are its two halves, for callers that add up the histograms of many
processes in between. Pass 2, :func:`apply`, labels one chunk with them, ``PIECE_PIXELS`` at a time, so
its temporaries are a few hundred kB whatever the chunk size. Memory is independent of the number of
chunks (a C x 65,536 histogram, ~10 MB for 19 classes), and the results equal those of the in-memory
functions on the concatenation of the chunks, DARS included when pass 2 uses one generator for all chunks
in the same order (see ``dars``'s randomness contract), whatever the chunk sizes.

Settings are passed by their ``pseudolabel`` config names (``alpha``, ``tau``, ``alpha_t``,
``variance_percentile``; ``percentile`` is accepted for the last); each generator picks the ones it
declares, so callers may pass every setting to every method.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from labelpipe.pseudo.dars import PIECE_PIXELS
from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.pseudo.registry import get_generator
from labelpipe.pseudo.validation import clamp_nonnegative, flat_float16, same_length


def _settings(settings: Mapping[str, Any] | None, named: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` and the keyword settings, the latter winning; ``percentile`` is ``variance_percentile``."""
    named = dict(named)
    if "percentile" in named:
        named["variance_percentile"] = named.pop("percentile")
    return {**(settings or {}), **named}


def _chunk_array(chunk: Mapping[str, np.ndarray], key: str, method: str) -> np.ndarray:
    if key not in chunk:
        raise ValueError(f"method {method!r} needs chunk key {key!r}; chunk has {sorted(chunk)}")
    return np.asarray(chunk[key])


def histogram_pass(
    method: str,
    chunks: Iterable[Mapping[str, np.ndarray]],
    num_classes: int,
    settings: Mapping[str, Any] | None = None,
    **named: Any,
) -> Float16Histogram | None:
    """The histogram of pass 1 over ``chunks`` (read once, in order); None when ``method`` needs none.
    Histograms of disjoint chunk sets add up (``merge``, or summing ``counts`` across processes)."""
    spec = get_generator(method).pass1(_settings(settings, named))
    if spec is None:
        return None
    hist = Float16Histogram(spec.rows(num_classes))
    for chunk in chunks:
        values = clamp_nonnegative(flat_float16(_chunk_array(chunk, spec.column, method), spec.column))
        hist.update(_chunk_array(chunk, "label", method) if spec.per_class else None, values)
    return hist


def fit_thresholds(
    method: str,
    chunks_pass1: Iterable[Mapping[str, np.ndarray]],
    num_classes: int,
    prior: np.ndarray | None = None,
    settings: Mapping[str, Any] | None = None,
    **named: Any,
) -> dict[str, Any]:
    """Pass 1: fit the parameters of ``method`` over all chunks (read once, in order).

    ``settings`` (and keyword settings) by config name; each method reads those its generator declares
    (threshold: tau, chunks not read; cbst: alpha; dars: alpha and ``prior`` (C,); entropy: alpha_t;
    variance: optional variance_percentile, chunks read only when given). No defaults here: they live in
    the config. Returns a dict with ``method`` and the generator's parameters, per built-in method
    threshold: ``tau``; cbst: ``thresholds`` (C,), ``class_counts`` (C,), ``n_pixels``;
    dars: ``thresholds``, ``sampling_ratio``, ``target_counts``, ``candidate_counts``, ``class_counts``,
    ``n_pixels``; entropy: ``gamma``, ``n_reliable``, ``n_pixels``; variance: ``cutoff`` (None: no cut).
    """
    settings = _settings(settings, named)
    hist = histogram_pass(method, chunks_pass1, num_classes, settings)
    return fit_from_histogram(method, hist, num_classes, prior, settings)


def fit_from_histogram(
    method: str,
    hist: Float16Histogram | None,
    num_classes: int,
    prior: np.ndarray | None = None,
    settings: Mapping[str, Any] | None = None,
    **named: Any,
) -> dict[str, Any]:
    """The second half of :func:`fit_thresholds`: its parameters from the histogram of
    :func:`histogram_pass` (None where the method needs none). Same arguments and result."""
    generator = get_generator(method)
    chosen = generator.select(_settings(settings, named))
    spec = generator.pass1(chosen)
    if spec is not None:
        rows = spec.rows(num_classes)
        if hist is None or hist.num_classes != rows:
            raise ValueError(f"method {method!r} needs the {rows}-row histogram of histogram_pass")
    if generator.needs_prior:
        if prior is None:
            raise ValueError(f"method {method!r} needs prior")
        prior = np.asarray(prior, dtype=np.float64)
    return {"method": method, **generator.fit(hist if spec is not None else None, chosen, prior)}


def apply(
    method: str,
    params: Mapping[str, Any],
    chunk: Mapping[str, np.ndarray],
    rng: np.random.Generator | None = None,
    image_pixels: list[int] | tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pass 2: pseudo-labels of one chunk with the fitted ``params``. Returns ``(labels, weights)`` in the
    shape of ``chunk["label"]``: labels uint8 (255 = not kept); weights float16 for the generators that
    emit them (variance), else None. ``rng`` is needed by the random ones (dars) only: use one generator
    for all chunks, in a fixed order.
    Works ``PIECE_PIXELS`` pixels at a time: the temporaries of the per-pixel rules (float64 comparisons,
    float32 weights) never exceed a few hundred kB, and the labels are those of one call on the chunk.
    A generator that labels per image (``labels_per_image``, e.g. DARS exact-count sampling) gets one whole
    image at a time instead: ``image_pixels`` lists the chunk's images' sizes (None: the chunk is one
    image); the chunk must hold whole images only."""
    generator = get_generator(method)
    if params.get("method", method) != method:
        raise ValueError(f"params were fitted for {params['method']!r}, not {method!r}")
    if generator.random and rng is None:
        raise ValueError(f"method {method!r} needs rng (a numpy.random.Generator) for its random sampling")
    label = _chunk_array(chunk, "label", method)
    flat = {"label": label.reshape(-1)}
    for key in generator.pass2_columns[1:]:
        flat[key] = _chunk_array(chunk, key, method).reshape(-1)
        same_length(flat["label"], flat[key], "label", key)
    labels = np.empty(flat["label"].shape, flat["label"].dtype)
    weights = np.empty(flat["label"].shape, np.float16) if generator.weights else None
    if generator.labels_per_image(params):
        sizes = [labels.size] if image_pixels is None else [int(n) for n in image_pixels]
        if sum(sizes) != labels.size:
            raise ValueError(f"image_pixels sum to {sum(sizes)}, not the chunk's {labels.size} pixels")
        bounds = np.cumsum([0, *sizes])
        pieces = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    else:
        pieces = [slice(start, start + PIECE_PIXELS) for start in range(0, labels.size, PIECE_PIXELS)]
    for piece in pieces:
        got, got_weights = generator.label(params, {key: values[piece] for key, values in flat.items()}, rng)
        labels[piece] = got
        if weights is not None:
            weights[piece] = got_weights
    return labels.reshape(label.shape), None if weights is None else weights.reshape(label.shape)
