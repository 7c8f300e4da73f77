import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labelpipe.pseudo.dars import (
    PIECE_PIXELS,
    dars_pseudo_labels,
    dars_target_counts,
    dars_thresholds,
    dars_thresholds_from_histogram,
    float32_draw_words,
    skip_draws,
)
from labelpipe.pseudo.histogram import Float16Histogram

from .synthetic import random_predictions, random_prior

# Class 0: six pixels (1, 1, 1, .75, .625, .5); class 1: three (.875, .5, .25); class 2: one (.375).
LABEL = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2], dtype=np.uint8)
CONF = np.array([1.0, 1.0, 1.0, 0.75, 0.625, 0.5, 0.875, 0.5, 0.25, 0.375], dtype=np.float16)
PRIOR = np.array([0.4, 0.2, 0.4])


def test_hand_computed_thresholds_and_sampling_ratios():
    # alpha = 0.5, P = 10: n = floor(0.5 * [0.4, 0.2, 0.4] * 10) = [2, 1, 2].
    # class 0: 2nd largest = 1.0, tied three times -> m = 3, s = 2/3;
    # class 1: 1st largest = 0.875 -> m = 1, s = 1;
    # class 2: one pixel < n = 2 -> its smallest conf 0.375, m = 1, s = min(1, 2) = 1.
    np.testing.assert_array_equal(dars_target_counts(PRIOR, 0.5, 10), [2, 1, 2])
    thresholds, ratio = dars_thresholds(LABEL, CONF, PRIOR, 0.5)
    np.testing.assert_array_equal(thresholds, [1.0, 0.875, 0.375])
    np.testing.assert_allclose(ratio, [2 / 3, 1.0, 1.0])


def test_hand_computed_labels_follow_the_uniform_draws():
    thresholds, ratio = np.array([1.0, 0.875, 0.375]), np.array([2 / 3, 1.0, 1.0])
    u = np.random.default_rng(7).random(10, dtype=np.float32)  # float32 draws, compared with float32(s_c)
    labels = dars_pseudo_labels(LABEL, CONF, thresholds, ratio, np.random.default_rng(7))
    candidate = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0, 1], dtype=bool)
    expected = np.where(candidate & (u < ratio[LABEL].astype(np.float32)), LABEL, 255)
    np.testing.assert_array_equal(labels, expected)
    assert set(np.flatnonzero(labels != 255)) >= {6, 9}  # s = 1 candidates always kept


def test_degenerate_classes_get_threshold_one_and_ratio_zero():
    # class 2 is never predicted; class 1's target floor(0.5 * 0.05 * 10) = 0.
    label = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0], np.uint8)
    conf = np.full(10, 0.5, np.float16)
    thresholds, ratio = dars_thresholds(label, conf, np.array([0.65, 0.05, 0.3]), 0.5)
    assert thresholds[1] == 1.0 and ratio[1] == 0.0
    assert thresholds[2] == 1.0 and ratio[2] == 0.0
    labels = dars_pseudo_labels(label, conf, thresholds, ratio, np.random.default_rng(0))
    assert not np.any(labels == 1)


def test_generator_draws_split_like_one_draw():
    whole = np.random.default_rng(123).random(1000, dtype=np.float32)
    rng = np.random.default_rng(123)
    sizes = [317, 0, 1, 3, 679]  # odd sizes split a 64-bit output between two calls
    np.testing.assert_array_equal(np.concatenate([rng.random(n, dtype=np.float32) for n in sizes]), whole)


@pytest.mark.parametrize("offset", [0, 1, 2, 777, 1000])
def test_skip_draws_starts_where_the_skipped_pixels_end(offset):
    label, conf = random_predictions(3, 1000, 4)
    thresholds, ratio = dars_thresholds(label, conf, random_prior(3, 4), 0.4)
    whole = dars_pseudo_labels(label, conf, thresholds, ratio, np.random.default_rng(11))
    rng = np.random.default_rng(11)
    skip_draws(rng, offset)
    np.testing.assert_array_equal(
        dars_pseudo_labels(label[offset:], conf[offset:], thresholds, ratio, rng), whole[offset:]
    )


