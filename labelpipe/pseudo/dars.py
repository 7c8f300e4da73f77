"""DARS: distribution alignment and random sampling (seed 002, Algorithm 1; ALGORITHMS.md section 2).

Algorithm 1, line 2 (distribution alignment, Eq. 3-4): with P unlabeled pixels, labeled class prior
``r_c`` and labeling ratio ``alpha``, the target count of class c is ``n_c = floor(alpha * r_c * P)``
and its threshold ``t_c`` is the ``n_c``-th largest confidence among the pixels predicted c (the smallest
of them when fewer than ``n_c`` are predicted c, so that all are kept). This closed form is the argmin of
the paper's KL objective under the labeling ratio; no optimiser is needed.

Line 3: the candidates of class c are the pixels predicted c with ``conf >= t_c``; there are
``m_c >= n_c`` of them when confidences tie at ``t_c`` (float16 saturates near 1.0).

Lines 5-6 (random sampling): ``s_c = min(1, n_c / m_c)``, and each candidate is kept with probability
``s_c``, so that ``n_c`` pixels of class c are kept in expectation whenever ``m_c >= n_c``.

Degenerate classes (no pixel predicted c, or ``n_c = 0``) get ``t_c = 1.0`` and ``s_c = 0``: nothing kept.

Randomness contract (so that streaming equals in-memory): :func:`dars_pseudo_labels` draws
``u = rng.random(N, dtype=np.float32)`` for *every* pixel in order, candidates or not, and keeps a
candidate where ``u < float32(s_c)``. Since ``Generator.random(n1, float32)`` then ``random(n2, float32)``
equals ``random(n1 + n2, float32)`` (each float32 is one half of a 64-bit output; the generator keeps the
other half), labelling images one by one, or in chunks of any size, with one generator gives the labels of
a single call on their concatenation; :func:`skip_draws` jumps a generator over the draws of the pixels
before a shard (another process's images) without generating them. float32 draws, not float64: half the
random bits, and no 8-byte temporary per pixel.

Exact-count sampling (``pseudolabel.dars_sampling: exact_count``, the authors' code): per image and class,
of the image's ``m`` candidates keep exactly ``k = floor(s_c * m + 0.5)`` (drop ``m - k``), chosen
uniformly at random, where Bernoulli sampling keeps ``s_c * m`` in expectation.
:func:`dars_exact_count_labels` draws the same one float32 ``u`` per pixel, in order, and keeps the ``k``
candidates of the smallest ``u`` (ties by pixel order): ranking i.i.d. uniform keys is a uniform random
permutation (the authors' ``randperm``), and the draws stay those of the randomness contract, so sharding
(:func:`skip_draws`) is unchanged. Limitation: the count is per *image*, so each image must be labelled in
one call (one piece): the streaming driver then hands the generator whole images and the pseudolabel stage
raises its chunk to the largest image (memory: ~20 bytes a pixel of that image). With that, the labels do
not depend on ``chunk_pixels``. Cost: one sort of an image's candidates, ~0.6 s for a 1024 x 2048 image
(Bernoulli: ~0.04 s).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from labelpipe.pseudo.histogram import Float16Histogram, float16_bits_at_least
from labelpipe.pseudo.registry import Histogram, PseudoLabelGenerator, register_generator
from labelpipe.pseudo.validation import (
    IGNORE_LABEL,
    class_prior,
    flat_float16,
    flat_labels,
    labeling_ratio,
    labels_below,
    nonnegative_float16_bits,
    same_length,
)

DEGENERATE_THRESHOLD = 1.0
PIECE_PIXELS = 1 << 16  # pixels labelled at a time: every temporary stays a few hundred kB, in cache


def dars_target_counts(prior: np.ndarray, alpha: float, n_pixels: int) -> np.ndarray:
    """(C,) int64 target counts ``n_c = floor(alpha * r_c * P)`` (Algorithm 1, line 2)."""
    prior = class_prior(prior)
    alpha = labeling_ratio(alpha)
    if n_pixels < 0:
        raise ValueError(f"n_pixels must be >= 0, got {n_pixels}")
    return np.floor(alpha * prior * float(n_pixels)).astype(np.int64)


def _align_and_sample(
    target: int,
    class_count: int,
    kth_largest: Callable[[int], float],
    count_at_least: Callable[[float], int],
) -> tuple[float, float]:
    """Threshold and sampling ratio of one class, from its order statistics (shared by both paths)."""
    if class_count == 0 or target == 0:
        return DEGENERATE_THRESHOLD, 0.0
    threshold = kth_largest(min(target, class_count))
    candidates = count_at_least(threshold)
    return threshold, min(1.0, target / candidates)


def dars_thresholds(
    label: np.ndarray, conf: np.ndarray, prior: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """DARS thresholds from the predictions in memory.

    label: (N,) uint8 predicted classes (< C); conf: (N,) float16 confidences; prior: (C,) labeled class
    fractions summing to 1; alpha: labeling ratio in (0, 1]. Returns ``(thresholds, sampling_ratio)``,
    both (C,) float64 (thresholds are float16 values).
    """
    label = flat_labels(label)
    conf = flat_float16(conf, "conf")
    same_length(label, conf, "label", "conf")
    targets = dars_target_counts(prior, alpha, label.size)
    num_classes = targets.size
    labels_below(label, num_classes)
    thresholds = np.empty(num_classes)
    sampling_ratio = np.empty(num_classes)
    for c in range(num_classes):
        class_conf = conf[label == c]

        def kth_largest(k: int, values: np.ndarray = class_conf) -> float:
            return float(np.partition(values, values.size - k)[values.size - k])

        def count_at_least(t: float, values: np.ndarray = class_conf) -> int:
            return int(np.count_nonzero(values >= np.float64(t)))

        thresholds[c], sampling_ratio[c] = _align_and_sample(
            int(targets[c]), class_conf.size, kth_largest, count_at_least
        )
    return thresholds, sampling_ratio


def dars_thresholds_from_histogram(
    hist: Float16Histogram, prior: np.ndarray, alpha: float, n_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """The same ``(thresholds, sampling_ratio)`` as :func:`dars_thresholds`, from a per-class histogram
    of the confidences (one streaming pass). ``n_pixels`` is P, normally ``hist.total()``."""
    targets = dars_target_counts(prior, alpha, n_pixels)
    if targets.size != hist.num_classes:
        raise ValueError(f"prior has {targets.size} classes but the histogram has {hist.num_classes}")
    thresholds = np.empty(hist.num_classes)
    sampling_ratio = np.empty(hist.num_classes)
    for c, class_count in enumerate(hist.class_counts()):
        thresholds[c], sampling_ratio[c] = _align_and_sample(
            int(targets[c]),
            int(class_count),
            lambda k, c=c: hist.kth_largest(c, k),
            lambda t, c=c: hist.count_at_least(c, t),
        )
    return thresholds, sampling_ratio


def skip_draws(rng: np.random.Generator, n_pixels: int) -> None:
    """Advance ``rng`` past the draws :func:`dars_pseudo_labels` makes for ``n_pixels`` pixels, in O(1):
    afterwards it draws what it would have drawn after labelling them (a shard starts where the pixels of
    the shards before it end). Needs a PCG64-family bit generator (``np.random.default_rng``'s)."""
    if n_pixels < 0:
        raise ValueError(f"n_pixels must be >= 0, got {n_pixels}")
    if not hasattr(rng.bit_generator, "advance"):
        raise TypeError(f"{type(rng.bit_generator).__name__} cannot skip draws; use np.random.default_rng")
    # One 64-bit output gives two float32 draws, the second kept by the generator for the next draw.
    rng.bit_generator.advance(n_pixels // 2)
    if n_pixels % 2:
        rng.random(1, dtype=np.float32)


def _checked_inputs(
    label: np.ndarray, conf: np.ndarray, thresholds: np.ndarray, sampling_ratio: np.ndarray, rng: np.random.Generator
) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated Algorithm-1 inputs: (label's shape, flat uint8 labels, flat float16 conf, (C,) float64
    thresholds, (C,) float64 sampling ratios in [0, 1])."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    shape = np.shape(label)
    label = flat_labels(label)
    conf = flat_float16(conf, "conf")
    same_length(label, conf, "label", "conf")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    sampling_ratio = np.asarray(sampling_ratio, dtype=np.float64)
    if thresholds.shape != sampling_ratio.shape or thresholds.ndim != 1:
        raise ValueError(
            f"thresholds and sampling_ratio must both be (C,), got {thresholds.shape} and {sampling_ratio.shape}"
        )
    if np.any((sampling_ratio < 0) | (sampling_ratio > 1)):
        raise ValueError("sampling_ratio must lie in [0, 1]")
    return shape, label, conf, thresholds, sampling_ratio


# PCG64-family generators make a float32 draw from one 32-bit half of a 64-bit output (the low half first,
# the high half kept for the next draw): u = (word >> 8) * 2**-24 (numpy's ``next_float``).
_HALVES_OF_RAW64 = ("PCG64", "PCG64DXSM")


def float32_draw_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) uint32 words whose top 24 bits are the draws ``rng.random(n, dtype=np.float32)`` would make
    (``u = (w >> 8) * 2**-24``), leaving ``rng`` in the state that call would leave it in.

    For the PCG64 generators of ``np.random.default_rng`` the words are the generator's raw 64-bit outputs
    split in halves (``random_raw``: ~2.5x faster than making the floats, and comparisons stay in integers);
    a draw buffered by an earlier odd-length call comes first, and an odd tail is drawn the ordinary way so
    that its other half stays buffered. Other bit generators: computed from ``rng.random``."""
    bit_generator = rng.bit_generator
    if type(bit_generator).__name__ not in _HALVES_OF_RAW64 or sys.byteorder != "little":
        return _words_of_draws(rng, n)
    buffered = n and bit_generator.state["has_uint32"]
    if not buffered and n % 2 == 0:  # the common case: the raw outputs' halves are the words, no copy
        return bit_generator.random_raw(n // 2).view(np.uint32)
    words = np.empty(n, np.uint32)
    start, end = 0, n
    if buffered:
        words[:1] = _words_of_draws(rng, 1)
        start = 1
    if (end - start) % 2:
        end -= 1
    words[start:end] = bit_generator.random_raw((end - start) // 2).view(np.uint32)  # low half, then high
    if end < n:
        words[end:] = _words_of_draws(rng, 1)
    return words


def _words_of_draws(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) uint32 words of ``rng.random(n, dtype=np.float32)``, made the ordinary way (low 8 bits 0)."""
    return (rng.random(n, dtype=np.float32) * np.float32(1 << 24)).astype(np.uint32) << np.uint32(8)


def _keep_words(sampling_ratio: np.ndarray) -> np.ndarray:
    """(C,) uint32 ``W_c`` with ``u < float32(s_c)`` exactly when ``word <= W_c`` (``u = (word >> 8) * 2**-24``):
    ``u < s`` iff ``word >> 8 < ceil(s * 2**24)``. -1 (no word) where ``s_c = 0``."""
    limit = np.ceil(sampling_ratio.astype(np.float32).astype(np.float64) * (1 << 24)).astype(np.int64)
    return limit * 256 - 1


def dars_pseudo_labels(
    label: np.ndarray,
    conf: np.ndarray,
    thresholds: np.ndarray,
    sampling_ratio: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Algorithm 1, lines 3 and 6: keep a pixel predicted c when ``conf >= t_c`` and ``u < float32(s_c)``,
    with ``u = rng.random(N, dtype=np.float32)`` drawn for every pixel in C order (see the module's
    randomness contract).

    label: (N,) or any shape, uint8; conf: same size, float16 >= 0; thresholds, sampling_ratio: (C,).
    Returns labels (255 where not kept) in ``label``'s shape and dtype. Works through the pixels
    ``PIECE_PIXELS`` at a time, in integers only (:func:`label_pieces`), so its temporaries do not grow
    with N.
    """
    shape, label, conf, thresholds, sampling_ratio = _checked_inputs(label, conf, thresholds, sampling_ratio, rng)
    label, bits = _class_ids_and_bits(label, conf, thresholds.size)
    return label_pieces(label, bits, integer_tables(thresholds, sampling_ratio), rng).reshape(shape)


def _class_ids_and_bits(label: np.ndarray, conf: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`label_pieces`'s checked pixel inputs: flat class ids (< ``num_classes``) and the bit patterns
    of the non-negative float16 confidences."""
    label = flat_labels(label)
    labels_below(label, num_classes)
    return label, nonnegative_float16_bits(flat_float16(conf, "conf"), "conf")


def integer_tables(thresholds: np.ndarray, sampling_ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-class integer form of ``(thresholds, sampling_ratio)`` that :func:`label_pieces` compares
    against: ``(threshold_bits, keep_words)``, (C,) uint16 and uint32. A pixel of class c is a candidate
    when its float16 confidence's bit pattern is ``>= threshold_bits[c]`` (exact for values >= 0) and is
    kept when its draw's word is ``<= keep_words[c]`` (:func:`_keep_words`). A class that keeps nothing
    (s_c = 0) gets a threshold no float16 >= 0 reaches, so that its keep word fits uint32."""
    keep_words = _keep_words(np.asarray(sampling_ratio, dtype=np.float64))
    threshold_bits = np.where(keep_words < 0, np.uint16(0xFFFF), float16_bits_at_least(thresholds))
    return threshold_bits.astype(np.uint16), np.maximum(keep_words, 0).astype(np.uint32)


def label_pieces(
    label: np.ndarray, bits: np.ndarray, tables: tuple[np.ndarray, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """The kernel of :func:`dars_pseudo_labels` on checked inputs: flat unsigned ``label`` (< C), the uint16
    bit patterns of non-negative float16 confidences (:func:`nonnegative_float16_bits`) and
    :func:`integer_tables`. Returns the labels (255 where not kept) in ``label``'s dtype, ``PIECE_PIXELS`` at a time so
    that every temporary stays a few hundred kB, in cache. One comparison of integers per condition, no
    float temporaries; ``ndarray.take`` on uint8 indices (~2x faster than fancy indexing)."""
    threshold_bits, keep_words = tables
    out = np.empty_like(label)
    for start in range(0, label.size, PIECE_PIXELS):
        piece = slice(start, start + PIECE_PIXELS)
        cls = label[piece]
        keep = bits[piece] >= threshold_bits.take(cls)
        keep &= float32_draw_words(rng, cls.size) <= keep_words.take(cls)
        if out.dtype == np.uint8:  # keep - 1 is 0 (kept) or 255 (uint8 wrap-around); c | 255 = IGNORE_LABEL
            np.bitwise_or(cls, keep.view(np.uint8) - np.uint8(1), out=out[piece])
        else:
            out[piece] = np.where(keep, cls, IGNORE_LABEL)
    return out


SAMPLING_MODES = ("bernoulli", "exact_count")


def exact_keep_count(sampling_ratio: float, candidates: int) -> int:
    """``k = floor(s * m + 0.5)``: the candidates of one class an image keeps under exact-count sampling."""
    return min(candidates, int(np.floor(sampling_ratio * candidates + 0.5)))


def dars_exact_count_labels(
    label: np.ndarray,
    conf: np.ndarray,
    thresholds: np.ndarray,
    sampling_ratio: np.ndarray,
    rng: np.random.Generator,
    image_pixels: list[int] | tuple[int, ...] | None = None,
) -> np.ndarray:
    """Algorithm 1 with the authors' exact-count sampling: per image and class c, of the ``m`` pixels
    predicted c with ``conf >= t_c``, keep the :func:`exact_keep_count` ``k`` whose draw ``u`` is smallest.

    label, conf: (N,) (or any shape, flattened in C order) uint8 / float16 >= 0, the images one after the
    other; thresholds, sampling_ratio: (C,); image_pixels: the images' sizes in pixels, summing to N (None:
    one image). ``u = rng.random(N, dtype=np.float32)``, one per pixel in order, as
    :func:`dars_pseudo_labels` draws. Returns labels (255 where not kept) in ``label``'s shape and dtype.
    """
    shape, label, conf, thresholds, sampling_ratio = _checked_inputs(label, conf, thresholds, sampling_ratio, rng)
    sizes = [label.size] if image_pixels is None else [int(n) for n in image_pixels]
    if any(n < 0 for n in sizes) or sum(sizes) != label.size:
        raise ValueError(f"image_pixels must be >= 0 and sum to the {label.size} pixels, got a sum of {sum(sizes)}")
    labels_below(label, thresholds.size)
    num_classes = thresholds.size
    candidate = nonnegative_float16_bits(conf, "conf") >= np.take(float16_bits_at_least(thresholds), label)
    out = np.full_like(label, IGNORE_LABEL)
    start = 0
    for size in sizes:
        image = slice(start, start + size)
        start += size
        u = rng.random(size, dtype=np.float32)
        idx = np.flatnonzero(candidate[image])
        if idx.size == 0:
            continue
        cls = label[image][idx].astype(np.int64)
        # Candidates by class, then by draw: one stable sort of class + u (exact in float64: u has 24 bits),
        # ties by pixel order; then the rank of each candidate within its class.
        order = np.argsort(cls + u[idx].astype(np.float64), kind="stable")
        counts = np.bincount(cls, minlength=num_classes)
        keep_counts = np.array([exact_keep_count(sampling_ratio[c], int(counts[c])) for c in range(num_classes)])
        group_start = np.cumsum(counts) - counts
        sorted_cls = cls[order]
        rank = np.arange(idx.size) - group_start[sorted_cls]
        kept = idx[order[rank < keep_counts[sorted_cls]]]
        out[image][kept] = label[image][kept]
    return out.reshape(shape)


def _fit(hist: Float16Histogram, settings: Mapping[str, Any], prior: np.ndarray) -> dict[str, Any]:
    alpha = labeling_ratio(settings["alpha"])
    class_counts = hist.class_counts()
    n_pixels = int(class_counts.sum())
    thresholds, sampling_ratio = dars_thresholds_from_histogram(hist, prior, alpha, n_pixels)
    sampling = settings.get("dars_sampling") or "bernoulli"  # absent from the settings when the default
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"dars_sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    return {
        "alpha": alpha,
        "sampling": sampling,
        "class_counts": class_counts,
        "n_pixels": n_pixels,
        "thresholds": thresholds,
        "sampling_ratio": sampling_ratio,
        "target_counts": dars_target_counts(prior, alpha, n_pixels),
        "candidate_counts": np.array([hist.count_at_least(c, t) for c, t in enumerate(thresholds)], dtype=np.int64),
        "_tables": integer_tables(thresholds, sampling_ratio),  # made once, not per piece (not reported)
    }


def _label(
    params: Mapping[str, Any], piece: Mapping[str, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, None]:
    if params.get("sampling", "bernoulli") == "exact_count":  # the piece is one whole image (per_image)
        labels = dars_exact_count_labels(
            piece["label"], piece["conf"], params["thresholds"], params["sampling_ratio"], rng
        )
        return labels, None
    tables = params.get("_tables") or integer_tables(params["thresholds"], params["sampling_ratio"])
    label, bits = _class_ids_and_bits(piece["label"], piece["conf"], tables[0].size)
    return label_pieces(label, bits, tables, rng), None


register_generator(
    PseudoLabelGenerator(
        name="dars",
        settings=("alpha",),
        optional_settings=("dars_sampling",),
        histogram=Histogram("conf", per_class=True),
        pass2_columns=("label", "conf"),
        fit=_fit,
        label=_label,
        random=True,
        needs_prior=True,
        per_image=lambda params: params.get("sampling") == "exact_count",
    )
)
