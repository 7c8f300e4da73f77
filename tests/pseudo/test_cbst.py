import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labelpipe.pseudo.cbst import cbst_pseudo_labels, cbst_thresholds, cbst_thresholds_from_histogram
from labelpipe.pseudo.histogram import Float16Histogram

from .synthetic import random_predictions

# Class 0: six pixels (1, 1, 1, .75, .625, .5); class 1: three (.875, .5, .25); class 2: one (.375).
LABEL = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2], dtype=np.uint8)
CONF = np.array([1.0, 1.0, 1.0, 0.75, 0.625, 0.5, 0.875, 0.5, 0.25, 0.375], dtype=np.float16)


def test_hand_computed_thresholds_and_labels():
    # alpha = 0.5: ranks ceil(3) = 3, ceil(1.5) = 2, ceil(0.5) = 1 in descending order.
    thresholds = cbst_thresholds(LABEL, CONF, 0.5, 3)
    np.testing.assert_array_equal(thresholds, [1.0, 0.5, 0.375])
    labels = cbst_pseudo_labels(LABEL, CONF, thresholds)
    np.testing.assert_array_equal(labels, [0, 0, 0, 255, 255, 255, 1, 1, 255, 2])


def test_alpha_one_keeps_every_pixel():
    np.testing.assert_array_equal(cbst_thresholds(LABEL, CONF, 1.0, 3), [0.5, 0.25, 0.375])
    thresholds = cbst_thresholds(LABEL, CONF, 1.0, 3)
    np.testing.assert_array_equal(cbst_pseudo_labels(LABEL, CONF, thresholds), LABEL)


def test_class_without_pixels_gets_infinite_threshold_that_keeps_nothing():
    thresholds = cbst_thresholds(LABEL, CONF, 0.5, 4)
    assert thresholds[3] == math.inf
    later = cbst_pseudo_labels(np.array([3], np.uint8), np.array([1.0], np.float16), thresholds)
    assert later[0] == 255


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="alpha"):
        cbst_thresholds(LABEL, CONF, 0.0, 3)
    with pytest.raises(ValueError, match="alpha"):
        cbst_thresholds(LABEL, CONF, 1.5, 3)
    with pytest.raises(ValueError, match="only 2 classes"):
        cbst_thresholds(LABEL, CONF, 0.5, 2)
    with pytest.raises(ValueError, match="same number of pixels"):
        cbst_thresholds(LABEL, CONF[:-1], 0.5, 3)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 3000),
    num_classes=st.integers(1, 6),
    alpha=st.floats(0.001, 1.0),
)
def test_histogram_thresholds_equal_sorted_thresholds(seed, n, num_classes, alpha):
    label, conf = random_predictions(seed, n, num_classes)
    hist = Float16Histogram(num_classes)
    hist.update(label, conf)
    np.testing.assert_array_equal(
        cbst_thresholds_from_histogram(hist, alpha), cbst_thresholds(label, conf, alpha, num_classes)
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 2000),
    alphas=st.tuples(st.floats(0.001, 1.0), st.floats(0.001, 1.0)).map(sorted),
)
def test_thresholds_fall_as_alpha_grows_and_keep_at_least_the_rank(seed, n, alphas):
    label, conf = random_predictions(seed, n, 4)
    low, high = (cbst_thresholds(label, conf, a, 4) for a in alphas)
    assert np.all(high <= low)
    kept = cbst_pseudo_labels(label, conf, high)
    for c in range(4):
        assert np.count_nonzero(kept == c) >= math.ceil(alphas[1] * np.count_nonzero(label == c))