def test_labels_cross_the_internal_pieces_unchanged():
    label, conf = random_predictions(4, 3 * PIECE_PIXELS + 5, 6)
    thresholds, ratio = dars_thresholds(label, conf, random_prior(4, 6), 0.5)
    got = dars_pseudo_labels(label, conf, thresholds, ratio, np.random.default_rng(2))
    u = np.random.default_rng(2).random(label.size, dtype=np.float32)
    keep = (conf >= thresholds[label]) & (u < ratio.astype(np.float32)[label])
    np.testing.assert_array_equal(got, np.where(keep, label, 255))


def test_image_by_image_labels_equal_one_call_on_the_concatenation():
    label, conf = random_predictions(5, 5000, 5)
    thresholds, ratio = dars_thresholds(label, conf, random_prior(5, 5), 0.3)
    whole = dars_pseudo_labels(label, conf, thresholds, ratio, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    pieces = [
        dars_pseudo_labels(label[a:b], conf[a:b], thresholds, ratio, rng)
        for a, b in [(0, 1000), (1000, 1001), (1001, 4000), (4000, 5000)]
    ]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_same_seed_same_labels_different_seed_different_labels():
    label = np.zeros(2000, np.uint8)
    conf = np.ones(2000, np.float16)  # all tied: m = 2000, n = 1000, s = 0.5
    thresholds, ratio = dars_thresholds(label, conf, np.array([1.0]), 0.5)
    assert ratio[0] == 0.5
    first = dars_pseudo_labels(label, conf, thresholds, ratio, np.random.default_rng(1))
    again = dars_pseudo_labels(label, conf, thresholds, ratio, np.random.default_rng(1))
    other = dars_pseudo_labels(label, conf, thresholds, ratio, np.random.default_rng(2))
    np.testing.assert_array_equal(first, again)
    assert np.any(first != other)


def test_two_dimensional_maps_keep_their_shape():
    labels = dars_pseudo_labels(
        LABEL.reshape(2, 5), CONF.reshape(2, 5), np.zeros(3), np.ones(3), np.random.default_rng(0)
    )
    np.testing.assert_array_equal(labels, LABEL.reshape(2, 5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.2}, "alpha"),
        ({"prior": np.array([0.5, 0.2, 0.2])}, "sum to 1"),
        ({"prior": np.array([1.2, -0.1, -0.1])}, "non-negative"),
        ({"prior": np.array([0.5, 0.5])}, "only 2 classes"),
        ({"conf": CONF[:-1]}, "same number of pixels"),
        ({"conf": np.arange(10)}, "floating-point"),
    ],
)
def test_invalid_inputs_raise_clear_errors(kwargs, message):
    arguments = {"label": LABEL, "conf": CONF, "prior": PRIOR, "alpha": 0.5} | kwargs
    with pytest.raises(ValueError, match=message):
        dars_thresholds(**arguments)


def test_invalid_sampling_inputs_raise():
    with pytest.raises(TypeError, match="Generator"):
        dars_pseudo_labels(LABEL, CONF, np.zeros(3), np.ones(3), np.random.RandomState(0))
    with pytest.raises(ValueError, match=r"\(C,\)"):
        dars_pseudo_labels(LABEL, CONF, np.zeros(3), np.ones(2), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dars_pseudo_labels(LABEL, CONF, np.zeros(3), np.full(3, 1.5), np.random.default_rng(0))
    with pytest.raises(ValueError, match="prior has 3 classes"):
        dars_thresholds_from_histogram(Float16Histogram(2), PRIOR, 0.5, 10)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 3000),
    num_classes=st.integers(1, 6),
    alpha=st.floats(0.001, 1.0),
)
def test_histogram_thresholds_equal_sorted_thresholds(seed, n, num_classes, alpha):
    label, conf = random_predictions(seed, n, num_classes)
    prior = random_prior(seed, num_classes)
    hist = Float16Histogram(num_classes)
    hist.update(label, conf)
    from_hist = dars_thresholds_from_histogram(hist, prior, alpha, n)
    from_sort = dars_thresholds(label, conf, prior, alpha)
    np.testing.assert_array_equal(from_hist[0], from_sort[0])
    np.testing.assert_array_equal(from_hist[1], from_sort[1])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3000), alpha=st.floats(0.001, 1.0))
