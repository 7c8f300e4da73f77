import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labelpipe.pseudo.histogram import NUM_BINS, Float16Histogram

from .synthetic import random_nonnegative_float16, random_predictions


def test_counts_land_in_the_bit_pattern_bins_of_their_class():
    hist = Float16Histogram(3)
    values = np.array([1.0, 1.0, 0.5, 0.25], dtype=np.float16)
    hist.update(np.array([0, 0, 2, 2], dtype=np.uint8), values)
    bits = values.view(np.uint16)
    assert hist.counts.shape == (3, NUM_BINS) and NUM_BINS == 0x7C01
    assert hist.counts[0, bits[0]] == 2
    assert hist.counts[2, bits[2]] == 1 and hist.counts[2, bits[3]] == 1
    assert hist.counts.sum() == 4
    assert list(hist.class_counts()) == [2, 0, 2]


def test_hand_computed_order_statistics():
    hist = Float16Histogram(2)
    label = np.array([0, 0, 0, 0, 1, 1], dtype=np.uint8)
    values = np.array([0.5, 1.0, 1.0, 0.25, 0.75, 0.125], dtype=np.float16)
    hist.update(label, values)
    assert [hist.kth_largest(0, k) for k in (1, 2, 3, 4)] == [1.0, 1.0, 0.5, 0.25]
    assert hist.count(0) == 4 and hist.count(1) == 2 and hist.total() == 6
    assert hist.count_at_least(0, 0.5) == 3
    assert hist.count_at_least(0, 0.3) == 3  # between float16 values
    assert hist.count_at_least(0, 1.5) == 0
    assert hist.count_at_least(0, -1.0) == 4
    assert hist.kth_largest_overall(3) == 0.75
    assert hist.kth_smallest_overall(1) == 0.125
    assert hist.quantile_overall(0.5) == 0.5  # rank ceil(3) ascending: 0.125, 0.25, 0.5
    assert hist.quantile_overall(0.0) == 0.125
    assert hist.count_below_overall(0.75) == 3


def test_many_small_updates_equal_one_large_update_and_bincount():
    label, conf = random_predictions(3, 1000, 5)
    small = Float16Histogram(5, piece_size=7)
    for start in range(0, 1000, 33):
        small.update(label[start : start + 33], conf[start : start + 33])
    large = Float16Histogram(5)
    large.update(label, conf)
    np.testing.assert_array_equal(small.counts, large.counts)
    index = label.astype(np.int64) * NUM_BINS + conf.view(np.uint16)
    np.testing.assert_array_equal(large.counts.ravel(), np.bincount(index, minlength=5 * NUM_BINS))


def test_merge_equals_update_on_the_concatenation():
    label, conf = random_predictions(4, 500, 4)
    first, second, whole = Float16Histogram(4), Float16Histogram(4), Float16Histogram(4)
    first.update(label[:200], conf[:200])
    second.update(label[200:], conf[200:])
    whole.update(label, conf)
    np.testing.assert_array_equal(first.merge(second).counts, whole.counts)
    with pytest.raises(ValueError, match="merge"):
        first.merge(Float16Histogram(3))


def test_two_dimensional_inputs_are_flattened():
    hist = Float16Histogram(2)
    hist.update(np.ones((2, 3), dtype=np.uint8), np.full((2, 3), 0.5, dtype=np.float16))
    assert hist.count(1) == 6


def test_negative_zero_counts_as_zero():
    hist = Float16Histogram(1)
    hist.update(np.zeros(2, np.uint8), np.array([-0.0, 0.0], dtype=np.float16))
    assert hist.counts[0, 0] == 2


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_negative_or_nan_values_are_rejected(bad):
    with pytest.raises(ValueError, match="non-negative"):
        Float16Histogram(1).update(np.zeros(2, np.uint8), np.array([0.5, bad], dtype=np.float16))


def test_invalid_inputs_are_rejected():
    hist = Float16Histogram(2)
    with pytest.raises(ValueError, match="only 2 classes"):
        hist.update(np.array([2], np.uint8), np.array([0.5], np.float16))
    with pytest.raises(ValueError, match="same number of pixels"):
        hist.update(np.array([0, 1], np.uint8), np.array([0.5], np.float16))
    with pytest.raises(ValueError, match="integer"):
        hist.update(np.array([0.0]), np.array([0.5], np.float16))
    hist.update(np.array([0], np.uint8), np.array([0.5], np.float16))
    with pytest.raises(ValueError, match="k must be in"):
        hist.kth_largest(0, 2)
    with pytest.raises(ValueError, match="k must be in"):
        hist.kth_largest(1, 1)
    with pytest.raises(ValueError, match="out of range"):
        hist.count(5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3000), num_classes=st.integers(1, 6))
def test_order_statistics_equal_sorting(seed, n, num_classes):
    label, conf = random_predictions(seed, n, num_classes)
    hist = Float16Histogram(num_classes, piece_size=257)
    hist.update(label, conf)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        descending = np.sort(conf[label == c].astype(np.float64))[::-1]
        assert hist.count(c) == descending.size
        if descending.size:
            for k in {1, descending.size, int(rng.integers(1, descending.size + 1))}:
                assert hist.kth_largest(c, k) == descending[k - 1]
            t = float(rng.choice(descending))
            assert hist.count_at_least(c, t) == np.count_nonzero(descending >= t)
            assert hist.count_at_least(c, t + 1e-4) == np.count_nonzero(descending >= t + 1e-4)
    ascending = np.sort(conf.astype(np.float64))
    k = int(rng.integers(1, n + 1))
    assert hist.kth_smallest_overall(k) == ascending[k - 1]
    assert hist.kth_largest_overall(k) == ascending[::-1][k - 1]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 2000), q=st.floats(0.0, 1.0))
def test_quantile_overall_is_the_inverted_cdf_quantile(seed, n, q):
    values = random_nonnegative_float16(seed, n)
    hist = Float16Histogram(1)
    hist.update(np.zeros(n, np.uint8), values)
    expected = np.sort(values.astype(np.float64))[max(1, math.ceil(q * n)) - 1]
    assert hist.quantile_overall(q) == expected
    assert hist.quantile_overall(q) == float(np.quantile(values, q, method="inverted_cdf"))
