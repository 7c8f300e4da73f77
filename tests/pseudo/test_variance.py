import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.pseudo.variance import (
    variance_cutoff,
    variance_cutoff_from_histogram,
    variance_pseudo_labels,
)

from .synthetic import random_nonnegative_float16

LABEL = np.array([0, 1, 2, 1, 0], dtype=np.uint8)
VARIANCE = np.array([0.0, 0.25, 0.5, 1.0, 2.0], dtype=np.float16)


def test_keeps_every_label_with_weight_exp_minus_variance_by_default():
    labels, weights = variance_pseudo_labels(LABEL, VARIANCE)
    np.testing.assert_array_equal(labels, LABEL)
    assert weights.dtype == np.float16
    np.testing.assert_array_equal(weights, np.exp(-VARIANCE.astype(np.float32)).astype(np.float16))
    assert weights[0] == 1.0 and weights[2] == np.float16(0.6064)


def test_percentile_cut_drops_pixels_above_the_cutoff():
    # 80th percentile of 5 values: rank ceil(4) = 4 ascending -> 1.0; only 2.0 is dropped.
    labels, weights = variance_pseudo_labels(LABEL, VARIANCE, percentile=80)
    np.testing.assert_array_equal(labels, [0, 1, 2, 1, 255])
    assert weights[4] == 0 and weights[3] > 0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="percentile"):
        variance_pseudo_labels(LABEL, VARIANCE, percentile=0)
    with pytest.raises(ValueError, match="percentile"):
        variance_pseudo_labels(LABEL, VARIANCE, percentile=101)
    with pytest.raises(ValueError, match="same number of pixels"):
        variance_pseudo_labels(LABEL, VARIANCE[:2])


def test_two_dimensional_maps_keep_their_shape():
    labels, weights = variance_pseudo_labels(np.zeros((3, 4), np.uint8), np.zeros((3, 4), np.float16))
    assert labels.shape == weights.shape == (3, 4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3000), percentile=st.floats(0.01, 100.0))
def test_histogram_cutoff_equals_sorted_cutoff_and_numpy(seed, n, percentile):
    variance = random_nonnegative_float16(seed, n)
    hist = Float16Histogram(1)
    hist.update(np.zeros(n, np.uint8), variance)
    cutoff = variance_cutoff(variance, percentile)
    assert variance_cutoff_from_histogram(hist, percentile) == cutoff
    assert cutoff == float(np.quantile(variance, percentile / 100, method="inverted_cdf"))