def test_expected_kept_count_is_the_target_count(seed, n, alpha):
    # E[kept_c] = s_c * m_c, which is n_c whenever m_c >= n_c, and every pixel of c otherwise.
    label, conf = random_predictions(seed, n, 4)
    prior = random_prior(seed, 4)
    thresholds, ratio = dars_thresholds(label, conf, prior, alpha)
    targets = dars_target_counts(prior, alpha, n)
    for c in range(4):
        class_count = np.count_nonzero(label == c)
        candidates = np.count_nonzero((label == c) & (conf >= thresholds[c]))
        if targets[c] == 0 or class_count == 0:
            assert ratio[c] == 0.0
        elif candidates >= targets[c]:
            assert ratio[c] * candidates == pytest.approx(targets[c], rel=1e-12)
        else:
            assert candidates == class_count and ratio[c] == 1.0


def test_average_kept_count_over_many_seeds_matches_the_target():
    _, conf = random_predictions(11, 4000, 3)
    label = np.random.default_rng(11).choice(3, size=4000, p=[0.5, 0.3, 0.2]).astype(np.uint8)
    conf[label == 0] = np.float16(1.0)  # class 0 fully tied: heavy random sampling
    prior = np.array([0.5, 0.3, 0.2])
    thresholds, ratio = dars_thresholds(label, conf, prior, 0.4)
    targets = dars_target_counts(prior, 0.4, label.size)
    kept = np.array(
        [
            np.bincount(labels[labels != 255], minlength=3)
            for labels in (
                dars_pseudo_labels(label, conf, thresholds, ratio, np.random.default_rng(seed)) for seed in range(300)
            )
        ]
    )
    class_counts = np.bincount(label, minlength=3)
    for c in range(3):
        expected = min(targets[c], class_counts[c])
        candidates = np.count_nonzero((label == c) & (conf >= thresholds[c]))
        std_of_mean = np.sqrt(candidates * ratio[c] * (1 - ratio[c]) / 300)
        assert abs(kept[:, c].mean() - expected) <= 5 * std_of_mean + 1e-9
    assert ratio[0] < 1.0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 2000),
    alphas=st.tuples(st.floats(0.001, 1.0), st.floats(0.001, 1.0)).map(sorted),
)
def test_thresholds_fall_weakly_as_alpha_grows(seed, n, alphas):
    label, conf = random_predictions(seed, n, 4)
    prior = random_prior(seed, 4)
    low, _ = dars_thresholds(label, conf, prior, alphas[0])
    high, _ = dars_thresholds(label, conf, prior, alphas[1])
    assert np.all(high <= low)


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.PCG64DXSM, np.random.Philox])
@pytest.mark.parametrize("before", [0, 1, 2])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_draw_words_are_the_float32_draws_and_leave_the_generator_where_they_would(bit_generator, before, n):
    # The words of the raw 64-bit outputs, a draw buffered by an odd-length call first, an odd tail drawn
    # the ordinary way: the same draws as rng.random(n, float32), and the same draws after them.
    ours, numpy_s = np.random.Generator(bit_generator(3)), np.random.Generator(bit_generator(3))
    ours.random(before, dtype=np.float32)
    numpy_s.random(before, dtype=np.float32)
    words = float32_draw_words(ours, n)
    assert words.dtype == np.uint32
    np.testing.assert_array_equal((words >> 8).astype(np.float32) * np.float32(2**-24), numpy_s.random(n, np.float32))
    np.testing.assert_array_equal(ours.random(5, dtype=np.float32), numpy_s.random(5, dtype=np.float32))


def test_integer_sampling_equals_the_float_comparison_at_the_edges():
    # s = 0 keeps nothing, s = 1 everything; in between, u < float32(s) exactly (here every pixel is a
    # candidate: conf 1.0 >= t = 0.5), checked against the floats themselves.
    ratio = np.array([0.0, 1.0, 0.3, np.nextafter(np.float32(0.5), np.float32(1)), 2.0**-24])
    label = np.repeat(np.arange(ratio.size, dtype=np.uint8), 20_000)
    conf = np.ones(label.size, np.float16)
    got = dars_pseudo_labels(label, conf, np.full(ratio.size, 0.5), ratio, np.random.default_rng(4))
    u = np.random.default_rng(4).random(label.size, dtype=np.float32)
    expected = np.where(u < ratio.astype(np.float32)[label], label, 255)
    np.testing.assert_array_equal(got, expected)
    assert not np.any(got[label == 0] != 255) and np.all(got[label == 1] == 1)
